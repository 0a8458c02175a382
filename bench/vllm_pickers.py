"""`make bench-vllm`: the pickers against two real vLLMs (CPU, the tiny model), next to
what the pool simulator predicts for the same scenario.

The scenario is check 2 of tests/vllm (tests/support/vllm_load.py's PrefixScenario):
7 tenants, each with its own system prompt of >= 1,000 tokens, sent in turn by 2
clients, 8 output tokens each; two servers (2 slots) with prefix caching and a KV cache of 48
blocks of 128 tokens each (one server holds about 5 of the 7 prompts). Each picker
gets new prompts (nothing cached from the run before). `scored`, `least-loaded` and
`round-robin` go through the real Envoy (envoy-pool.yaml) and the service as the
endpoint picker; `random` is the clients picking a server at random themselves (the
service has no random picker).

Every number is read from vLLM's /metrics, deltas over the run, both servers summed:
prefix hit rate = prefix_cache_hits / prefix_cache_queries (tokens), TTFT p50/p90
from the time_to_first_token_seconds histogram (bucket interpolation), output tokens/s
= generation_tokens / the run's wall time. The simulator (extproc/tools/simulate_pool.py)
is given the same servers, tenants and prompt sizes, with prefill and decode costs
fitted from the same runs (vLLM's prefill-time and inter-token histograms), and Poisson
arrivals at the rate the scored run achieved.
Writes bench/results-vllm.json and bench/results-vllm.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.config import Settings  # noqa: E402
from extproc.service.app import Service  # noqa: E402
from extproc.tools import simulate_pool  # noqa: E402
from tests.support.envoy import Envoy, pool_config  # noqa: E402
from tests.support.vllm import Page, VllmServer, build_model, running  # noqa: E402
from tests.support.vllm_load import (  # noqa: E402
    BLOCK_TOKENS,
    KV_BLOCKS,
    SLOTS,
    PrefixRun,
    PrefixScenario,
    pages,
    pool_servers,
    run_prefix,
)

PICKERS = ("scored", "least-loaded", "round-robin", "random")
SCENARIO = PrefixScenario(rounds=8)


async def through_service(
    http: aiohttp.ClientSession, servers: list[VllmServer], picker: str, run: int
) -> PrefixRun:
    settings = Settings(
        listen="127.0.0.1:0", admin_listen="127.0.0.1:0", policy="fcfs", picker=picker,
        endpoints=[server.address for server in servers],
    )  # fmt: skip
    service = Service(settings)
    await service.start()
    envoy = Envoy(pool_config(service.grpc_port, [server.port for server in servers]))
    try:
        await envoy.start()
        url = f"http://127.0.0.1:{envoy.port}/v1/chat/completions"
        return await run_prefix(http, url, servers, SCENARIO.requests(run), SCENARIO.workers)
    finally:
        await envoy.stop()
        await service.stop(drain_timeout=0, grace=0)


async def at_random(http: aiohttp.ClientSession, servers: list[VllmServer], run: int) -> PrefixRun:
    rng = random.Random(run)
    urls = [f"{server.url}/v1/chat/completions" for server in servers]
    return await run_prefix(
        http, lambda: rng.choice(urls), servers, SCENARIO.requests(run), SCENARIO.workers
    )


def fitted_costs(before: list[Page], after: list[Page]) -> tuple[float, float]:
    """Seconds per prefilled (uncached) prompt token and per output token, from vLLM."""
    prefill = sum(
        a.histograms["vllm:request_prefill_time_seconds"].total
        - b.histograms["vllm:request_prefill_time_seconds"].total
        for a, b in zip(after, before, strict=True)
    )
    uncached = sum(
        a.delta(b, "vllm:prompt_tokens_total") - a.delta(b, "vllm:prefix_cache_hits_total")
        for a, b in zip(after, before, strict=True)
    )
    itl = [
        a.histograms["vllm:inter_token_latency_seconds"]
        - b.histograms["vllm:inter_token_latency_seconds"]
        for a, b in zip(after, before, strict=True)
    ]
    decode = sum(h.total for h in itl) / sum(h.count for h in itl)
    return prefill / uncached, decode


def simulated(
    prompt_tokens: float, rate: float, prefill: float, decode: float
) -> list[simulate_pool.PickerResult]:
    kv_tokens = KV_BLOCKS * BLOCK_TOKENS
    server = simulate_pool.ServerSpec(
        1.0, slots=SLOTS, kv_tokens=kv_tokens,
        cache_blocks=kv_tokens * simulate_pool.CHARS_PER_TOKEN // simulate_pool.BLOCK_BYTES,
    )  # fmt: skip
    question = 20
    scenario = simulate_pool.PoolScenario(
        name="vllm-bench", duration=300.0, servers=(server, server),
        groups=tuple(
            simulate_pool.TenantGroup(f"t{i}", 1, rate / SCENARIO.tenants,
                                      context_tokens=int(prompt_tokens) - question)
            for i in range(SCENARIO.tenants)
        ),
        question_tokens=question, output_tokens=SCENARIO.output_tokens,
        prefill_per_token=prefill, decode_per_token=decode, policy="fcfs",
    )  # fmt: skip
    return simulate_pool.compare(scenario)


async def main() -> None:
    model = build_model(Path(tempfile.mkdtemp(prefix="tiny-llama-")))
    servers = pool_servers(model)
    measured: dict[str, PrefixRun] = {}
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    with running(*servers):
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            before = await pages(http, servers)
            for run, picker in enumerate(PICKERS):
                if picker == "random":
                    measured[picker] = await at_random(http, servers, run)
                else:
                    measured[picker] = await through_service(http, servers, picker, run)
                result = measured[picker]
                print(f"{picker}: {dict(result.statuses)} hits {result.hit_ratio:.2f}", flush=True)
            after = await pages(http, servers)
    prefill, decode = fitted_costs(before, after)
    prompt = statistics.mean(t for r in measured.values() for t in r.prompt_tokens)
    scored = measured["scored"]
    rate = sum(scored.statuses.values()) / scored.elapsed
    predicted = {r.picker: r for r in simulated(prompt, rate, prefill, decode)}
    lines = [
        f"Prompt {prompt:.0f} tokens on average; fitted prefill {prefill * 1e6:.0f} us per "
        f"uncached token, decode {decode * 1e3:.1f} ms per token; simulated arrivals "
        f"{rate:.2f} req/s (Poisson).",
        "",
        "| picker | requests (all 200) | prefix hit rate | TTFT p50 / p90 (ms) | TTFT mean (ms) "
        "| output tokens/s | simulator: hit rate | simulator: TTFT p50 / p90 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for picker, r in measured.items():
        assert r.ttft is not None
        sim = predicted.get(picker)
        sim_cells = (
            f"{sim.prefix_hit_rate:.0%} | {sim.ttft_p50 * 1e3:.0f} / {sim.ttft_p90 * 1e3:.0f}"
            if sim
            else "(no random picker) | "
        )
        ok = "yes" if set(r.statuses) == {200} else f"no: {dict(r.statuses)}"
        lines.append(
            f"| `{picker}` | {sum(r.statuses.values())} ({ok}) | {r.hit_ratio:.0%} "
            f"| {r.ttft.quantile(0.5) * 1e3:.0f} / {r.ttft.quantile(0.9) * 1e3:.0f} "
            f"| {r.ttft.mean * 1e3:.0f} | {r.tokens_per_second:.1f} | {sim_cells} |"
        )
        summary[picker] = {
            "statuses": dict(r.statuses), "hit_rate": r.hit_ratio,
            "ttft_p50": r.ttft.quantile(0.5), "ttft_p90": r.ttft.quantile(0.9),
            "ttft_mean": r.ttft.mean, "output_tokens_per_s": r.tokens_per_second,
            "served_by": dict(r.served_by),
            "simulated": None if sim is None else {
                "hit_rate": sim.prefix_hit_rate, "ttft_p50": sim.ttft_p50,
                "ttft_p90": sim.ttft_p90,
            },
        }  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    (ROOT / "bench" / "results-vllm.md").write_text(table)
    (ROOT / "bench" / "results-vllm.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
