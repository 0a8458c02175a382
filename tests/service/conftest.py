"""Fixtures of the stream handler's tests."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.service.app import Service


@pytest.fixture
async def stub_for() -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(service: Service) -> Any:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        channels.append(channel)
        return pb_grpc.ExternalProcessorStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()
