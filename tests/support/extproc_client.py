"""Build ext_proc messages the way Envoy sends them (values in raw_value)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


def request_headers(headers: dict[str, str | bytes], end_of_stream: bool = True) -> Any:
    values = [
        base_pb2.HeaderValue(key=k, raw_value=v if isinstance(v, bytes) else v.encode())
        for k, v in {":method": "GET", ":path": "/", **headers}.items()
    ]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream
        )
    )


def duplex_headers(workload: str, end_of_stream: bool = False, criticality: int = 3) -> Any:
    """request_headers as Envoy sends them with FULL_DUPLEX_STREAMED bodies."""
    message = workload_headers(workload, criticality)
    message.request_headers.end_of_stream = end_of_stream
    duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    message.protocol_config.request_body_mode = duplex
    message.protocol_config.response_body_mode = duplex
    return message


def request_body(body: bytes, end_of_stream: bool = False) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_body(body: bytes, end_of_stream: bool = False) -> Any:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def streamed(answer: Any) -> tuple[str, bytes, bool]:
    """(phase, body, end_of_stream) of a full-duplex body answer."""
    phase = answer.WhichOneof("response")
    chunk = getattr(answer, phase).response.body_mutation.streamed_response
    return phase, chunk.body, chunk.end_of_stream


def workload_headers(workload: str, criticality: int = 3) -> Any:
    context = f'{{"workload_id": "{workload}", "criticality": {criticality}}}'
    return request_headers({"x-workload-context": context})


async def running_and_held(
    channel: grpc.aio.Channel, running: str = "a", held: str = "b"
) -> tuple[Any, Any, Any]:
    """With one slot: a dispatched stream, a held one, and the held one's first answer."""
    stub = pb_grpc.ExternalProcessorStub(channel)
    first, second = stub.Process(), stub.Process()
    await first.write(workload_headers(running))
    await first.read()
    await second.write(workload_headers(held))
    return first, second, await second.read()


def response_trailers() -> Any:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def response_headers(end_of_stream: bool) -> Any:
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(end_of_stream=end_of_stream))


def set_headers(response: Any) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def immediate_headers(response: Any) -> dict[str, str]:
    mutation = response.immediate_response.headers
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds; fail after `within` seconds (a loose bound)."""

    async def check() -> bool:
        return condition()

    await eventually_async(check, within)


async def eventually_async(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """`eventually` for a condition that must itself await (an HTTP read, say)."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the time limit")
        await asyncio.sleep(0.01)


async def exchange(channel: grpc.aio.Channel, message: Any, complete: bool = True) -> Any:
    stream = pb_grpc.ExternalProcessorStub(channel).Process()
    await stream.write(message)
    answer = await stream.read()
    if complete and answer.WhichOneof("response") == "request_headers":
        await stream.write(response_trailers())
        await stream.read()
    return stream, answer
