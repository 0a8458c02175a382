"""Every body mode Envoy can be configured with, request and response apart, spoken to by
a real gRPC client that plays Envoy's part in each: where the decision is answered,
that bodies come back unchanged, that the pick reads the prompt where the body arrives
before the answer (buffered, full-duplex) and still works where it does not (none,
streamed), and that every request is counted in, dispatched and out exactly once."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.service import epp
from extproc.service.app import Service
from tests.conftest import StartService
from tests.service.conftest import OpenPool
from tests.service.test_epp import with_subset
from tests.support.extproc_client import (
    eventually,
    request_body,
    response_body,
    response_headers,
    response_trailers,
    workload_headers,
)

Mode = processing_mode_pb2.ProcessingMode
MODES = {
    "NONE": Mode.NONE,
    "STREAMED": Mode.STREAMED,
    "BUFFERED": Mode.BUFFERED,
    "BUFFERED_PARTIAL": Mode.BUFFERED_PARTIAL,
    "FULL_DUPLEX_STREAMED": Mode.FULL_DUPLEX_STREAMED,
}
BUFFERED = ("BUFFERED", "BUFFERED_PARTIAL")
# The body arrives before the answer is due: the pick reads the prompt.
READS_PROMPT = {*BUFFERED, "FULL_DUPLEX_STREAMED"}
SHARED = "You are a careful assistant. " * 24  # ~700 bytes: eleven 64-byte blocks


@pytest.fixture
async def pool(open_pool: OpenPool) -> tuple[Service, Any]:
    return await open_pool()


def headers_in(request_mode: str, response_mode: str, workload: str = "a") -> Any:
    message = workload_headers(workload)
    message.request_headers.end_of_stream = False
    message.protocol_config.request_body_mode = MODES[request_mode]
    message.protocol_config.response_body_mode = MODES[response_mode]
    return message


def decision(answer: Any, phase: str) -> dict[str, str]:
    """The request headers the answer to `phase` sets (its header mutation)."""
    assert answer.WhichOneof("response") == phase, answer
    mutation = getattr(answer, phase).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def unchanged(answer: Any, phase: str) -> bool:
    """A plain answer: the message goes on as it came, no mutation of any kind."""
    return answer.WhichOneof("response") == phase and not getattr(answer, phase).response.HasField(
        "body_mutation"
    )


async def play_request(stream: Any, request_mode: str, body: bytes, first: Any) -> Any:
    """Envoy's request side in `request_mode`; the answer that carries the decision."""
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]
    await stream.write(first)
    if request_mode == "FULL_DUPLEX_STREAMED":
        for index, chunk in enumerate(chunks):
            await stream.write(request_body(chunk, end_of_stream=index == 1))
        answer = await stream.read()
        echoed = b""
        for _ in chunks:
            echoed += (
                await stream.read()
            ).request_body.response.body_mutation.streamed_response.body
        assert echoed == body
        return answer
    if request_mode in BUFFERED:
        # Envoy sends the whole body once the headers are answered, and holds both.
        headers_answer = await stream.read()
        assert decision(headers_answer, "request_headers") == {}
        await stream.write(request_body(body, end_of_stream=True))
        return await stream.read()
    answer = await stream.read()
    if request_mode == "STREAMED":
        for index, chunk in enumerate(chunks):
            await stream.write(request_body(chunk, end_of_stream=index == 1))
            assert unchanged(await stream.read(), "request_body")
    return answer


async def play_response(stream: Any, response_mode: str) -> None:
    """Envoy's response side in `response_mode`, checking every answer leaves it as it was."""
    await stream.write(response_headers(end_of_stream=False))
    assert unchanged(await stream.read(), "response_headers")
    events = [b"data: 1\n\n", b"data: [DONE]\n\n"]
    if response_mode == "FULL_DUPLEX_STREAMED":
        for index, event in enumerate(events):
            await stream.write(response_body(event, end_of_stream=index == 1))
            echo = (await stream.read()).response_body.response.body_mutation.streamed_response
            assert (echo.body, echo.end_of_stream) == (event, index == 1)
    elif response_mode == "STREAMED":
        for index, event in enumerate(events):
            await stream.write(response_body(event, end_of_stream=index == 1))
            assert unchanged(await stream.read(), "response_body")
    elif response_mode in BUFFERED:
        await stream.write(response_body(b"".join(events), end_of_stream=True))
        assert unchanged(await stream.read(), "response_body")
    else:
        await stream.write(response_trailers())
        assert (await stream.read()).WhichOneof("response") == "response_trailers"


def counts(service: Service, workload: str) -> tuple[int, int, int]:
    status = service.reader.get(workload)
    assert status is not None
    metrics = status.metrics
    return metrics.total_requests, metrics.dispatched_count, metrics.active_requests


def prefix_hits(service: Service) -> int:
    assert service.pool is not None
    return sum(e.prefix_hits for e in service.pool.status().endpoints)


def in_flight(service: Service) -> int:
    assert service.pool is not None
    return sum(e.in_flight for e in service.pool.status().endpoints)


@pytest.mark.parametrize("response_mode", MODES)
@pytest.mark.parametrize("request_mode", MODES)
async def test_every_body_mode_picks_passes_bodies_unchanged_and_counts_once(
    pool: tuple[Service, Any], request_mode: str, response_mode: str
) -> None:
    service, stub = pool
    for index in range(2):
        body = json.dumps({"model": "m", "prompt": f"{SHARED} question {index}"}).encode()
        stream = stub.Process()
        answer = await play_request(
            stream, request_mode, body, headers_in(request_mode, response_mode)
        )
        phase = "request_body" if request_mode in BUFFERED else "request_headers"
        routed = decision(answer, phase)
        assert routed["x-workload-id"] == "a"
        lb = answer.dynamic_metadata.fields[epp.LB_NAMESPACE].struct_value
        assert routed[epp.DESTINATION_HEADER] == lb.fields[epp.DESTINATION_HEADER].string_value
        assert "," not in routed[epp.DESTINATION_HEADER]  # one endpoint by default
        assert not getattr(answer, phase).response.HasField("body_mutation")
        assert counts(service, "a") == (index + 1, index + 1, 1)
        await play_response(stream, response_mode)
        assert counts(service, "a") == (index + 1, index + 1, 0)
        await stream.done_writing()
        assert await stream.read() == grpc.aio.EOF
    assert in_flight(service) == 0
    # The second prompt shares the first's ~700-byte prefix: where the prompt is read,
    # it goes where the first went.
    assert prefix_hits(service) == (1 if request_mode in READS_PROMPT else 0)


@pytest.mark.parametrize("request_mode", BUFFERED)
async def test_a_buffered_body_held_in_the_queue_is_answered_when_released(
    open_pool: OpenPool, request_mode: str
) -> None:
    service, stub = await open_pool(max_concurrency=1)
    body = b'{"model": "m", "prompt": "hi"}'
    running = stub.Process()
    await play_request(running, request_mode, body, headers_in(request_mode, "NONE"))
    held = stub.Process()
    await held.write(headers_in(request_mode, "NONE", "b"))
    assert decision(await held.read(), "request_headers") == {}
    await held.write(request_body(body, end_of_stream=True))
    hold = await held.read()
    assert hold.HasField("override_message_timeout")
    await eventually(lambda: service.flow.queued == 1)
    assert counts(service, "b") == (1, 0, 1)  # new, not yet dispatched
    await play_response(running, "NONE")
    routed = decision(await held.read(), "request_body")
    assert routed["x-workload-id"] == "b"
    assert counts(service, "b") == (1, 1, 1)
    await play_response(held, "NONE")
    assert counts(service, "b") == (1, 1, 0)
    assert service.flow.in_flight == 0


@pytest.mark.parametrize("request_mode", BUFFERED)
async def test_buffered_paths_that_end_early_count_out_once(
    pool: tuple[Service, Any], request_mode: str
) -> None:
    service, stub = pool
    # A request without a body (headers end the stream) is answered at its headers.
    bodiless = headers_in(request_mode, "NONE")
    bodiless.request_headers.end_of_stream = True
    stream = stub.Process()
    await stream.write(bodiless)
    assert epp.DESTINATION_HEADER in decision(await stream.read(), "request_headers")
    await play_response(stream, "NONE")
    # The client goes away before its body arrives (Envoy resets the stream).
    gone = stub.Process()
    await gone.write(headers_in(request_mode, "NONE", "b"))
    await gone.read()
    gone.cancel()
    await eventually(lambda: counts(service, "b") == (1, 0, 0))
    # An empty subset hint: 503 in answer to the body, counted out.
    refused = stub.Process()
    await refused.write(with_subset(headers_in(request_mode, "NONE", "c"), []))
    await refused.read()
    await refused.write(request_body(b"{}", end_of_stream=True))
    answer = await refused.read()
    assert answer.immediate_response.status.code == 503
    assert counts(service, "c") == (1, 0, 0)
    # Trailers instead of a body message: the decision rides on their answer (metadata).
    trailers = stub.Process()
    await trailers.write(headers_in(request_mode, "NONE", "d"))
    await trailers.read()
    await trailers.write(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    answer = await trailers.read()
    assert answer.WhichOneof("response") == "request_trailers"
    assert answer.dynamic_metadata.fields[epp.LB_NAMESPACE].struct_value.fields
    await play_response(trailers, "NONE")
    assert counts(service, "d") == (1, 1, 0)
    await eventually(lambda: in_flight(service) == 0)


@pytest.mark.parametrize("request_mode", BUFFERED)
async def test_a_buffered_request_envoy_answers_itself_is_never_queued_nor_dispatched(
    open_pool: OpenPool, request_mode: str
) -> None:
    # A BUFFERED body over Envoy's buffer limit: Envoy answers 413 itself, and its local
    # reply's response headers come where the body was awaited. Nothing reaches a
    # backend: no pick, no slot, no dispatch, and the 413 is not held behind the queue.
    service, stub = await open_pool(max_concurrency=1)
    running = stub.Process()
    await play_request(running, request_mode, b"{}", headers_in(request_mode, "NONE"))
    stream = stub.Process()
    await stream.write(headers_in(request_mode, "NONE", "b"))
    assert decision(await stream.read(), "request_headers") == {}
    await stream.write(response_headers(end_of_stream=False))
    answer = await stream.read()
    assert unchanged(answer, "response_headers")
    assert not answer.HasField("dynamic_metadata")
    assert counts(service, "b") == (1, 0, 0)
    assert service.flow.queued == 0
    await stream.write(response_body(b"Payload Too Large", end_of_stream=True))
    assert (await stream.read()).WhichOneof("response") == "response_body"
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert counts(service, "b") == (1, 0, 0)
    await play_response(running, "NONE")
    assert service.flow.in_flight == 0
    assert in_flight(service) == 0


@pytest.mark.parametrize("response_mode", ["STREAMED", "BUFFERED"])
async def test_tokens_cost_reads_a_buffered_prompt_and_the_usage_of_any_response_body(
    start_service: StartService, response_mode: str
) -> None:
    service = await start_service(policy="fair-share", fair_share_cost="tokens")
    policy: Any = service.flow._policy
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stream = pb_grpc.ExternalProcessorStub(channel).Process()
        first = headers_in("BUFFERED", response_mode)
        first.request_headers.headers.headers[
            -1
        ].raw_value = b'{"workload_id": "a", "criticality": 1}'  # weight 1
        body = b'{"prompt": "' + b"x" * 40 + b'", "max_tokens": 3}'
        await play_request(stream, "BUFFERED", body, first)
        assert policy.counter("a") == pytest.approx(10 + 2 * 3)  # the prompt was read
        await stream.write(response_headers(end_of_stream=False))
        await stream.read()
        usage = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 20}}'
        pieces = [usage[:9], usage[9:]] if response_mode == "STREAMED" else [usage]
        for index, piece in enumerate(pieces):
            await stream.write(response_body(piece, end_of_stream=index == len(pieces) - 1))
            assert unchanged(await stream.read(), "response_body")
        assert policy.counter("a") == pytest.approx(12 + 2 * 20)
        assert counts(service, "a") == (1, 1, 0)
        stream.cancel()
