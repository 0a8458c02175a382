"""`make bench-ablation`: where a request's processor CPU goes, step by step.

The processor runs alone on CPU 1 (taskset); Envoy, the `direct_response`
backend and wrk share CPU 0. For each variant -- the null processor,
workload-extproc as shipped, and workload-extproc with one per-request step
switched off at a time (bench/ablate_serve.py) -- wrk saturates the proxy and
the processor's CPU is read from /proc before and after, for the whole process
and per thread (main = the asyncio loop; grpc-core's poller and event-engine
threads by name). Median of BENCH_REPEATS runs of BENCH_SECONDS. Writes
bench/ablation.md. Where the processor's core is not saturated (its CPU share
stays well below 100%), req/s says more about CPU 0 than about the processor,
and CPU per request is the figure to read.

BENCH_ABLATION_MODE=pool measures pool mode instead (issue #14's target): Envoy
on envoy-pool.yaml, POSTing bench/run.py's JSON body, the backend the pool's one
endpoint; the null processor echoes every chunk (full-duplex), and the variants
add `--endpoints`. Writes bench/ablation-pool.md.
"""

from __future__ import annotations

import asyncio
import collections
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from processes import wait_for_port  # noqa: E402
from run import BODY, LUA, SECONDS, TICKS, backend_config, proxy_config, wrk  # noqa: E402

from tests.support.envoy import Envoy, pool_config  # noqa: E402
from tests.support.process import free_port  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
PROCESSOR_CPU = 1
OTHERS_CPU = 0

POOL = os.environ.get("BENCH_ABLATION_MODE", "trailer") == "pool"
SERVE = ["--listen", "{address}", "--admin-listen", "127.0.0.1:0", "--log-format", "json"]
if POOL:
    # As bench/run.py's (h): the direct_response backend's queue never grows.
    SERVE += ["--endpoints", "{endpoint}", "--waiting-threshold", "1000000"]
ABLATE = [sys.executable, str(ROOT / "bench" / "ablate_serve.py")]
VARIANTS: dict[str, list[str]] = {
    "null processor": [sys.executable, str(ROOT / "bench" / "null_processor.py"), "{address}"],
    "workload-extproc as shipped": [*ABLATE, "none", "--", *SERVE],
    "- request log line": [*ABLATE, "log", "--", *SERVE],
    "- Prometheus updates": [*ABLATE, "metrics", "--", *SERVE],
    "- registry tracking": [*ABLATE, "registry", "--", *SERVE],
    "- queue": [*ABLATE, "queue", "--", *SERVE],
    "- header mutation": [*ABLATE, "mutation", "--", *SERVE],
    "- cyclic GC": [*ABLATE, "gc", "--", *SERVE],
    "- all of the above": [*ABLATE, "log,metrics,registry,queue,mutation,gc", "--", *SERVE],
    "- the whole handler (null loop in our server)": [*ABLATE, "handler", "--", *SERVE],
}
VARIANTS["as shipped, GIL switch interval 50 ms"] = [*ABLATE, "switch", "--", *SERVE]
if POOL:
    VARIANTS |= {
        "- the endpoint pick": [*ABLATE, "pick", "--", *SERVE],
    }


@dataclass(frozen=True)
class Sample:
    rps: float
    us_per_request: float
    share_of_core: float
    threads_us: dict[str, float]
    switches_per_request: float


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of all the process's threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
    return total


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread group: main, poller, event engine, other."""
    groups: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICKS
        groups[_group(task.name == str(pid), name)] += seconds
    return dict(groups)


def _group(is_main: bool, name: str) -> str:
    if is_main:
        return "main"
    lowered = name.lower()
    if "poll" in lowered:
        return "poller"
    if "event" in lowered or "ee" in lowered:
        return "event engine"
    return f"other ({name})"


async def start_processor(
    prefix: list[str], command: list[str], processor_port: int, backend_port: int
) -> asyncio.subprocess.Process:
    """`command` (its {address} and {endpoint} filled in) run under `prefix`."""
    argv = [
        c.replace("{address}", f"127.0.0.1:{processor_port}").replace(
            "{endpoint}", f"127.0.0.1:{backend_port}"
        )
        for c in command
    ]
    return await asyncio.create_subprocess_exec(
        *prefix, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def measure(command: list[str]) -> Sample:
    backend_port, processor_port = free_port(), free_port()
    backend = Envoy(backend_config(backend_port), concurrency=1)
    await backend.start()
    processor = await start_processor(
        ["taskset", "-c", str(PROCESSOR_CPU)], command, processor_port, backend_port
    )
    try:
        await wait_for_port(processor_port)
        if POOL:
            config = pool_config(processor_port, [backend_port])
        else:
            config = proxy_config([processor_port], backend_port, True)
        proxy = Envoy(config, concurrency=1)
        await proxy.start()
        url = f"http://127.0.0.1:{proxy.port}/"
        body = BODY if POOL else ""
        try:
            wrk(url, 16, 0.0, body)  # warm up
            before, switches = thread_cpu(processor.pid), context_switches(processor.pid)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, wrk, url, 64, 0.0, body)
            after, switches = thread_cpu(processor.pid), context_switches(processor.pid) - switches
        finally:
            await proxy.stop()
    finally:
        processor.terminate()
        await processor.wait()
        await backend.stop()
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    requests = result["requests"]
    return Sample(
        result["rps"],
        sum(used.values()) / requests * 1e6,
        sum(used.values()) / SECONDS,
        {k: v / requests * 1e6 for k, v in used.items()},
        switches / requests,
    )


def render(results: dict[str, list[Sample]]) -> str:
    null = statistics.median(
        s.us_per_request for s in results.get("null processor", next(iter(results.values())))
    )
    groups = sorted({g for samples in results.values() for s in samples for g in s.threads_us})
    header = ["variant", "req/s", "CPU us/req", "vs null", "core busy", "switches/req", *groups]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, samples in results.items():
        us = statistics.median(s.us_per_request for s in samples)
        per_group = [
            f"{statistics.median(s.threads_us.get(g, 0.0) for s in samples):.0f}" for g in groups
        ]
        row = [
            name,
            f"{statistics.median(s.rps for s in samples):,.0f}",
            f"{us:.0f}",
            f"{us / null:.2f}x",
            f"{statistics.median(s.share_of_core for s in samples):.0%}",
            f"{statistics.median(s.switches_per_request for s in samples):.1f}",
            *per_group,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


async def main() -> int:
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs: one for the processor, one for the rest")
        return 1
    # Envoy, the backend and wrk are our children and inherit CPU 0; the
    # processor is started under `taskset` on CPU 1.
    os.sched_setaffinity(0, {OTHERS_CPU})
    # BENCH_ABLATION_ONLY=1,2,9: the variants by their row numbers, to re-measure a few.
    only = os.environ.get("BENCH_ABLATION_ONLY")
    rows = list(VARIANTS.items())
    if only:
        rows = [rows[int(n) - 1] for n in only.split(",")]
    results: dict[str, list[Sample]] = {name: [] for name, _ in rows}
    for repeat in range(REPEATS):
        for name, command in rows:
            sample = await measure(command)
            results[name].append(sample)
            print(f"run {repeat + 1}: {name}: {sample}", flush=True)
    table = render(results)
    intro = (
        f"{'Pool mode (envoy-pool.yaml, JSON body). ' if POOL else ''}"
        f"Processor on CPU {PROCESSOR_CPU} alone; Envoy, backend and wrk (64 connections, "
        f"{LUA.name}) on CPU {OTHERS_CPU}; median of {REPEATS} runs of {SECONDS} s.\n\n"
    )
    name = "ablation-pool.md" if POOL else "ablation.md"
    (ROOT / "bench" / name).write_text(intro + table)
    print(intro + table)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
