"""A flooding tenant against a light one, end to end (issue #15's scenario).

Envoy (envoy/envoy.yaml) -> workload-extproc (`--policy fair-share
--max-concurrency 2 --max-queue 20`) -> a loopback backend that holds each
request `--work` seconds. One tenant floods with `--loops` concurrent loops
(each pauses 10 ms after a 429, so the loops do not starve the machine); a
light tenant sends `--light` requests one at a time. Prints how each tenant
was answered and the light tenant's latency percentiles.

    .venv/bin/python bench/flood.py [--loops 60] [--light 200] [--work 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.config import Settings  # noqa: E402
from extproc.log import configure_logging  # noqa: E402
from extproc.service.app import Service  # noqa: E402
from extproc.stats import percentile  # noqa: E402
from tests.support.backend import Backend  # noqa: E402
from tests.support.envoy import Envoy, bundled_config  # noqa: E402


async def main(loops: int, light_requests: int, work: float) -> None:
    backend = Backend()
    await backend.start()
    settings = Settings(
        listen="127.0.0.1:0", admin_listen="127.0.0.1:0", policy="fair-share",
        max_concurrency=2, max_queue=20,
    )  # fmt: skip
    configure_logging("console", "warning")  # one line per request would drown the result
    service = Service(settings)
    await service.start()
    envoy = Envoy(bundled_config(service.grpc_port, backend.port))
    await envoy.start()
    url = f"http://127.0.0.1:{envoy.port}/work?seconds={work}"
    flood: Counter[int] = Counter()
    light: Counter[int] = Counter()
    latencies: list[float] = []
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        def headers(workload: str) -> dict[str, str]:
            return {"x-workload-context": json.dumps({"workload_id": workload})}

        async def flooder() -> None:
            while not done.is_set():
                async with http.get(url, headers=headers("flood")) as reply:
                    await reply.read()
                    flood[reply.status] += 1
                if reply.status == 429:
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(flooder()) for _ in range(loops)]
        for _ in range(600):  # until the flood keeps the queue (nearly) full, 30 s at most
            if service.flow.queued >= 15:
                break
            await asyncio.sleep(0.05)
        for _ in range(light_requests):
            started = time.monotonic()
            async with http.get(url, headers=headers("light")) as reply:
                await reply.read()
                light[reply.status] += 1
            latencies.append(time.monotonic() - started)
        done.set()
        await asyncio.gather(*tasks)
    await envoy.stop()
    await service.stop(drain_timeout=0, grace=0)
    await backend.stop()
    p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
    print(f"flooder ({loops} loops): {dict(flood)}")
    print(f"light ({light_requests} one at a time): {dict(light)}")
    print(f"light latency: p50 {p50:.3f} s, p90 {p90:.3f} s, p99 {p99:.3f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=60)
    parser.add_argument("--light", type=int, default=200)
    parser.add_argument("--work", type=float, default=0.05, help="backend seconds per request")
    args = parser.parse_args()
    asyncio.run(main(args.loops, args.light, args.work))
