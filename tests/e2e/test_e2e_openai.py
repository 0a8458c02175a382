"""End to end, the official `openai` SDK through real Envoy (bundled config) and the
real service to the demo model server: what a user of `make run` does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import openai
import pytest

from extproc.service.app import Service
from extproc.tools.demo_backend import Timing
from tests.conftest import StartService
from tests.support.demo_server import demo_server
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "Is the queue fair?"}]


@dataclass
class Gateway:
    service: Service
    base_url: str

    def headers(self, workload: str) -> dict[str, str]:
        return {"x-workload-context": json.dumps({"workload_id": workload, "criticality": 3})}

    def sync(self, workload: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key="unused", max_retries=0,
            default_headers=self.headers(workload),
        )  # fmt: skip

    def async_(self, workload: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key="unused", max_retries=0,
            default_headers=self.headers(workload),
        )  # fmt: skip

    def dispatched(self, workload: str) -> int:
        status = self.service.reader.get(workload)
        return status.metrics.dispatched_count if status else 0

    def active(self, workload: str) -> int:
        status = self.service.reader.get(workload)
        return status.metrics.active_requests if status else 0


@pytest.fixture
async def gateway(start_service: StartService) -> AsyncIterator[Gateway]:
    timing = Timing(first_token=0.01, inter_token=0.01)
    async with AsyncExitStack() as stack:
        base = await stack.enter_async_context(demo_server(2, max_tokens=6, timing=timing))
        service = await start_service(max_concurrency=2)
        envoy = Envoy(bundled_config(service.grpc_port, int(base.rsplit(":", 1)[1])))
        stack.push_async_callback(envoy.stop)
        await envoy.start()
        yield Gateway(service, f"http://127.0.0.1:{envoy.port}/v1")


def sync_session(gateway: Gateway) -> None:
    client = gateway.sync("sync-team")
    chat = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == " the queue is"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="demo", messages=CHAT, stream=True)  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert len(text.split()) == 6  # the server's default max_tokens
    plain = client.completions.create(model="demo", prompt="hello", max_tokens=2)
    assert plain.choices[0].text == " the queue"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model="demo", prompt="hello", max_tokens=0)


async def test_the_sync_sdk_works_through_the_gateway(gateway: Gateway) -> None:
    await asyncio.to_thread(sync_session, gateway)  # Envoy's peers run on this loop
    assert gateway.dispatched("sync-team") == 4  # the 400 was dispatched too: the server said no
    await eventually(lambda: gateway.active("sync-team") == 0)


async def test_the_async_sdk_streams_through_the_gateway_and_keeps_the_workload(
    gateway: Gateway,
) -> None:
    async def streamed(workload: str) -> tuple[str, int]:
        stream = await gateway.async_(workload).chat.completions.create(
            model="demo", messages=CHAT, max_tokens=5, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    async def whole(workload: str) -> str | None:
        raw = await gateway.async_(workload).completions.with_raw_response.create(
            model="demo", prompt="hello", max_tokens=4
        )
        assert raw.parse().choices[0].text == " the queue is fair"
        return raw.headers.get("x-demo-workload-id")

    # Six at once from two workloads through two slots: some queue in the service.
    results = await asyncio.gather(
        *(streamed(f"team-{i % 2}") for i in range(4)), whole("team-a"), whole("team-b")
    )
    assert results[:4] == [(" the queue is fair and", 5)] * 4
    # The server saw the workload the service identified from the SDK's default header.
    assert results[4:] == ["team-a", "team-b"]
    for workload, count in (("team-0", 2), ("team-1", 2), ("team-a", 1), ("team-b", 1)):
        assert gateway.dispatched(workload) == count
    await eventually(lambda: all(gateway.active(w) == 0 for w in ("team-0", "team-1")))
