"""A loopback model server for the pool end-to-end tests: an OpenAI-like API whose
answers say which endpoint served them, a vLLM metrics page the test steers, and
responses it holds, streams or drops on the test's word."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class PoolEndpoint:
    name: str
    waiting: int = 0
    """vllm:num_requests_waiting on the metrics page: the test sets it to report saturation."""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Requests with `"hold": true` in their body wait for it."""
    served: list[str] = field(default_factory=list)
    """x-workload-id of each request served, in arrival order."""
    running: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _sock: socket.socket | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        await web.SockSite(self._runner, self._sock).start()

    async def stop(self) -> None:
        """Stop serving and listening: connections to it are refused from now on."""
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            f"vllm:num_requests_waiting {self.waiting}\n"
            f"vllm:num_requests_running {self.running}\n"
            "vllm:kv_cache_usage_perc 0.1\n"
        )
        return web.Response(text=text)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.served.append(request.headers.get("x-workload-id", ""))
        self.running += 1
        try:
            try:
                document = json.loads(body)
            except ValueError:
                document = {}
            if not isinstance(document, dict):
                document = {}
            if document.get("hold"):
                await self.gate.wait()
            if document.get("stream"):
                return await self._stream(request, document)
            return web.json_response(
                {
                    "endpoint": self.name,
                    "destination": request.headers.get("x-gateway-destination-endpoint", ""),
                    "bytes": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
            )
        finally:
            self.running -= 1

    async def _stream(
        self, request: web.Request, document: dict[str, object]
    ) -> web.StreamResponse:
        """SSE: `chunks` events `interval` seconds apart, then [DONE]; with `"reset": true`
        the connection drops after the first event."""
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunks = int(str(document.get("chunks", 3)))
        interval = float(str(document.get("interval", 0.2)))
        for index in range(chunks):
            event = {"endpoint": self.name, "index": index}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(interval)
            if document.get("reset"):
                # Die mid-answer: the connection is torn down under the response.
                assert request.transport is not None
                request.transport.abort()
                return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
