"""The stream handler driven directly, with a stand-in for grpc.aio's RPC context:
the paths a real server takes rarely and cannot be made to take on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.context import WORKLOAD_CONTEXT_HEADER, ContextParser
from extproc.contracts import QueuedRequest
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from extproc.service.extproc import ExternalProcessorService
from extproc.service.metrics import Metrics
from extproc.service.readapi import WorkloadReader
from tests.support.rpc_context import RpcContext


class FirstBytes(StaticCapacity):
    wants_first_byte = True

    def __init__(self) -> None:
        super().__init__(4)
        self.samples: list[float] = []

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        self.samples.append(seconds)


class Stream:
    def __init__(self, gate: StaticCapacity | None = None, policy: FcfsPolicy | None = None):
        clock = VirtualClock()
        self.registry = InMemoryWorkloadRegistry(clock)
        datastore = RegistryDatastore(self.registry)
        self.flow = FlowController(
            policy or FcfsPolicy(), clock, capacity=gate or StaticCapacity(4)
        )
        metrics = Metrics(WorkloadReader(datastore, self.flow, None))
        self.service = ExternalProcessorService(
            datastore, self.flow, ContextParser("default"), clock, metrics, hold_timeout=30
        )
        self.context = RpcContext()
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.replies = self.service.Process(self._incoming(), self.context)

    async def _incoming(self) -> AsyncIterator[Any]:
        while True:
            yield await self.messages.get()

    async def send(self, message: Any) -> Any:
        self.messages.put_nowait(message)
        return await asyncio.wait_for(self.replies.__anext__(), 5)

    def active(self) -> int:
        metrics = self.registry.get_metrics("team")
        return -1 if metrics is None else metrics.active_requests


def request_headers() -> Any:
    message = pb.ProcessingRequest()
    header = message.request_headers.headers.headers.add()
    header.key, header.raw_value = WORKLOAD_CONTEXT_HEADER, b'{"workload_id": "team"}'
    return message


def response_headers(code_details: str) -> Any:
    message = pb.ProcessingRequest()
    message.response_headers.headers.headers.add(key=":status", raw_value=b"503")
    attributes = struct_pb2.Struct()
    attributes.update({"response.code_details": code_details})
    message.attributes["envoy.filters.http.ext_proc"].CopyFrom(attributes)
    return message


async def test_a_stream_ended_at_a_yield_completes_without_the_generator() -> None:
    """#16.7: grpc.aio does not aclose() the handler when a write fails; the RPC's
    done-callback completes the request."""
    stream = Stream()
    reply = await stream.send(request_headers())
    assert reply.WhichOneof("response") == "request_headers"
    assert (stream.active(), stream.flow.in_flight) == (1, 1)
    stream.context.end()  # the RPC is over; the generator stays suspended
    assert (stream.active(), stream.flow.in_flight) == (0, 0)
    await stream.replies.aclose()  # finalised later after all: nothing counted twice
    assert (stream.active(), stream.flow.in_flight) == (0, 0)


class FailingPolicy(FcfsPolicy):
    def on_done(self, item: QueuedRequest, service_time: float | None) -> None:
        raise RuntimeError("policy bug")


async def test_a_policy_error_cannot_skip_the_registry_decrement() -> None:
    # Since issue 23 the controller logs a raising on_done rather than surfacing it in
    # the stream: the request still completes, and every count is given back.
    stream = Stream(policy=FailingPolicy())
    await stream.send(request_headers())
    assert (stream.active(), stream.flow.in_flight) == (1, 1)
    await stream.replies.aclose()
    assert (stream.active(), stream.flow.in_flight) == (0, 0)


@pytest.mark.parametrize(
    ("code_details", "sampled"),
    [("via_upstream", 1), ("upstream_reset_before_response_started{connection_failure}", 0)],
)
async def test_only_the_backends_own_responses_are_latency_samples(
    code_details: str, sampled: int
) -> None:
    """#16.9: Envoy's local reply to a connect failure says nothing about the backend."""
    gate = FirstBytes()
    stream = Stream(gate=gate)
    await stream.send(request_headers())
    await stream.send(response_headers(code_details))
    assert len(gate.samples) == sampled
    await stream.replies.aclose()
