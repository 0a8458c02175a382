"""`make demo-fairness`: a flooding tenant against a light one, as users measure it.

The bundled Envoy + workload-extproc (`--max-concurrency 4`) in front of the
demo model server (4 slots, 20 tokens of 0.1 s each), once with
`--policy fcfs` and once with `--policy fair-share`. Two tenants, each an
official `openai` SDK client (AsyncOpenAI, streamed chat completions, the
workload header as a default header):
  flood -- 32 streams back to back (a closed loop: it always wants more);
  light -- one request per second (an open loop: it wants little).
Per tenant: time to first token p50/p99, inter-token latency (mean of each
request's gaps) and output tokens per second, from the SDK's stream as the
client sees it. The light tenant sends for DEMO_SECONDS; the flood keeps on
until the light tenant's last answer is in, then is cancelled.

Why a script and not aiperf or guidellm: both install here, but both need a
tokenizer from a model hub to build their prompts (aiperf's `--tokenizer
builtin` downloads tiktoken's encoding; guidellm loads a Hugging Face
tokenizer) and this machine has no hub access; neither runs two tenants with
different headers in one measurement either.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.stats import percentile  # noqa: E402
from tests.support.envoy import Envoy, bundled_config  # noqa: E402
from tests.support.process import ServeProcess, free_port  # noqa: E402

SECONDS = float(os.environ.get("DEMO_SECONDS", "30"))
FLOOD_STREAMS = 32
LIGHT_INTERVAL = 1.0
MAX_TOKENS = 20
PROMPT = "Summarise the fairness of this queue in twenty words. " * 8


@dataclass
class Tenant:
    name: str
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    first_sent: float = 0.0
    last_done: float = 0.0

    def row(self) -> str:
        seconds = max(self.last_done - self.first_sent, 1e-9)
        return (
            f"| {self.name} | {len(self.ttft)} | {percentile(self.ttft, 50):.2f} "
            f"| {percentile(self.ttft, 99):.2f} | {statistics.fmean(self.itl) * 1000:.0f} "
            f"| {self.tokens / seconds:.1f} |"
        )


async def one_request(client: openai.AsyncOpenAI, tenant: Tenant) -> None:
    sent = time.perf_counter()
    tenant.first_sent = tenant.first_sent or sent
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    arrivals: list[float] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    if not arrivals:
        return
    tenant.ttft.append(arrivals[0] - sent)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    if gaps:
        tenant.itl.append(statistics.fmean(gaps))
    tenant.tokens += len(arrivals)
    tenant.last_done = arrivals[-1]


def client(base_url: str, workload: str) -> openai.AsyncOpenAI:
    context = json.dumps({"workload_id": workload, "criticality": 3})
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=300,
        default_headers={"x-workload-context": context},
    )  # fmt: skip


async def drive(base_url: str) -> tuple[Tenant, Tenant]:
    flood, light = Tenant("flood"), Tenant("light")
    flooder = client(base_url, "flood")

    async def flood_loop() -> None:
        while True:
            await one_request(flooder, flood)

    streams = [asyncio.create_task(flood_loop()) for _ in range(FLOOD_STREAMS)]
    await asyncio.sleep(2.0)  # the flood has filled the queue
    lighter = client(base_url, "light")
    sends: list[asyncio.Task[None]] = []
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        sends.append(asyncio.create_task(one_request(lighter, light)))
        await asyncio.sleep(LIGHT_INTERVAL)
    await asyncio.gather(*sends)
    for stream in streams:
        stream.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    return flood, light


async def run_policy(policy: str) -> tuple[Tenant, Tenant]:
    backend_port, grpc_port = free_port(), free_port()
    backend = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "demo-backend", "--listen",
        f"127.0.0.1:{backend_port}", "--concurrency", "4", "--max-tokens", str(MAX_TOKENS),
    )  # fmt: skip
    service = ServeProcess(
        "--listen", f"127.0.0.1:{grpc_port}", "--max-concurrency", "4", "--policy", policy,
    )  # fmt: skip
    envoy = Envoy(bundled_config(grpc_port, backend_port))
    try:
        await wait_ready(f"http://127.0.0.1:{backend_port}/health")
        await service.start()
        await envoy.start()
        return await drive(f"http://127.0.0.1:{envoy.port}/v1")
    finally:
        await envoy.stop()
        if service.running:
            await service.terminate()
        backend.terminate()
        await backend.wait()


async def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=1).read())
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def main() -> None:
    print(
        f"flood: {FLOOD_STREAMS} streams back to back; light: one request every "
        f"{LIGHT_INTERVAL:g} s for {SECONDS:g} s; {MAX_TOKENS} tokens each; "
        "4 slots in the model server, --max-concurrency 4\n"
    )
    print("| policy | tenant | requests | TTFT p50 s | TTFT p99 s | ITL ms | output tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for policy in ("fcfs", "fair-share"):
        for tenant in await run_policy(policy):
            print(f"| {policy} {tenant.row()}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
