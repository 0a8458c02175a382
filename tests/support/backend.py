"""A loopback HTTP backend the end-to-end tests steer: it records who arrived, and holds,
streams or resets responses on the test's word."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Backend:
    arrivals: list[str] = field(default_factory=list)
    """x-workload-id of each request, in arrival order."""
    waits: list[tuple[str, float]] = field(default_factory=list)
    """(x-workload-id, x-workload-queue-wait-ms) of each request."""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """`/held` requests wait for it."""
    running: int = 0
    peak: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._ok)
        app.router.add_get("/held", self._held)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/reset", self._reset)
        app.router.add_get("/work", self._work)
        app.router.add_get("/drip", self._drip)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Count a request as running at the backend (and its peak) while inside."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1

    def _arrive(self, request: web.Request) -> None:
        workload = request.headers.get("x-workload-id", "")
        self.arrivals.append(workload)
        self.waits.append((workload, float(request.headers.get("x-workload-queue-wait-ms", "0"))))

    async def _ok(self, request: web.Request) -> web.Response:
        self._arrive(request)
        return web.Response(text="ok")

    async def _work(self, request: web.Request) -> web.Response:
        """Busy for `?seconds=S`, like a model server generating."""
        self._arrive(request)
        with self._busy():
            await asyncio.sleep(float(request.query["seconds"]))
        return web.Response(text="ok")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        """A chunk every 50 ms for `?seconds=S`, like tokens streaming."""
        self._arrive(request)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(int(float(request.query["seconds"]) / 0.05)):
            await response.write(b"token\n")
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    async def _held(self, request: web.Request) -> web.Response:
        self._arrive(request)
        with self._busy():
            await self.gate.wait()
        return web.Response(text="ok")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """First chunk at once, the last one only when the gate opens."""
        self._arrive(request)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first chunk\n")
        await self.gate.wait()
        await response.write(b"last chunk\n")
        await response.write_eof()
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        """Headers and half a body, then the connection is torn down."""
        self._arrive(request)
        response = web.StreamResponse(headers={"content-length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response
