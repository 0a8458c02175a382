"""The demo model server (extproc demo-backend) on an ephemeral loopback port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from extproc.tools.demo_backend import make_demo_app


@asynccontextmanager
async def demo_server(concurrency: int = 4, **options: Any) -> AsyncIterator[str]:
    """Serve `make_demo_app(concurrency, **options)`; yields its base URL."""
    runner = web.AppRunner(make_demo_app(concurrency, **options))
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


def completion(max_tokens: int, prompt: str = "hello", stream: bool = True) -> dict[str, Any]:
    """A /v1/completions body, as a client of the demo server sends it."""
    return {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
