"""`make bench`, part two: the three capacity gates in front of one model server.

The scenario of issue #17: the demo model server (4 slots, 200 ms per request,
vLLM's gauges on /metrics) behind the bundled Envoy and workload-extproc with
--max-concurrency 64, 40 clients sending back to back for BENCH_CAPACITY_SECONDS
(10) -- once per gate: `static` (the limit alone: the server holds the
backlog), `metrics --waiting-threshold 2` and `adaptive`. The server and the
service run in their own processes; the clients and the sampler (the server's
own running/waiting gauges every 50 ms) in this one. Writes
bench/results-capacity.json and bench/results-capacity.md. `make bench` runs it
after the proxy comparison; `python bench/run.py capacity` runs it alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.processes import processors  # noqa: E402
from tests.support.demo_stack import TOKENS, flood  # noqa: E402
from tests.support.envoy import Envoy, bundled_config  # noqa: E402

SECONDS = float(os.environ.get("BENCH_CAPACITY_SECONDS", "10"))
SLOTS = 4
DURATION = 0.2
THRESHOLD = 2
CLIENTS = 40
GATES = {
    "`--capacity static`": ["--capacity", "static"],
    f"`--capacity metrics --waiting-threshold {THRESHOLD}`": [
        "--capacity", "metrics", "--waiting-threshold", str(THRESHOLD),
        "--backend-metrics-url", "{metrics}",
    ],
    "`--capacity adaptive`": ["--capacity", "adaptive"],
}  # fmt: skip


@dataclass(frozen=True)
class GateRun:
    gate: str
    served: int
    other_statuses: dict[int, int]
    rps: float
    busy: float
    waiting_mean: float
    waiting_peak: float


async def run_gate(name: str, flags: list[str]) -> GateRun:
    python = sys.executable
    backend = [
        python, "-m", "extproc", "demo-backend", "--listen", "{address}",
        "--concurrency", str(SLOTS), "--prefix-cache-blocks", "0",
        "--first-token", str(DURATION / TOKENS), "--inter-token", str(DURATION / TOKENS),
    ]  # fmt: skip
    async with processors(backend, 1) as ([backend_port], _):
        metrics = f"http://127.0.0.1:{backend_port}/metrics"
        service = [
            python, "-m", "extproc", "serve", "--listen", "{address}",
            "--admin-listen", "127.0.0.1:0", "--max-concurrency", "64", "--log-level", "warning",
            *(flag.replace("{metrics}", metrics) for flag in flags),
        ]  # fmt: skip
        async with processors(service, 1) as ([service_port], _):
            envoy = Envoy(bundled_config(service_port, backend_port))
            await envoy.start()
            try:
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as http:
                    result = await flood(http, envoy.port, backend_port, CLIENTS, SECONDS)
            finally:
                await envoy.stop()
    others = {code: n for code, n in result.statuses.items() if code != 200}
    return GateRun(
        name,
        result.served,
        others,
        result.served / result.elapsed,
        result.busy(),
        result.mean_waiting(),
        max(result.waiting),
    )


async def compare_gates() -> list[GateRun]:
    runs = []
    for name, flags in GATES.items():
        run = await run_gate(name, flags)
        print(f"capacity: {run}", flush=True)
        runs.append(run)
    return runs


def render(runs: list[GateRun]) -> str:
    static = runs[0].rps
    lines = [
        f"One demo model server ({SLOTS} slots, {DURATION * 1000:.0f} ms per request), "
        f"{CLIENTS} clients for {SECONDS:.0f} s, --max-concurrency 64; the server's own "
        "gauges sampled every 50 ms.",
        "",
        "| gate | requests served (all 200) | req/s, vs static | slots busy (mean of 4) "
        "| waiting inside the server (mean / peak) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        served = f"{run.served}" + (f" (+ {run.other_statuses})" if run.other_statuses else "")
        lines.append(
            f"| {run.gate} | {served} | {run.rps:.1f}, {run.rps / static:.0%} "
            f"| {run.busy:.2f} | {run.waiting_mean:.1f} / {run.waiting_peak:.0f} |"
        )
    return "\n".join(lines) + "\n"


async def main() -> int:
    runs = await compare_gates()
    static, metrics = runs[0], runs[1]
    summary = {
        "seconds": SECONDS,
        "runs": [asdict(run) for run in runs],
        "metrics_over_static_rps": metrics.rps / static.rps,
    }
    (ROOT / "bench" / "results-capacity.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = render(runs)
    (ROOT / "bench" / "results-capacity.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
