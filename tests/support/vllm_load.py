"""Load for the real-vLLM checks and `make bench-vllm`: request bodies, clients through
Envoy, and what vLLM's own /metrics say about them.

The prefix scenario (check 2, the picker table): `tenants` tenants, each with its own
system prompt of >= 1,000 tokens, sent in turn (an odd count, so round robin over two
servers does not keep a tenant on one server by parity), each request a short unique
question after the prompt. Every run draws new prompts (`run` seed), so a run never
finds the previous run's prompts in the servers' caches.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.vllm import MODEL_NAME, Histogram, Page, VllmServer
from tests.support.vllm_model import words

TTFT = "vllm:time_to_first_token_seconds"
BLOCK_TOKENS = 128
"""vLLM's block on CPU (vllm:cache_config_info block_size): it caches whole blocks only."""
KV_BYTES_PER_TOKEN = 2 * 2 * 4 * 32 * 2  # K and V, 2 layers, 4 heads of 32, bfloat16
SLOTS = 2
KV_BLOCKS = 48
"""Per server: the scenario's 7 prompts take ~64 (8 shared blocks and 1 with the question
each), the 3-4 of one server's half 27-36: more than half of the prompts fit, not all."""


def pool_servers(model_dir: Path, kv_blocks: int = KV_BLOCKS) -> list[VllmServer]:
    """Two servers with prefix caching, a KV cache of `kv_blocks` blocks and 2 slots each."""
    kv_bytes = kv_blocks * BLOCK_TOKENS * KV_BYTES_PER_TOKEN
    flags = ("--enable-prefix-caching", "--max-model-len", "2048", "--max-num-seqs", str(SLOTS))
    return [VllmServer(model_dir, *flags, kv_cache_bytes=kv_bytes, pin=i == 0) for i in range(2)]


def completion(prompt_words: int, max_tokens: int, seed: int = 0, **more: Any) -> dict[str, Any]:
    """A completion of exactly `max_tokens` tokens (random weights: EOS ignored)."""
    prompt = words(random.Random(seed), prompt_words)
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, **more}  # fmt: skip


def headers(workload: str) -> dict[str, str]:
    return {"x-workload-context": json.dumps({"workload_id": workload})}


@dataclass(frozen=True)
class PrefixScenario:
    tenants: int = 7
    rounds: int = 6
    system_words: int = 560
    """About 1,130 tokens of this model's tokenizer (3.4 characters a token): 8 whole blocks."""
    question_words: int = 12
    output_tokens: int = 8
    workers: int = 2

    def requests(self, run: int) -> list[tuple[str, dict[str, Any]]]:
        systems = [
            words(random.Random(f"system-{run}-{t}"), self.system_words)
            for t in range(self.tenants)
        ]
        rng = random.Random(f"questions-{run}")
        order = []
        for _ in range(self.rounds):
            for tenant in range(self.tenants):
                messages = [
                    {"role": "system", "content": systems[tenant]},
                    {"role": "user", "content": words(rng, self.question_words)},
                ]
                body = {
                    "model": MODEL_NAME,
                    "messages": messages,
                    "max_tokens": self.output_tokens,
                    "ignore_eos": True,
                    "temperature": 0,
                }
                order.append((f"tenant-{tenant}", body))
        return order


@dataclass
class PrefixRun:
    """One run of the prefix scenario, as the servers' own counters saw it."""

    statuses: Counter[int] = field(default_factory=Counter)
    prompt_tokens: list[int] = field(default_factory=list)
    """Each answer's usage.prompt_tokens (vLLM's count)."""
    served_by: Counter[str] = field(default_factory=Counter)
    hits: float = 0.0
    queries: float = 0.0
    generation_tokens: float = 0.0
    elapsed: float = 0.0
    ttft: Histogram | None = None

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generation_tokens / self.elapsed


async def pages(http: aiohttp.ClientSession, servers: Sequence[VllmServer]) -> list[Page]:
    return [await server.metrics(http) for server in servers]


async def run_prefix(
    http: aiohttp.ClientSession,
    url: str | Callable[[], str],
    servers: Sequence[VllmServer],
    items: list[tuple[str, dict[str, Any]]],
    workers: int,
) -> PrefixRun:
    """Send `items` in order from `workers` clients to the chat completions `url` (or
    where `url()` says, per request); what vLLM's counters moved by meanwhile."""
    result = PrefixRun()
    before = await pages(http, servers)
    queue = list(reversed(items))
    started = time.monotonic()

    async def worker() -> None:
        while queue:
            workload, body = queue.pop()
            target = url if isinstance(url, str) else url()
            async with http.post(target, json=body, headers=headers(workload)) as reply:
                answer = await reply.json() if reply.status == 200 else await reply.text()
                result.statuses[reply.status] += 1
                result.served_by[reply.headers.get("x-served-by", "")] += 1
            if reply.status == 200:
                result.prompt_tokens.append(answer["usage"]["prompt_tokens"])

    await asyncio.gather(*(worker() for _ in range(workers)))
    result.elapsed = time.monotonic() - started
    after = await pages(http, servers)
    result.hits = sum(
        a.delta(b, "vllm:prefix_cache_hits_total") for a, b in zip(after, before, strict=True)
    )
    result.queries = sum(
        a.delta(b, "vllm:prefix_cache_queries_total") for a, b in zip(after, before, strict=True)
    )
    result.generation_tokens = sum(
        a.delta(b, "vllm:generation_tokens_total") for a, b in zip(after, before, strict=True)
    )
    first, *rest = [
        a.histograms[TTFT] - b.histograms[TTFT] for a, b in zip(after, before, strict=True)
    ]
    result.ttft = sum(rest, first)
    return result
