"""A bounded churn run through real Envoy: every kind of exit, then nothing left counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter

import aiohttp
import grpc
import pytest

from extproc.api.v1 import registry_pb2, registry_pb2_grpc
from tests.support.backend import Backend
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually_async
from tests.support.process import ServeProcess, free_port

pytestmark = pytest.mark.e2e
SOAK_SECONDS = 30.0
WARM_UP_SECONDS = 8.0
CLIENTS = 60


async def one_request(http: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    """One request with a randomly chosen fate; returns what happened to it."""
    workload = f"w{rng.randrange(20)}"
    headers = {
        "x-workload-context": json.dumps(
            {"workload_id": workload, "criticality": rng.randint(1, 5)}
        )
    }
    fate = rng.choice(["complete", "complete", "leave-while-queued", "leave-mid-response"])
    if fate == "leave-mid-response":
        async with http.get(f"{url}/drip?seconds=1", headers=headers) as reply:
            if reply.status != 200:
                return str(reply.status)
            await reply.content.readline()
            reply.close()  # drop the connection mid-stream
            return fate
    timeout = (
        aiohttp.ClientTimeout(total=rng.uniform(0.05, 0.4))
        if fate == "leave-while-queued"
        else None
    )
    try:
        async with http.get(
            f"{url}/work?seconds={rng.uniform(0, 0.2):.3f}", headers=headers, timeout=timeout
        ) as reply:
            await reply.read()
            return str(reply.status)
    except TimeoutError:
        return fate


async def test_churn_leaves_every_count_at_zero_and_memory_flat() -> None:
    backend = Backend()
    await backend.start()
    port = free_port()
    processor = ServeProcess(
        "--listen", f"127.0.0.1:{port}", "--max-concurrency", "8", "--max-queue", "40",
        "--queue-timeout", "1", "--policy", "fair-share",
    )  # fmt: skip
    envoy = Envoy(bundled_config(port, backend.port))
    outcomes: Counter[str] = Counter()
    try:
        await processor.start()
        await envoy.start()
        url = f"http://127.0.0.1:{envoy.port}"
        started = time.monotonic()
        warm_rss = 0.0

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:
                while time.monotonic() - started < SOAK_SECONDS:
                    with contextlib.suppress(aiohttp.ClientError):
                        outcomes[await one_request(http, url, rng)] += 1

        async def sample_rss() -> None:
            nonlocal warm_rss
            await asyncio.sleep(WARM_UP_SECONDS)
            warm_rss = processor.rss_mb()

        await asyncio.gather(sample_rss(), *(client(seed) for seed in range(CLIENTS)))

        async def drained() -> bool:
            workloads = await processor.workloads()
            return all(w["active_requests"] == w["queued_requests"] == 0 for w in workloads)

        await eventually_async(drained, within=10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = registry_pb2_grpc.WorkloadRegistryStub(channel).WatchWorkloads(
                registry_pb2.WatchWorkloadsRequest()
            )
            snapshot = await watch.read()
            watch.cancel()
        assert (snapshot.in_flight, snapshot.queued) == (0, 0)
        assert len(snapshot.workloads) == 20
        # A client that gives up early may do so before Envoy opened its ext_proc
        # stream; every answered request (and every one left mid-response) was seen.
        seen = sum(outcomes[k] for k in ("200", "429", "503", "leave-mid-response"))
        assert sum(w.total_requests for w in snapshot.workloads) >= seen
        # Every exit was exercised.
        for seen in ("200", "429", "503", "leave-while-queued", "leave-mid-response"):
            assert outcomes[seen] > 0, (seen, outcomes)
        assert processor.rss_mb() < warm_rss * 1.10, (warm_rss, processor.rss_mb())
    finally:
        await envoy.stop()
        await processor.terminate()
        await backend.stop()
