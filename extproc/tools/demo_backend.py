"""A stand-in for an LLM inference server, for `make run` and for the end-to-end tests.

Like a model server it runs a limited number of requests at once (the rest wait
inside it, where no fairness applies -- which is why the queue in front of it
matters) and streams each answer as server-sent events, one token at a time.
`?tokens=N&duration=S` overrides the per-request defaults.

`GET /metrics` reports its real load under vLLM's metric names, so
`--capacity metrics` can gate on it: requests waiting and running, and a
KV-cache use of the tokens held by running requests over a cache sized for
1.5 x `concurrency` default answers. `demo_backend_max_waiting` is the most
requests that ever waited at once, for tests to check a gate against.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from aiohttp import web

MAX_TOKENS = 10_000
MAX_DURATION = 600.0
KV_CACHE_HEADROOM = 1.5


@dataclass
class _Load:
    concurrency: int
    tokens: int
    duration: float
    waiting: int = 0
    running: int = 0
    max_waiting: int = 0
    cached_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.cached_tokens / (KV_CACHE_HEADROOM * self.concurrency * self.tokens))


_LOAD = web.AppKey("load", _Load)
_SEMAPHORE = web.AppKey("semaphore", asyncio.Semaphore)


def make_demo_app(concurrency: int = 4, tokens: int = 20, duration: float = 2.0) -> web.Application:
    app = web.Application()
    app[_SEMAPHORE] = asyncio.Semaphore(concurrency)
    app[_LOAD] = _Load(concurrency, max(tokens, 1), duration)
    app.router.add_get("/metrics", _metrics)
    app.router.add_route("*", "/{path:.*}", _generate)
    return app


async def _metrics(request: web.Request) -> web.Response:
    load = request.app[_LOAD]
    lines = [
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{model_name="demo"}} {load.waiting}',
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{model_name="demo"}} {load.running}',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{model_name="demo"}} {load.kv_cache_usage:.4f}',
        "# TYPE demo_backend_max_waiting gauge",
        f"demo_backend_max_waiting {load.max_waiting}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _generate(request: web.Request) -> web.StreamResponse:
    load = request.app[_LOAD]
    try:
        tokens = min(int(request.query.get("tokens", load.tokens)), MAX_TOKENS)
        duration = min(float(request.query.get("duration", load.duration)), MAX_DURATION)
    except ValueError:
        raise web.HTTPBadRequest(text="tokens must be an integer, duration a number\n") from None
    await request.read()
    load.waiting += 1
    load.max_waiting = max(load.max_waiting, load.waiting)
    try:
        await request.app[_SEMAPHORE].acquire()
    finally:
        load.waiting -= 1
    load.running += 1
    try:
        return await _stream(request, load, max(tokens, 0), duration)
    finally:
        load.running -= 1
        request.app[_SEMAPHORE].release()


async def _stream(
    request: web.Request, load: _Load, tokens: int, duration: float
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    first = {
        "workload_id": request.headers.get("x-workload-id"),
        "queue_wait_ms": request.headers.get("x-workload-queue-wait-ms"),
    }
    held = 0
    try:
        await response.write(f"data: {json.dumps(first)}\n\n".encode())
        for index in range(tokens):
            await asyncio.sleep(duration / max(tokens, 1))
            held += 1
            load.cached_tokens += 1
            await response.write(f"data: {json.dumps({'token': index})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client stopped reading; a model server would stop generating too
    finally:
        load.cached_tokens -= held
    return response
