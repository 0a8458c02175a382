"""End to end, the capacity gates against the demo model server: real Envoy (bundled
config), the real service and the demo backend, on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import pytest

from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.demo_server import completion, demo_server
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually

pytestmark = pytest.mark.e2e

SLOTS = 4
THRESHOLD = 2


@dataclass
class DemoStack:
    service: Service
    backend: str
    envoy: Envoy
    http: aiohttp.ClientSession

    async def backend_metric(self, name: str) -> float:
        async with self.http.get(f"{self.backend}/metrics") as reply:
            for line in (await reply.text()).splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name}")

    async def flood(self, clients: int, seconds: float) -> Counter[int]:
        """`clients` loops sending back to back for `seconds`; the statuses seen."""
        statuses: Counter[int] = Counter()
        deadline = time.monotonic() + seconds
        url = f"http://127.0.0.1:{self.envoy.port}/v1/completions"

        async def client(index: int) -> None:
            headers = {"x-workload-context": f'{{"workload_id": "tenant-{index % 4}"}}'}
            while time.monotonic() < deadline:
                async with self.http.post(url, headers=headers, json=completion(5)) as reply:
                    await reply.read()
                    statuses[reply.status] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        return statuses


MakeDemoStack = Callable[..., Awaitable[DemoStack]]


@pytest.fixture
async def demo_stack(start_service: StartService) -> AsyncIterator[MakeDemoStack]:
    async with AsyncExitStack() as cleanups:

        async def make(**settings: object) -> DemoStack:
            base = await cleanups.enter_async_context(demo_server(SLOTS))
            if settings.get("capacity") == "metrics":
                settings["backend_metrics_url"] = [f"{base}/metrics"]
            service = await start_service(**settings)
            envoy = Envoy(bundled_config(service.grpc_port, int(base.rsplit(":", 1)[1])))
            cleanups.push_async_callback(envoy.stop)
            await envoy.start()
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            cleanups.push_async_callback(http.close)
            return DemoStack(service, base, envoy, http)

        yield make


async def test_metrics_gate_keeps_the_model_servers_queue_at_its_threshold(
    demo_stack: MakeDemoStack,
) -> None:
    stack = await demo_stack(capacity="metrics", waiting_threshold=THRESHOLD)
    assert stack.service.flow.capacity.status().fallback is False  # scraped before serving
    queued_peak = 0

    async def watch_queue() -> None:
        nonlocal queued_peak
        while True:
            queued_peak = max(queued_peak, stack.service.flow.queued)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_queue())
    statuses = await stack.flood(clients=40, seconds=20.0)
    watcher.cancel()
    assert statuses == Counter({200: statuses[200]})
    assert statuses[200] >= 150
    assert queued_peak >= 20  # the flood really waited in our queue, not in the server
    assert await stack.backend_metric("demo_backend_max_waiting") <= THRESHOLD + 1
    status = stack.service.flow.capacity.status()
    assert status.endpoints[0].errors == 0
    assert status.endpoints[0].age is not None
    await eventually(lambda: stack.service.flow.in_flight == 0)


async def test_without_a_gate_the_same_flood_waits_inside_the_model_server(
    demo_stack: MakeDemoStack,
) -> None:
    stack = await demo_stack(capacity="static", max_concurrency=0)
    await stack.flood(clients=40, seconds=3.0)
    assert await stack.backend_metric("demo_backend_max_waiting") >= 30


async def test_adaptive_learns_from_first_bytes_that_envoy_sends_on_request(
    demo_stack: MakeDemoStack,
) -> None:
    stack = await demo_stack(capacity="adaptive", max_concurrency=16, adaptive_min_limit=2)
    statuses = await stack.flood(clients=20, seconds=8.0)
    assert set(statuses) == {200}
    status = stack.service.flow.capacity.status()
    # Samples arrived only if Envoy honoured the mode override and sent response headers.
    assert status.min_latency is not None
    assert status.latency is not None
    assert status.min_latency < 0.25  # first byte, not the 0.5 s response
    assert 2 <= status.limit <= 16
    # The override kept response trailers: a request stays in flight until its last byte.
    url = f"http://127.0.0.1:{stack.envoy.port}/v1/completions"
    async with stack.http.post(url, json=completion(15)) as reply:
        await reply.content.readline()  # the first event: the response has begun
        assert stack.service.flow.in_flight == 1
        await reply.read()
    await eventually(lambda: stack.service.flow.in_flight == 0)
