"""Full-duplex bodies (as InferencePool gateways configure them), spoken to by a real
gRPC client: detected from the stream, every chunk handed back unchanged and in order,
the request held while its body keeps arriving, and counted out exactly once."""

import asyncio
from typing import Any

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.extproc_client import (
    duplex_headers,
    eventually,
    request_body,
    response_body,
    response_headers,
    set_headers,
    streamed,
    workload_headers,
)

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED


def active(service: Service, workload: str) -> int:
    status = service.reader.get(workload)
    return status.metrics.active_requests if status else 0


async def test_body_chunks_come_back_unchanged_after_the_headers_answer(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = stub_for(service).Process()
    chunks = [b'{"model": "m", ', b'"prompt": "hello"}', b""]
    await stream.write(duplex_headers("a"))
    for index, chunk in enumerate(chunks):
        await stream.write(request_body(chunk, end_of_stream=index == len(chunks) - 1))
    answer = await stream.read()
    assert answer.WhichOneof("response") == "request_headers"
    assert set_headers(answer)["x-workload-id"] == "a"
    echoed = [streamed(await stream.read()) for _ in chunks]
    assert echoed == [("request_body", c, i == len(chunks) - 1) for i, c in enumerate(chunks)]
    # The response body goes back chunk by chunk too, and its end completes the request.
    await stream.write(response_headers(end_of_stream=False))
    assert (await stream.read()).WhichOneof("response") == "response_headers"
    await stream.write(response_body(b"data: 1\n\n"))
    assert streamed(await stream.read()) == ("response_body", b"data: 1\n\n", False)
    assert active(service, "a") == 1
    await stream.write(response_body(b"", end_of_stream=True))
    assert streamed(await stream.read()) == ("response_body", b"", True)
    assert active(service, "a") == 0
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert service.flow.in_flight == 0


async def test_trailer_mode_is_untouched_by_bodies(
    start_service: StartService, stub_for: Any
) -> None:
    # Without protocol_config saying full-duplex, body messages get plain answers.
    service = await start_service()
    stream = stub_for(service).Process()
    await stream.write(workload_headers("a"))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    await stream.write(response_body(b"x", end_of_stream=True))
    answer = await stream.read()
    assert answer.WhichOneof("response") == "response_body"
    assert not answer.response_body.response.HasField("body_mutation")
    assert active(service, "a") == 0


@pytest.mark.parametrize(
    "body", [b"not json at all \xff\x00", b"[1, 2, 3]", b'{"prompt": "' + b"x" * 5000 + b'"}']
)
async def test_unreadable_or_large_bodies_pass_unchanged(
    start_service: StartService, stub_for: Any, body: bytes
) -> None:
    service = await start_service(max_body_bytes=1024)
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a"))
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
    for piece in pieces:
        await stream.write(request_body(piece))
    await stream.write(request_body(b"", end_of_stream=True))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    echoed = b""
    while True:
        phase, chunk, end = streamed(await stream.read())
        assert phase == "request_body"
        echoed += chunk
        if end:
            break
    assert echoed == body
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0)


async def test_held_request_keeps_taking_its_body_and_sends_it_after_the_answer(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service(max_concurrency=1, max_body_bytes=8)
    stub = stub_for(service)
    running = stub.Process()
    await running.write(duplex_headers("a", end_of_stream=True))
    assert (await running.read()).WhichOneof("response") == "request_headers"

    held = stub.Process()
    await held.write(duplex_headers("b"))
    # Past the body limit the request is enqueued without its prompt, and held.
    await held.write(request_body(b"{" + b" " * 10))
    hold = await held.read()
    assert hold.HasField("override_message_timeout")
    await eventually(lambda: service.flow.queued == 1)
    later = [b"more", b"and more"]
    for chunk in later:
        await held.write(request_body(chunk))
    await held.write(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))

    await running.write(response_headers(end_of_stream=True))
    await running.read()
    answer = await held.read()
    assert set_headers(answer)["x-workload-id"] == "b"
    assert [streamed(await held.read())[1] for _ in range(3)] == [b"{" + b" " * 10, *later]
    assert (await held.read()).WhichOneof("response") == "request_trailers"
    held.cancel()
    running.cancel()
    await eventually(lambda: active(service, "a") == active(service, "b") == 0)
    assert service.flow.in_flight == service.flow.queued == 0


@pytest.mark.parametrize("ending", ["cancelled", "closed"])
async def test_a_stream_that_ends_while_held_is_counted_out_once(
    start_service: StartService, stub_for: Any, ending: str
) -> None:
    service = await start_service(max_concurrency=1)
    stub = stub_for(service)
    running = stub.Process()
    await running.write(duplex_headers("a", end_of_stream=True))
    await running.read()
    held = stub.Process()
    await held.write(duplex_headers("b"))
    await held.write(request_body(b"{}", end_of_stream=True))
    await held.read()
    await eventually(lambda: service.flow.queued == 1)
    if ending == "cancelled":
        held.cancel()
    else:
        await held.done_writing()
    await eventually(lambda: service.flow.queued == 0 and active(service, "b") == 0)
    status = service.reader.get("b")
    assert status is not None
    assert status.metrics.total_requests == 1
    assert status.metrics.dispatched_count == 0
    # The slot stays with the running request; it ending frees it.
    assert service.flow.in_flight == 1
    running.cancel()
    await eventually(lambda: service.flow.in_flight == 0 and active(service, "a") == 0)


async def test_a_stream_that_ends_while_its_body_is_read_is_counted_out(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a"))
    await stream.write(request_body(b'{"prompt": '))
    await eventually(lambda: active(service, "a") == 1)
    await stream.done_writing()
    await eventually(lambda: active(service, "a") == 0)
    assert service.flow.in_flight == service.flow.queued == 0


async def test_tokens_cost_charges_the_estimate_and_corrects_to_the_usage(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service(policy="fair-share", fair_share_cost="tokens")
    policy = service.flow._policy
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a", criticality=1))  # weight 1
    await stream.write(request_body(b'{"prompt": "' + b"x" * 40 + b'", "max_tokens": 3}', True))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    await stream.read()
    assert policy.counter("a") == pytest.approx(10 + 2 * 3)  # type: ignore[attr-defined]
    usage = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 20}}'
    await stream.write(response_headers(end_of_stream=False))
    await stream.read()
    await stream.write(response_body(usage[:9]))
    await stream.read()
    await stream.write(response_body(usage[9:], end_of_stream=True))
    await stream.read()
    assert policy.counter("a") == pytest.approx(12 + 2 * 20)  # type: ignore[attr-defined]
    assert policy.cost == "tokens"  # type: ignore[attr-defined]
    read = service.metrics.registry.get_sample_value
    assert read("extproc_usage_tokens_total", {"kind": "prompt"}) == 12
    assert read("extproc_usage_tokens_total", {"kind": "completion"}) == 20
    stream.cancel()


async def test_a_slow_body_is_read_whole_before_the_request_is_enqueued_with_no_hold(
    start_service: StartService, stub_for: Any
) -> None:
    # Envoy runs no message timeout while a full-duplex body arrives (tests/e2e,
    # test_a_body_slower_than_the_message_timeout_still_goes): nothing goes out until
    # the body ends, and then the answer itself.
    service = await start_service()
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a"))
    await stream.write(request_body(b'{"prompt": "x'))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reading := asyncio.ensure_future(stream.read())), 0.3)
    assert active(service, "a") == 1
    assert service.flow.queued == service.flow.in_flight == 0
    await stream.write(request_body(b'"}', end_of_stream=True))
    answer = await reading  # dispatched at once: no hold at all
    assert set_headers(answer)["x-workload-id"] == "a"
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0 and service.flow.in_flight == 0)


async def test_headers_with_the_whole_request_get_no_hold_when_dispatched_at_once(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a", end_of_stream=True))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0)


@pytest.mark.parametrize(
    ("request_mode", "response_mode"),
    [(STREAMED, FULL_DUPLEX), (FULL_DUPLEX, STREAMED)],
)
async def test_each_direction_follows_its_own_body_mode(
    start_service: StartService, stub_for: Any, request_mode: int, response_mode: int
) -> None:
    service = await start_service()
    stream = stub_for(service).Process()
    headers = workload_headers("a")
    headers.protocol_config.request_body_mode = request_mode
    headers.protocol_config.response_body_mode = response_mode
    await stream.write(headers)
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    await stream.write(response_headers(end_of_stream=False))
    assert (await stream.read()).WhichOneof("response") == "response_headers"
    await stream.write(response_body(b"data: tok\n\n"))
    answer = await stream.read()
    if response_mode == FULL_DUPLEX:
        assert streamed(answer) == ("response_body", b"data: tok\n\n", False)
    else:  # a plain answer: a streamed_response here would be a protocol error
        assert answer == pb.ProcessingResponse(response_body=pb.BodyResponse())
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0)


async def test_tokens_cost_keeps_the_estimate_of_an_error_response(
    start_service: StartService, stub_for: Any
) -> None:
    # A backend's error body reports no usage: the request stays charged its estimate
    # and the cost stays tokens (one such response is no reason to give up the unit).
    service = await start_service(policy="fair-share", fair_share_cost="tokens")
    policy = service.flow._policy
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a", criticality=1))
    await stream.write(request_body(b'{"prompt": "' + b"x" * 40 + b'", "max_tokens": 3}', True))
    await stream.read()
    await stream.read()
    await stream.write(response_headers(end_of_stream=False))
    await stream.read()
    await stream.write(response_body(b'{"error": {"message": "too long"}}', end_of_stream=True))
    await stream.read()
    await eventually(lambda: active(service, "a") == 0)
    assert policy.cost == "tokens"  # type: ignore[attr-defined]
    assert policy.counter("a") == pytest.approx(10 + 2 * 3)  # type: ignore[attr-defined]
    stream.cancel()
