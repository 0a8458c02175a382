"""End to end, who is refused and who is counted: the real Envoy (envoy/envoy.yaml, and
envoy/envoy-jwt.yaml with tokens the test signs), the real service and a real backend on
loopback ports."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.service.app import Service
from extproc.stats import percentile
from tests.conftest import StartService
from tests.support.backend import Backend
from tests.support.envoy import BUNDLED_CONFIG, JWT_CONFIG, Envoy, bundled_config, http_filter
from tests.support.extproc_client import eventually
from tests.support.tokens import Signer

pytestmark = pytest.mark.e2e

Started = tuple[Service, Backend, Envoy, aiohttp.ClientSession]
Start = Callable[..., Awaitable[Started]]


@pytest.fixture
async def start(start_service: StartService) -> AsyncIterator[Start]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def run(source: Path, jwks: str | None = None, **settings: object) -> Started:
        backend = Backend()
        await backend.start()
        cleanups.append(backend.stop)
        service = await start_service(**settings)
        config = bundled_config(service.grpc_port, backend.port, source=source)
        if jwks is not None:
            provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["gateway"]
            provider["local_jwks"]["inline_string"] = jwks
        envoy = Envoy(config)
        cleanups.append(envoy.stop)
        await envoy.start()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        cleanups.append(http.close)
        return service, backend, envoy, http

    yield run
    for cleanup in reversed(cleanups):
        await cleanup()


async def test_a_flooding_tenant_cannot_refuse_a_light_one(start: Start) -> None:
    """The issue's scenario: fair-share, 2 slots, a queue of 20, one tenant flooding
    with 60 concurrent loops, a light tenant sending one request at a time."""
    service, _, envoy, http = await start(
        BUNDLED_CONFIG, policy="fair-share", max_concurrency=2, max_queue=20
    )
    url = f"http://127.0.0.1:{envoy.port}/work?seconds=0.05"
    flood_statuses: Counter[int] = Counter()
    done = asyncio.Event()

    def context(workload: str) -> dict[str, str]:
        return {"x-workload-context": json.dumps({"workload_id": workload})}

    async def flooder() -> None:
        while not done.is_set():
            async with http.get(url, headers=context("flood")) as reply:
                await reply.read()
                flood_statuses[reply.status] += 1
            if reply.status == 429:
                await asyncio.sleep(0.01)  # keeps the loops from starving the machine

    flooders = [asyncio.create_task(flooder()) for _ in range(60)]
    await eventually(lambda: service.flow.queued >= 15, within=30)
    light: list[tuple[int, float]] = []
    for _ in range(40):
        started = time.monotonic()
        async with http.get(url, headers=context("light")) as reply:
            await reply.read()
        light.append((reply.status, time.monotonic() - started))
    done.set()
    await asyncio.gather(*flooders)
    statuses = Counter(status for status, _ in light)
    latencies = [seconds for _, seconds in light]
    print(
        f"\nlight tenant: {statuses}, p50 {percentile(latencies, 50):.3f} s, "
        f"p90 {percentile(latencies, 90):.3f} s; flooder: {flood_statuses}"
    )
    assert statuses == {200: 40}  # zero refusals
    assert flood_statuses[429] > 0  # the queue was full the whole time
    assert percentile(latencies, 90) < 10.0  # loose: the number is reported above
    await eventually(lambda: (service.flow.queued, service.flow.in_flight) == (0, 0))
    await eventually(lambda: _active(service, "light") == _active(service, "flood") == 0)


def _active(service: Service, workload: str) -> int | None:
    status = service.reader.get(workload)
    return None if status is None else status.metrics.active_requests


async def test_jwt_identity_decides_the_workload(start: Start) -> None:
    signer = Signer()
    service, backend, envoy, http = await start(
        JWT_CONFIG, jwks=signer.jwks(), workload_header="x-tenant-id"
    )
    url = f"http://127.0.0.1:{envoy.port}/"

    async def get(headers: dict[str, str]) -> tuple[int, str]:
        async with http.get(url, headers=headers) as reply:
            return reply.status, await reply.text()

    forged_context = json.dumps({"workload_id": "tenant-b", "criticality": 4})
    assert (await get({"x-workload-context": forged_context}))[0] == 401  # no token
    bad = Signer().token("tenant-a")  # signed by a key Envoy does not know
    assert (await get({"authorization": f"Bearer {bad}"}))[0] == 401
    token = signer.token("tenant-a")
    forged: dict[str, Any] = {
        "authorization": f"Bearer {token}",
        "x-workload-context": forged_context,
        "x-tenant-id": "tenant-b",
        "x-gateway-inference-fairness-id": "tenant-b",
    }
    assert (await get(forged))[0] == 200
    assert backend.arrivals == ["tenant-a"]
    await eventually(lambda: _active(service, "tenant-a") == 0)
    assert service.reader.get("tenant-b") is None
    status = service.reader.get("tenant-a")
    assert status is not None
    assert status.metrics.total_requests == 1
    reserved = signer.token("overflow")
    code, body = await get({"authorization": f"Bearer {reserved}"})
    assert (code, "reserved" in body) == (400, True)
    assert service.reader.get("overflow") is None
