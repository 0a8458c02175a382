"""The cheapest possible ext_proc processor: answers every phase unchanged.

The baseline of `make bench`: whatever workload-extproc costs beyond this is
the price of its tracking, queueing and policy. In full-duplex mode (told by
the stream's `protocol_config`, as the service does) it answers the request
headers at once and echoes every body chunk as a `streamed_response`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

ANSWERS = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


class NullProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        duplex = False
        async for message in requests:
            phase = message.WhichOneof("request") or ""
            if phase == "request_headers":
                duplex = message.protocol_config.request_body_mode == FULL_DUPLEX
            if duplex and phase.endswith("_body"):
                yield echo(phase, getattr(message, phase))
                continue
            answer = ANSWERS.get(phase)
            if answer is not None:
                yield answer


def echo(phase: str, chunk: Any) -> Any:
    answer = pb.ProcessingResponse()
    streamed = getattr(answer, phase).response.body_mutation.streamed_response
    streamed.body = chunk.body
    streamed.end_of_stream = chunk.end_of_stream
    return answer


async def main(address: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(), server)
    server.add_insecure_port(address)
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9002"))
