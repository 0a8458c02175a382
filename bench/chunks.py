"""The response-length axis: processor CPU per streamed response chunk (issue #26).

Envoy on envoy-pool.yaml (full-duplex request and response bodies), its pool
rewritten to one endpoint, bench/sse_backend.py, which streams every response
as K SSE events, one HTTP/2 DATA frame each (so the processor sees K response
body messages, whatever the scheduling). The processor runs alone on CPU 1
(taskset); Envoy, the backend and wrk (16 connections POSTing bench/run.py's
JSON body) share CPU 0. For each K, the variants run one after the other,
interleaved, BENCH_REPEATS times (pairs of the same run, so a noisy neighbour
hits both). Reported per variant and K: req/s, processor CPU per request
(/proc, all threads), messages per request (Envoy's ext_proc stats), and per
variant the CPU per response chunk: the slope of CPU per request against
messages per request over the K axis, least squares (what one more chunk
costs, the per-request part left out), and chunks/s per core (its inverse).

BENCH_CHUNKS=1,16,64,256 (the axis), BENCH_CHUNK_VARIANTS=compare (null,
ours, ours with the tokens cost), designs (the designs of the response loop
measured), modes (ours with Envoy's response body mode NONE), ablate (ours
with one per-chunk step off at a time: bench/ablate_serve.py), or a comma
list of the ablate set's row numbers; BENCH_BEFORE (below) adds an older
tree. Writes bench/chunks-<variants>.md. `make bench-chunks` runs compare and
ablate; `make bench` compare, `make bench-ablation` ablate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ablation import OTHERS_CPU, PROCESSOR_CPU, start_processor, thread_cpu  # noqa: E402
from processes import stop_all, wait_for_port  # noqa: E402
from run import BODY, SECONDS, wrk  # noqa: E402

from tests.support.envoy import Envoy, ext_proc_filter, pool_config  # noqa: E402
from tests.support.process import free_port  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
CHUNKS = [int(k) for k in os.environ.get("BENCH_CHUNKS", "1,16,64,256").split(",")]
CONNECTIONS = 16
STATS = "http.ingress.ext_proc."

# Envoy told not to send the response body (trailers still SEND): what the service
# costs when nothing it runs needs the body (no token cost).
RESPONSE_BODY_NONE = "workload-extproc, response_body_mode NONE"
SERVE = [
    "--listen", "{address}", "--admin-listen", "127.0.0.1:0", "--log-format", "json",
    # The backend's queue never grows: credit for requests sent since the last scrape
    # must not hold requests back here (as bench/run.py's (h)).
    "--endpoints", "{endpoint}", "--waiting-threshold", "1000000",
]  # fmt: skip
TOKENS = ["--policy", "fair-share", "--fair-share-cost", "tokens"]
ABLATE = [sys.executable, str(ROOT / "bench" / "ablate_serve.py")]
NULL = [sys.executable, str(ROOT / "bench" / "null_processor.py"), "{address}"]
VARIANT_SETS: dict[str, dict[str, list[str]]] = {
    "compare": {
        "null processor": NULL,
        "workload-extproc": [*ABLATE, "none", "--", *SERVE],
        "workload-extproc, fair-share tokens": [*ABLATE, "none", "--", *SERVE, *TOKENS],
    },
    "designs": {
        "null processor": NULL,
        "workload-extproc": [*ABLATE, "none", "--", *SERVE],
        "workload-extproc, design B (reused echo)": [*ABLATE, "reuse", "--", *SERVE],
        "workload-extproc, fair-share tokens": [*ABLATE, "none", "--", *SERVE, *TOKENS],
    },
    "modes": {
        "null processor": NULL,
        "workload-extproc": [*ABLATE, "none", "--", *SERVE],
        RESPONSE_BODY_NONE: [*ABLATE, "none", "--", *SERVE],
    },
    "ablate": {
        "null processor": NULL,
        "workload-extproc (tokens)": [*ABLATE, "none", "--", *SERVE, *TOKENS],
        "- usage scan": [*ABLATE, "usage", "--", *SERVE, *TOKENS],
        "- served-endpoint check": [*ABLATE, "served", "--", *SERVE, *TOKENS],
        "- first-byte check": [*ABLATE, "firstbyte", "--", *SERVE, *TOKENS],
        "- metrics and log": [*ABLATE, "metrics,log", "--", *SERVE, *TOKENS],
        "- echo build (one prebuilt answer)": [*ABLATE, "echo", "--", *SERVE, *TOKENS],
        "- all of the above": [
            *ABLATE,
            "usage,served,firstbyte,metrics,log,echo",
            "--",
            *SERVE,
            *TOKENS,
        ],
        "- the whole handler (null loop in our server)": [*ABLATE, "handler", "--", *SERVE],
    },
}


@dataclass(frozen=True)
class Sample:
    rps: float
    us_per_request: float
    share_of_core: float
    messages_per_request: float
    errors: float


# BENCH_BEFORE=DIR: also run workload-extproc from an older tree's extproc package
# (e.g. `git archive main extproc | tar -x -C DIR`, plus the generated api/v1 modules),
# in the same run, interleaved.
BEFORE = os.environ.get("BENCH_BEFORE")
if BEFORE:
    # ablate-before: every ablate row on that tree, this tree's workload-extproc added.
    VARIANT_SETS["ablate-before"] = {
        name: command if command is NULL else ["env", f"PYTHONPATH={BEFORE}", *command]
        for name, command in VARIANT_SETS["ablate"].items()
    }
    VARIANT_SETS["ablate-before"]["workload-extproc (tokens), after: this tree"] = [
        *ABLATE,
        "none",
        "--",
        *SERVE,
        *TOKENS,
    ]
    for name in ("compare", "designs", "modes"):
        VARIANT_SETS[name]["workload-extproc before (BENCH_BEFORE)"] = [
            "env",
            f"PYTHONPATH={BEFORE}",
            *ABLATE,
            "none",
            "--",
            *SERVE,
        ]


def backend_h2(config: dict[str, object]) -> dict[str, object]:
    """The pool cluster speaks HTTP/2 to the backend, one DATA frame per SSE event."""
    for cluster in config["static_resources"]["clusters"]:  # type: ignore[index]
        if cluster["name"] == "pool":
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
    return config


async def start_backend(port: int, chunks: int) -> asyncio.subprocess.Process:
    backend = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "sse_backend.py"), str(port), str(chunks),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await wait_for_port(port)
    return backend


async def measure(command: list[str], chunks: int, body_none: bool = False) -> Sample:
    backend_port, processor_port = free_port(), free_port()
    backend = await start_backend(backend_port, chunks)
    processor = await start_processor(
        ["taskset", "-c", str(PROCESSOR_CPU)], command, processor_port, backend_port
    )
    try:
        await wait_for_port(processor_port)
        config = backend_h2(pool_config(processor_port, [backend_port]))
        if body_none:
            ext_proc_filter(config)["processing_mode"]["response_body_mode"] = "NONE"
        proxy = Envoy(config, concurrency=1)
        await proxy.start()
        url = f"http://127.0.0.1:{proxy.port}/"
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, wrk, url, CONNECTIONS, 0.0, BODY, 2)  # warm up
            stats = await proxy.stats(STATS)
            before = sum(thread_cpu(processor.pid).values())
            result = await loop.run_in_executor(None, wrk, url, CONNECTIONS, 0.0, BODY)
            used = sum(thread_cpu(processor.pid).values()) - before
            after = await proxy.stats(STATS)
        finally:
            await proxy.stop()
    finally:
        await stop_all(processor, backend)
    requests = result["requests"]
    streams = after[STATS + "streams_started"] - stats[STATS + "streams_started"]
    sent = after[STATS + "stream_msgs_sent"] - stats[STATS + "stream_msgs_sent"]
    return Sample(
        result["rps"],
        used / requests * 1e6,
        used / SECONDS,
        sent / max(streams, 1),
        result["errors"],
    )


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def render(results: dict[tuple[str, int], list[Sample]], variants: list[str]) -> str:
    null = variants[0]
    lines = [
        "| variant | K | msgs/req | req/s | vs null | CPU us/req | vs null | core busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in CHUNKS:
        base = results[(null, k)]
        null_rps = statistics.median(s.rps for s in base)
        null_us = statistics.median(s.us_per_request for s in base)
        for name in variants:
            samples = results[(name, k)]
            rps = statistics.median(s.rps for s in samples)
            us = statistics.median(s.us_per_request for s in samples)
            spread = f"{min(s.us_per_request for s in samples):.0f}-" + (
                f"{max(s.us_per_request for s in samples):.0f}"
            )
            row = [
                name,
                str(k),
                f"{statistics.median(s.messages_per_request for s in samples):.1f}",
                f"{rps:,.0f}",
                f"{rps / null_rps:.2f}",
                f"{us:,.0f} ({spread})",
                f"{us / null_us:.2f}x",
                f"{statistics.median(s.share_of_core for s in samples):.0%}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| variant | CPU us per response chunk (slope) | vs null | chunks/s per core | "
        f"CPU us per request beside the chunks | CPU us per message at K={CHUNKS[-1]} | vs null |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    null_slope = null_message = 0.0
    for name in variants:
        points = [
            (s.messages_per_request, s.us_per_request) for k in CHUNKS for s in results[(name, k)]
        ]
        fixed, per_chunk = slope(points)
        null_slope = null_slope or per_chunk
        longest = results[(name, CHUNKS[-1])]
        per_message = statistics.median(s.us_per_request / s.messages_per_request for s in longest)
        null_message = null_message or per_message
        spread = max(x for x, _ in points) - min(x for x, _ in points)
        if spread >= 1:  # a slope needs messages that grow with K (not: response body NONE)
            fitted = [
                f"{per_chunk:.1f}",
                f"{per_chunk / null_slope:.2f}x",
                f"{1e6 / per_chunk:,.0f}",
            ]
            fitted.append(f"{fixed:,.0f}")
        else:
            fitted = ["-"] * 4
        row = [name, *fitted, f"{per_message:.1f}", f"{per_message / null_message:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


async def main() -> int:
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs: one for the processor, one for the rest")
        return 1
    os.sched_setaffinity(0, {OTHERS_CPU})
    chosen = os.environ.get("BENCH_CHUNK_VARIANTS", "compare")
    if chosen in VARIANT_SETS:
        variants = VARIANT_SETS[chosen]
    else:  # row numbers of the ablate set, the null processor always first
        rows = list(VARIANT_SETS["ablate"].items())
        variants = dict([rows[0]] + [rows[int(n) - 1] for n in chosen.split(",") if n != "1"])
        chosen = "ablate-" + chosen.replace(",", "-")
    results: dict[tuple[str, int], list[Sample]] = {}
    loads = []
    for repeat in range(REPEATS):
        for k in CHUNKS:
            for name, command in variants.items():
                loads.append(os.getloadavg()[0])
                sample = await measure(command, k, name == RESPONSE_BODY_NONE)
                results.setdefault((name, k), []).append(sample)
                print(f"run {repeat + 1}: K={k} {name}: {sample}", flush=True)
    table = render(results, list(variants))
    intro = (
        f"Processor on CPU {PROCESSOR_CPU} alone; Envoy (envoy-pool.yaml, HTTP/2 to the "
        f"backend), bench/sse_backend.py and wrk ({CONNECTIONS} connections) on CPU "
        f"{OTHERS_CPU}; median of {REPEATS} interleaved runs of {SECONDS} s (spread of CPU "
        f"us/req in brackets); load average {min(loads):.1f}-{max(loads):.1f} before the runs.\n\n"
    )
    (ROOT / "bench" / f"chunks-{chosen}.md").write_text(intro + table)
    print(intro + table)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
