"""A stand-in for an LLM inference server, for `make run` and for the end-to-end tests.

Like a model server it runs a limited number of requests at once (the rest wait
inside it, where no fairness applies -- which is why the queue in front of it
matters) and streams each answer as server-sent events, one token at a time.
`?tokens=N&duration=S` overrides the per-request defaults.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

MAX_TOKENS = 10_000
MAX_DURATION = 600.0
_SEMAPHORE = web.AppKey("semaphore", asyncio.Semaphore)
_DEFAULTS = web.AppKey("defaults", tuple)


def make_demo_app(concurrency: int = 4, tokens: int = 20, duration: float = 2.0) -> web.Application:
    app = web.Application()
    app[_SEMAPHORE] = asyncio.Semaphore(concurrency)
    app[_DEFAULTS] = (tokens, duration)
    app.router.add_route("*", "/{path:.*}", _generate)
    return app


async def _generate(request: web.Request) -> web.StreamResponse:
    default_tokens, default_duration = request.app[_DEFAULTS]
    try:
        tokens = min(int(request.query.get("tokens", default_tokens)), MAX_TOKENS)
        duration = min(float(request.query.get("duration", default_duration)), MAX_DURATION)
    except ValueError:
        raise web.HTTPBadRequest(text="tokens must be an integer, duration a number\n") from None
    await request.read()
    async with request.app[_SEMAPHORE]:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        first = {
            "workload_id": request.headers.get("x-workload-id"),
            "queue_wait_ms": request.headers.get("x-workload-queue-wait-ms"),
        }
        try:
            await response.write(f"data: {json.dumps(first)}\n\n".encode())
            for index in range(max(tokens, 0)):
                await asyncio.sleep(duration / max(tokens, 1))
                await response.write(f"data: {json.dumps({'token': index})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading; a model server would stop generating too
        return response
