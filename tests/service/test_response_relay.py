"""The response body once the request is dispatched (the handler's tight loop): every
chunk handed back unchanged and in order, every way out of it counted out exactly once,
and anything but a middle chunk still answered as before."""

from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.service.app import Service
from tests.conftest import StartService
from tests.service.test_full_duplex import active
from tests.support.extproc_client import (
    duplex_headers,
    eventually,
    request_body,
    response_body,
    response_headers,
    response_trailers,
    streamed,
)
from tests.support.metrics_page import scrape

DISPATCHED = ("extproc_requests_total", (("outcome", "dispatched"),))


async def dispatched_stream(service: Service, stub_for: Any) -> Any:
    """A full-duplex stream whose request went and whose response headers were answered."""
    stream = stub_for(service).Process()
    await stream.write(duplex_headers("a"))
    await stream.write(request_body(b'{"prompt": "hi"}', end_of_stream=True))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    assert streamed(await stream.read())[0] == "request_body"
    await stream.write(response_headers(end_of_stream=False))
    assert (await stream.read()).WhichOneof("response") == "response_headers"
    return stream


async def test_many_chunks_come_back_unchanged_and_the_end_counts_out_once(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    chunks = [f"data: {i}\n\n".encode() * (i % 3) for i in range(200)]
    for chunk in chunks:
        await stream.write(response_body(chunk))
    for chunk in chunks:
        assert streamed(await stream.read()) == ("response_body", chunk, False)
    assert active(service, "a") == 1
    await stream.write(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    assert streamed(await stream.read()) == ("response_body", b"data: [DONE]\n\n", True)
    assert active(service, "a") == 0
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert (await scrape(service))[DISPATCHED] == 1
    assert service.flow.in_flight == 0


async def test_a_chunk_ending_without_a_message_keeps_its_flag(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    await stream.write(
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=b"x", end_of_stream_without_message=True)
        )
    )
    answer = (await stream.read()).response_body.response.body_mutation.streamed_response
    assert (answer.body, answer.end_of_stream_without_message) == (b"x", True)
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0)


async def test_trailers_after_the_body_complete_the_request_once(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    await stream.write(response_body(b"data: 1\n\n"))
    assert streamed(await stream.read()) == ("response_body", b"data: 1\n\n", False)
    await stream.write(response_trailers())
    assert (await stream.read()).WhichOneof("response") == "response_trailers"
    assert active(service, "a") == 0
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert (await scrape(service))[DISPATCHED] == 1


async def test_a_second_request_headers_mid_body_is_passed_on_and_not_counted(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    await stream.write(response_body(b"data: 1\n\n"))
    await stream.write(duplex_headers("a"))
    assert streamed(await stream.read())[1] == b"data: 1\n\n"
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    assert active(service, "a") == 1
    await stream.write(response_body(b"", end_of_stream=True))
    assert streamed(await stream.read())[2] is True
    assert active(service, "a") == 0
    assert (await scrape(service)).get(DISPATCHED) == 1


@pytest.mark.parametrize("chunks_before", [0, 3])
async def test_a_stream_cancelled_mid_body_is_counted_out_once(
    start_service: StartService, stub_for: Any, chunks_before: int
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    for _ in range(chunks_before):
        await stream.write(response_body(b"data: 1\n\n"))
        await stream.read()
    stream.cancel()
    await eventually(lambda: active(service, "a") == 0 and service.flow.in_flight == 0)
    assert (await scrape(service))[DISPATCHED] == 1


async def test_a_stream_closed_mid_body_is_counted_out_once(
    start_service: StartService, stub_for: Any
) -> None:
    service = await start_service()
    stream = await dispatched_stream(service, stub_for)
    await stream.write(response_body(b"data: 1\n\n"))
    await stream.read()
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert active(service, "a") == 0
    assert (await scrape(service))[DISPATCHED] == 1
