"""The demo backend `make run` starts: an LLM-like server streaming server-sent events."""

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from extproc.tools.demo_backend import make_demo_app


async def test_streams_tokens_and_echoes_the_workload() -> None:
    async with TestClient(TestServer(make_demo_app(tokens=3, duration=0.03))) as client:
        reply = await client.post("/v1/completions", headers={"x-workload-id": "team-a"})
        assert reply.headers["content-type"] == "text/event-stream"
        events = [e for e in (await reply.text()).split("\n\n") if e]
    assert events[0] == 'data: {"workload_id": "team-a", "queue_wait_ms": null}'
    assert events[1:] == [
        'data: {"token": 0}', 'data: {"token": 1}', 'data: {"token": 2}', "data: [DONE]",
    ]  # fmt: skip


async def test_limits_how_many_requests_it_serves_at_once() -> None:
    finished: list[str] = []

    async def fetch(client: TestClient, name: str, query: str) -> None:
        reply = await client.get(f"/?{query}")
        await reply.read()
        finished.append(name)

    async with TestClient(TestServer(make_demo_app(concurrency=1))) as client:
        slow = await client.get("/?tokens=1&duration=0.5")  # headers sent: it holds the slot
        fast = asyncio.create_task(fetch(client, "fast", "tokens=0&duration=0"))
        await slow.read()
        finished.append("slow")
        await fast
    # Unlimited, the instant request would finish long before the half-second one.
    assert finished == ["slow", "fast"]


async def test_rejects_bad_parameters() -> None:
    async with TestClient(TestServer(make_demo_app())) as client:
        reply = await client.get("/?tokens=many")
        assert reply.status == 400
