"""`make bench`: what workload-extproc costs on the request path, next to the bare minimum.

One run, one machine, one Envoy build and the same processing modes:
  (a) Envoy alone (no ext_proc filter);
  (b) Envoy + a do-nothing grpc.aio processor (bench/null_processor.py);
  (c) Envoy + workload-extproc, capacity unlimited, 20 workloads;
  (d) the same with --max-concurrency 4, so requests queue;
  (e) as (c) with the shared registry on a local redis-server (--registry redis://);
  (f) two replicas of (e), both in Envoy's ext_proc cluster;
  (g) Envoy on envoy/envoy-pool.yaml (full-duplex bodies, override-host
      routing) + the null processor, which echoes every body chunk;
  (h) the same Envoy + workload-extproc as the endpoint picker of a
      one-endpoint pool (pool mode: body read, endpoint picked, chunks echoed).
(g) and (h) POST a small OpenAI-style JSON body; the others GET.
BENCH_ONLY=gh runs only the named setups (results-gh.json/.md).
The backend is a second Envoy answering with `direct_response`, so it is never
the bottleneck. For each: requests/s at saturation (wrk, 64 connections),
p50/p99 latency at 25% of (b)'s saturation rate (wrk paced per connection), and
the processors' CPU-seconds per 1,000 requests. Each measurement is repeated
and the median reported. Writes bench/results.json and bench/results.md. Then
the capacity gates' comparison (bench/capacity.py; `run.py capacity` for it alone).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import capacity  # noqa: E402
from bench.processes import processors  # noqa: E402
from tests.support.envoy import Envoy, bundled_config, pool_config  # noqa: E402
from tests.support.process import free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
LUA = ROOT / "bench" / "workloads.lua"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    name: str
    saturation_rps: float
    p50_ms: float
    p99_ms: float
    cpu_seconds_per_1000: float | None


def backend_config(port: int) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "backend",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "ok",
                    "domains": ["*"],
                    "routes": [
                        {
                            # A model server's metrics page, for pool mode's scrapes.
                            "match": {"path": "/metrics"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": "vllm:num_requests_waiting 0\n"},
                            },
                        },
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        },
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "backend",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def proxy_config(ports: list[int], backend_port: int, with_ext_proc: bool) -> dict[str, Any]:
    config = bundled_config(ports[0], backend_port, *ports[1:])
    if not with_ext_proc:
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        filters = manager["typed_config"]["http_filters"]
        manager["typed_config"]["http_filters"] = [
            f for f in filters if "ext_proc" not in f["name"]
        ]
    return config


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


BODY = '{"model": "m", "prompt": "Say something about fair queuing.", "max_tokens": 16}'


def wrk(
    url: str, connections: int, delay_ms: float = 0.0, body: str = "", seconds: int = SECONDS
) -> dict[str, float]:
    env = {**os.environ, "WRK_DELAY_MS": f"{delay_ms:.3f}", "WRK_BODY": body}
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    output = subprocess.run(
        [*command, "-s", str(LUA), url], capture_output=True, text=True, env=env, check=True
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    for percent in ("50", "99"):
        value, unit = re.search(rf"\s{percent}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        result[f"p{percent}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


@dataclass(frozen=True)
class Setup:
    name: str
    command: list[str] | None
    with_ext_proc: bool = True
    replicas: int = 1
    pool: bool = False
    """envoy-pool.yaml with the backend as the pool's one endpoint; POST with BODY."""


async def measure(setup: Setup, paced_rps: float | None) -> tuple[Measurement, float]:
    backend_port = free_port()
    backend = Envoy(backend_config(backend_port), concurrency=1)
    await backend.start()
    try:
        command = setup.command and [
            c.replace("{endpoint}", f"127.0.0.1:{backend_port}") for c in setup.command
        ]
        async with processors(command, setup.replicas) as (ports, pids):
            if setup.pool:
                config = pool_config(ports[0], [backend_port])
            else:
                config = proxy_config(ports, backend_port, setup.with_ext_proc)
            proxy = Envoy(config, concurrency=1)
            await proxy.start()
            url = f"http://127.0.0.1:{proxy.port}/"
            body = BODY if setup.pool else ""
            try:
                wrk(url, 16, 0.0, body)  # warm up
                before = cpu_seconds(pids)
                loop = asyncio.get_running_loop()
                saturated = await loop.run_in_executor(None, wrk, url, 64, 0.0, body)
                cpu = cpu_seconds(pids) - before
                target = paced_rps or saturated["rps"] * 0.25
                connections = 10
                delay = max(connections * 1000 / target - 1.0, 0.0)
                paced = await loop.run_in_executor(None, wrk, url, connections, delay, body)
            finally:
                await proxy.stop()
    finally:
        await backend.stop()
    per_1000 = cpu / saturated["requests"] * 1000 if pids else None
    measurement = Measurement(setup.name, saturated["rps"], paced["p50"], paced["p99"], per_1000)
    return measurement, saturated["errors"]


def median(runs: list[Measurement]) -> Measurement:
    cpu = [r.cpu_seconds_per_1000 for r in runs if r.cpu_seconds_per_1000 is not None]
    return Measurement(
        runs[0].name,
        statistics.median(r.saturation_rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        statistics.median(cpu) if cpu else None,
    )


async def main(only: list[str]) -> int:
    """The proxy comparison, then the capacity gates' (bench/capacity.py); `capacity`: them only."""
    if only != ["capacity"]:
        redis = RedisServer()
        await redis.start()
        try:
            await compare(redis.url)
        finally:
            await redis.close()
    if os.environ.get("BENCH_ONLY"):
        return 0  # a partial proxy run: the capacity comparison stays as it was
    return await capacity.main()


async def compare(redis_url: str) -> int:
    python = sys.executable
    extproc = [
        python,
        "-m",
        "extproc",
        "serve",
        "--listen",
        "{address}",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    shared = [*extproc, "--registry", redis_url, "--registry-prefix", "bench"]
    setups = {
        "a": Setup("(a) Envoy alone", None, with_ext_proc=False),
        "b": Setup(
            "(b) Envoy + null processor",
            [python, str(ROOT / "bench" / "null_processor.py"), "{address}"],
        ),
        "c": Setup("(c) Envoy + workload-extproc", extproc),
        "d": Setup(
            "(d) workload-extproc, --max-concurrency 4", [*extproc, "--max-concurrency", "4"]
        ),
        "e": Setup("(e) workload-extproc, --registry redis", shared),
        "f": Setup("(f) two replicas, --registry redis", shared, replicas=2),
        "g": Setup(
            "(g) envoy-pool.yaml + null full-duplex processor",
            [python, str(ROOT / "bench" / "null_processor.py"), "{address}"],
            pool=True,
        ),
        "h": Setup(
            "(h) envoy-pool.yaml + workload-extproc, pool mode",
            # The bench backend answers at once: its queue never grows, so credit for
            # requests sent since the last scrape must not hold requests back here.
            [*extproc, "--endpoints", "{endpoint}", "--waiting-threshold", "1000000"],
            pool=True,
        ),
    }
    only = os.environ.get("BENCH_ONLY")
    if only:
        setups = {key: setup for key, setup in setups.items() if key in only}
    runs: dict[str, list[Measurement]] = {key: [] for key in setups}
    paced_rps: float | None = None
    for repeat in range(REPEATS):
        for key, setup in setups.items():
            measurement, errors = await measure(setup, paced_rps)
            if key in "bg" and paced_rps is None:
                paced_rps = measurement.saturation_rps * 0.25
            runs[key].append(measurement)
            print(f"run {repeat + 1}: {measurement} non-2xx={errors:.0f}", flush=True)
    results = {key: median(r) for key, r in runs.items()}
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "seconds_per_measurement": SECONDS,
        "repeats": REPEATS,
        "paced_rps": paced_rps,
        "results": {k: asdict(v) for k, v in results.items()},
    }
    if set("abcde") <= set(results):
        a, b, c, d, e = (results[k] for k in "abcde")
        summary |= {
            "c_over_b_rps": c.saturation_rps / b.saturation_rps,
            "c_minus_a_p50_ms": c.p50_ms - a.p50_ms,
            "d_rps": d.saturation_rps,
            "e_over_c_rps": e.saturation_rps / c.saturation_rps,
            "e_minus_c_p50_ms": e.p50_ms - c.p50_ms,
        }
    if set("gh") <= set(results):
        g, h = results["g"], results["h"]
        summary |= {
            "h_over_g_rps": h.saturation_rps / g.saturation_rps,
            "h_minus_g_p50_ms": h.p50_ms - g.p50_ms,
        }
    # A partial run (BENCH_ONLY) must not overwrite the full results.
    stem = f"results-{only}" if only else "results"
    (ROOT / "bench" / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = render(summary, results)
    (ROOT / "bench" / f"{stem}.md").write_text(table)
    print(table)
    return 0


def render(summary: dict[str, Any], results: dict[str, Measurement]) -> str:
    lines = [
        f"Machine: {summary['machine']}; Python {summary['python']}; "
        f"median of {summary['repeats']} runs of {summary['seconds_per_measurement']} s; "
        f"latency at {summary['paced_rps']:.0f} req/s (25% of (b)).",
        "",
        "| setup | req/s at saturation | p50 ms | p99 ms | processor CPU-s per 1,000 req |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in results.values():
        cpu = f"{m.cpu_seconds_per_1000:.3f}" if m.cpu_seconds_per_1000 is not None else "-"
        lines.append(
            f"| {m.name} | {m.saturation_rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {cpu} |"
        )
    if "c_over_b_rps" in summary:
        lines += [
            "",
            f"(c) reaches {summary['c_over_b_rps']:.0%} of (b)'s requests/s; its p50 is "
            f"{summary['c_minus_a_p50_ms']:+.2f} ms from (a)'s. The Redis registry (e) runs at "
            f"{summary['e_over_c_rps']:.0%} of (c)'s requests/s, p50 "
            f"{summary['e_minus_c_p50_ms']:+.2f} ms.",
        ]
    if "h_over_g_rps" in summary:
        lines += [
            "",
            f"Pool mode (h) reaches {summary['h_over_g_rps']:.0%} of the null full-duplex "
            f"processor's (g) requests/s (target >= 85%); p50 "
            f"{summary['h_minus_g_p50_ms']:+.2f} ms.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
