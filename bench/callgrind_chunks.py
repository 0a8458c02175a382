"""Instructions per streamed response chunk, counted by callgrind: load-independent.

On a shared machine the CPU time of bench/chunks.py moves by +-10-20% from run
to run, more than most per-chunk steps cost. Instructions do not: this runs
each processor variant under `valgrind --tool=callgrind` (instrumentation off
until warmed up), sends REQUESTS requests one after another through Envoy
(envoy-pool.yaml, HTTP/2 to bench/sse_backend.py) for K = 1 and K = KMAX, and
reads the instructions executed by the whole process (all threads) over those
requests. Per chunk: (Ir at KMAX - Ir at 1) / (KMAX - 1) / REQUESTS. Counts
instructions, not time: what the GIL and context switches add (time the
processor spends waiting or re-scheduling) is not in it. Scrapes run every 60 s
here, so a slower run does not do more of them.

Usage: callgrind_chunks.py [VARIANT ...]   (names from bench/chunks.py's ablate
set; BENCH_BEFORE as there; default: all). Writes bench/callgrind-chunks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ablation import start_processor  # noqa: E402
from chunks import VARIANT_SETS, backend_h2, start_backend  # noqa: E402
from processes import stop_all, wait_for_port  # noqa: E402
from run import BODY  # noqa: E402

from tests.support.envoy import Envoy, pool_config  # noqa: E402
from tests.support.process import free_port  # noqa: E402

REQUESTS = int(os.environ.get("BENCH_CALLGRIND_REQUESTS", "20"))
KMAX = int(os.environ.get("BENCH_CALLGRIND_K", "64"))
SLOW = ["--endpoint-scrape-interval", "60"]


async def post_all(url: str, count: int) -> None:
    headers = {"content-type": "application/json", "x-gateway-inference-fairness-id": "w1"}
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            async with http.post(url, data=BODY, headers=headers) as reply:
                assert reply.status == 200, reply.status
                await reply.read()


def total_ir(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def instructions(command: list[str], chunks: int) -> int:
    """Instructions the processor executes over REQUESTS requests of `chunks` chunks."""
    backend_port, processor_port = free_port(), free_port()
    backend = await start_backend(backend_port, chunks)
    out = Path(tempfile.mkdtemp(prefix="callgrind-"))
    slow = SLOW if "--endpoints" in command else []
    # `env NAME=VALUE python ...` execs into valgrind, so the pid stays the same.
    split = next(i for i, c in enumerate(command) if c != "env" and "=" not in c)
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    valgrind.append(f"--callgrind-out-file={out}/cg.%p")
    processor = await start_processor(
        [*command[:split], *valgrind], [*command[split:], *slow], processor_port, backend_port
    )
    try:
        for attempt in range(8):  # valgrind starts slowly
            try:
                await wait_for_port(processor_port)
                break
            except RuntimeError:
                if attempt == 7:
                    raise
        config = backend_h2(pool_config(processor_port, [backend_port], message_timeout="60s"))
        proxy = Envoy(config, concurrency=1)
        await proxy.start()
        url = f"http://127.0.0.1:{proxy.port}/v1/completions"
        try:
            await post_all(url, 5)  # warm up, uninstrumented
            pid = processor.pid
            _control("-i", "on", pid)
            await post_all(url, 2)  # warm up the instrumented code
            _control("-z", pid)
            await post_all(url, REQUESTS)
            _control("-d", pid)
        finally:
            await proxy.stop()
    finally:
        await stop_all(processor, backend)
    return _dumped(out)


def _dumped(out: Path) -> int:
    """Ir of the one dump asked for (cg.PID.1; cg.PID is the dump at exit)."""
    (dump,) = [p for p in out.glob("cg.*") if p.name.count(".") > 1]
    return total_ir(dump)


def _control(*args: object) -> None:
    subprocess.run(
        ["callgrind_control", *map(str, args)], check=True, capture_output=True, timeout=120
    )


async def main(names: list[str]) -> int:
    variants = VARIANT_SETS["ablate-before" if "BENCH_BEFORE" in os.environ else "ablate"]
    chosen = {n: c for n, c in variants.items() if not names or n in names}
    results = {}
    for name, command in chosen.items():
        per_k = {k: await instructions(command, k) / REQUESTS for k in (1, KMAX)}
        results[name] = per_k
        print(name, json.dumps(per_k), flush=True)
    null = next(iter(results.values()))
    null_chunk = (null[KMAX] - null[1]) / (KMAX - 1)
    lines = [
        f"Instructions (callgrind, whole process) per request of K chunks, {REQUESTS} "
        f"requests one at a time; per chunk = (K={KMAX} - K=1) / {KMAX - 1}.",
        "",
        f"| variant | Ir/request K=1 | vs null | Ir/request K={KMAX} | Ir per chunk | vs null |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, per_k in results.items():
        chunk = (per_k[KMAX] - per_k[1]) / (KMAX - 1)
        lines.append(
            f"| {name} | {per_k[1]:,.0f} | {per_k[1] / null[1]:.2f}x | {per_k[KMAX]:,.0f} | "
            f"{chunk:,.0f} | {chunk / null_chunk:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    (ROOT / "bench" / "callgrind-chunks.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
