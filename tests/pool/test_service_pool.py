"""Pool mode in the real service: endpoints scraped, picked, shown, and counted out."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from tests.conftest import StartService
from tests.support.extproc_client import exchange, response_trailers, workload_headers
from tests.support.metrics_page import scrape
from tests.support.process import top_frame


@pytest.fixture
async def model_server() -> AsyncIterator[str]:
    """A model server's metrics page of the tests' own: 1 waiting, 2 running, KV 30%."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text="vllm:num_requests_waiting 1\nvllm:num_requests_running 2\n"
            "vllm:kv_cache_usage_perc 0.3\n"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


def closed_port() -> str:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def endpoints(http: aiohttp.ClientSession, admin_port: int) -> dict[str, Any]:
    async with http.get(f"http://127.0.0.1:{admin_port}/v1/endpoints") as reply:
        assert reply.status == 200
        body = await reply.json()
    return {e["address"]: e for e in body["endpoints"]}


async def until(condition: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_endpoints_are_scraped_picked_shown_and_counted_out(
    start_service: StartService, model_server: str
) -> None:
    dead = closed_port()
    service = await start_service(endpoints=[model_server, dead], endpoint_stale=0.3)
    async with aiohttp.ClientSession() as http:

        async def dead_is_out() -> bool:
            seen = await endpoints(http, service.admin_port)
            return not seen[dead]["ready"] and seen[model_server]["waiting"] == 1

        await until(dead_is_out)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stream, answer = await exchange(channel, workload_headers("a"), complete=False)
            assert answer.WhichOneof("response") == "request_headers"
            live = (await endpoints(http, service.admin_port))[model_server]
            assert (live["in_flight"], live["picked"], live["running"]) == (1, 1, 2)
            assert live["kv_cache_usage"] == pytest.approx(0.3)
            assert live["scrape_age"] is not None
            samples = await scrape(service)
            label = (("endpoint", model_server),)
            assert samples["extproc_endpoint_in_flight_requests", label] == 1
            assert samples["extproc_endpoint_picked_total", label] == 1
            assert samples["extproc_endpoint_ready", (("endpoint", dead),)] == 0
            frame = await top_frame(service.grpc_port)
            assert "endpoints (picker scored)" in frame
            row = next(line for line in frame.splitlines() if model_server in line)
            assert "yes" in row
            await stream.write(response_trailers())
            await stream.read()
        assert (await endpoints(http, service.admin_port))[model_server]["in_flight"] == 0


async def test_without_endpoints_there_is_no_pool(start_service: StartService) -> None:
    service = await start_service()
    assert service.pool is None
    assert service.flow.pool is None
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/v1/endpoints") as reply,
    ):
        assert reply.status == 404
        assert "endpoint picking is off" in (await reply.json())["detail"]
