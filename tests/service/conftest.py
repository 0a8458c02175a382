"""Fixtures of the stream handler's tests: an ext_proc stub for a started service, and a
service picking among three model servers of the tests' own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.pool_endpoint import PoolEndpoint

OpenPool = Callable[..., Awaitable[tuple[Service, Any]]]


@pytest.fixture
async def endpoints() -> AsyncIterator[list[PoolEndpoint]]:
    started = [PoolEndpoint(f"e{i}") for i in range(3)]
    for endpoint in started:
        await endpoint.start()
    yield started
    for endpoint in started:
        await endpoint.stop()


@pytest.fixture
async def open_pool(
    start_service: StartService, endpoints: list[PoolEndpoint], stub_for: Any
) -> OpenPool:
    """Start the service on `endpoints` with these settings: (service, ext_proc stub)."""

    async def open_(**settings: object) -> tuple[Service, Any]:
        service = await start_service(endpoints=[e.address for e in endpoints], **settings)
        return service, stub_for(service)

    return open_


@pytest.fixture
async def stub_for() -> AsyncIterator[Any]:
    """An ext_proc stub for a started service; its channel is closed afterwards."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(service: Service) -> Any:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        channels.append(channel)
        return pb_grpc.ExternalProcessorStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()
