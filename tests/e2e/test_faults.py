"""Faults with a real Envoy: the processor, the backend and Envoy itself each die."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import StartService
from tests.support.backend import Backend
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually, eventually_async
from tests.support.process import ServeProcess, free_port

pytestmark = pytest.mark.e2e
CONTEXT = {"x-workload-context": '{"workload_id": "w"}'}


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = Backend()
    await server.start()
    yield server
    await server.stop()


async def status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, headers=CONTEXT) as reply:
        await reply.read()
        return reply.status


@pytest.mark.parametrize(("failure_mode_allow", "queued_status"), [(False, 500), (True, 200)])
async def test_processor_killed_with_requests_queued_then_restarted(
    backend: Backend, failure_mode_allow: bool, queued_status: int
) -> None:
    port = free_port()
    flags = ("--listen", f"127.0.0.1:{port}", "--max-concurrency", "1")
    processor = ServeProcess(*flags)
    await processor.start()
    envoy = Envoy(bundled_config(port, backend.port, failure_mode_allow=failure_mode_allow))
    await envoy.start()
    url = f"http://127.0.0.1:{envoy.port}"
    try:
        async with aiohttp.ClientSession() as http:
            blocker = asyncio.create_task(status(http, f"{url}/held"))
            await eventually(lambda: backend.running == 1)
            queued = [asyncio.create_task(status(http, url)) for _ in range(3)]

            async def all_queued() -> bool:
                (workload,) = await processor.workloads()
                return bool(workload["queued_requests"] == 3)

            await eventually_async(all_queued)
            await processor.kill()
            # Fail closed: Envoy answers 500; with failure_mode_allow the queued requests
            # pass through unprocessed.
            assert await asyncio.gather(*queued) == [queued_status] * 3
            backend.gate.set()
            with contextlib.suppress(aiohttp.ClientError):
                await blocker  # its response phase lost its processor: either outcome is Envoy's

            restarted = ServeProcess(*flags)
            await restarted.start()
            try:
                assert await status(http, url) == 200

                async def counted_out() -> bool:
                    (workload,) = await restarted.workloads()
                    return (workload["total_requests"], workload["active_requests"]) == (1, 0)

                await eventually_async(counted_out)
            finally:
                await restarted.terminate()
    finally:
        await envoy.stop()


async def test_backend_down_is_envoys_error_and_counted_out(start_service: StartService) -> None:
    service = await start_service(max_concurrency=4)
    envoy = Envoy(bundled_config(service.grpc_port, free_port()))
    await envoy.start()
    try:
        async with aiohttp.ClientSession() as http:
            statuses = await asyncio.gather(
                *(status(http, f"http://127.0.0.1:{envoy.port}/") for _ in range(10))
            )
        assert statuses == [503] * 10
        await eventually(lambda: service.registry.get_metrics("w").active_requests == 0)  # type: ignore[union-attr]
        metrics = service.registry.get_metrics("w")
        assert metrics is not None
        assert metrics.total_requests == metrics.dispatched_count == 10
        assert service.flow.in_flight == 0
    finally:
        await envoy.stop()


async def test_envoy_killed_under_load_leaves_nothing_counted(
    start_service: StartService, backend: Backend
) -> None:
    service = await start_service(max_concurrency=5)
    envoy = Envoy(bundled_config(service.grpc_port, backend.port))
    await envoy.start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        requests = [
            asyncio.create_task(status(http, f"http://127.0.0.1:{envoy.port}/held"))
            for _ in range(40)
        ]
        await eventually(lambda: service.flow.in_flight == 5 and service.flow.queued == 35)
        await envoy.kill()
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientError) for r in results)
    await eventually(lambda: (service.flow.in_flight, service.flow.queued) == (0, 0))
    metrics = service.registry.get_metrics("w")
    assert metrics is not None
    assert (metrics.total_requests, metrics.active_requests) == (40, 0)
    await envoy.stop()
