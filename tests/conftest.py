import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from extproc.config import Settings
from extproc.service.app import Service

StartService = Callable[..., Awaitable[Service]]

# The checks against a real vLLM take minutes and their own venv: `make test-vllm`
# names its Python, and only then are they collected (never by a plain `make test`).
collect_ignore = [] if os.environ.get("EXTPROC_VLLM_PYTHON") else ["vllm"]


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start the real service (gRPC and admin) on ephemeral loopback ports."""
    started: list[Service] = []

    async def start(**overrides: object) -> Service:
        settings = Settings(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", **overrides)  # type: ignore[arg-type]
        service = Service(settings)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop(drain_timeout=0, grace=0)


@pytest.fixture
async def channel_to() -> AsyncIterator[Any]:
    """Open gRPC channels to services; closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_channel(service: Service) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()
