"""A model server for the bench that streams every response as K SSE events.

Usage: sse_backend.py PORT K

Speaks cleartext HTTP/2 (prior knowledge) to Envoy so that each SSE event is
its own DATA frame: Envoy hands the ext_proc filter one body chunk per frame,
so the processor sees K response body messages whatever the scheduling (over
HTTP/1.1 Envoy hands on whatever one socket read returned, and the chunk count
would depend on timing). The last event carries the OpenAI `usage` object and
`[DONE]`, as a server does with `stream_options.include_usage`. A connection
that does not start with the HTTP/2 preface is answered once as HTTP/1.1 with
a vLLM metrics page (the pool's scrapes). Hand-rolled rather than an HTTP/2
library, so the backend stays far cheaper than the Envoy and wrk it shares a
core with: the answer's frames are built once, and only the stream id changes.
Never used by the service; a measuring instrument only.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x6, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
_FRAME = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_BIG_WINDOW = 2**31 - 1
METRICS = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    length = len(payload)
    return _FRAME.pack(length >> 8, length & 0xFF, kind, flags, stream) + payload


def events(chunks: int) -> list[bytes]:
    """K SSE events: K-1 tokens, then the usage event and [DONE]."""
    token = {"id": "cmpl-bench", "object": "text_completion", "choices": [{"text": " tok"}]}
    usage = {"prompt_tokens": 9, "completion_tokens": chunks}
    last = {"id": "cmpl-bench", "object": "text_completion", "choices": [], "usage": usage}
    body = [f"data: {json.dumps(token)}\n\n".encode()] * (chunks - 1)
    return [*body, f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()]


class Answer:
    """One response's frames, with the stream id patched in per request."""

    def __init__(self, chunks: int) -> None:
        # :status 200 (static table index 8) and content-type: text/event-stream as a
        # literal without indexing (name from the static table, index 31).
        value = b"text/event-stream"
        block = b"\x88\x0f\x10" + bytes([len(value)]) + value
        self._parts = [(HEADERS, END_HEADERS, block)]
        payloads = events(chunks)
        self._parts += [(DATA, 0, p) for p in payloads[:-1]]
        self._parts.append((DATA, END_STREAM, payloads[-1]))

    def to(self, stream: int) -> bytes:
        return b"".join(frame(kind, flags, stream, payload) for kind, flags, payload in self._parts)


class Connection(asyncio.Protocol):
    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._buffer = b""
        self._http2: bool | None = None
        self._received = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._http2 is None:
            if len(self._buffer) < len(PREFACE) and PREFACE.startswith(self._buffer):
                return
            self._http2 = self._buffer.startswith(PREFACE)
            if not self._http2:
                self._metrics()
                return
            self._buffer = self._buffer[len(PREFACE) :]
            # Our settings (a huge initial window), and the connection window opened wide.
            settings = struct.pack(">HL", 0x4, _BIG_WINDOW)
            self._write(frame(SETTINGS, 0, 0, settings))
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", _BIG_WINDOW - 65535)))
        if self._http2:
            self._frames()

    def _metrics(self) -> None:
        if b"\r\n\r\n" not in self._buffer:
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
        self._write(head + b"content-length: %d\r\n\r\n" % len(METRICS) + METRICS)
        assert self._transport is not None
        self._transport.close()

    def _frames(self) -> None:
        out = []
        buffer, offset = self._buffer, 0
        while len(buffer) - offset >= 9:
            high, low, kind, flags, stream = _FRAME.unpack_from(buffer, offset)
            length = (high << 8) | low
            if len(buffer) - offset - 9 < length:
                break
            offset += 9 + length
            stream &= 0x7FFFFFFF
            if kind == SETTINGS and not flags & ACK:
                out.append(frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, buffer[offset - 8 : offset]))
            elif kind == DATA:
                self._received += length
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                out.append(self._answer.to(stream))
        self._buffer = buffer[offset:]
        if self._received > 1 << 30:  # give the request bodies' window back, now and then
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self._received)))
            self._received = 0
        if out:
            self._write(b"".join(out))

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)


async def main(port: int, chunks: int) -> None:
    answer = Answer(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answer), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
