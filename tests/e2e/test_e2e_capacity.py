"""End to end, the capacity gates against the demo model server: real Envoy (bundled
config), the real service and the demo backend, on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.demo_server import completion
from tests.support.demo_stack import DemoStack
from tests.support.demo_stack import demo_stack as start_demo_stack
from tests.support.extproc_client import eventually

pytestmark = pytest.mark.e2e

SLOTS = 4
THRESHOLD = 2


MakeDemoStack = Callable[..., Awaitable[DemoStack]]


@pytest.fixture
async def demo_stack() -> AsyncIterator[MakeDemoStack]:
    async with contextlib.AsyncExitStack() as stacks:

        async def make(duration: float = 0.5, **settings: object) -> DemoStack:
            return await stacks.enter_async_context(start_demo_stack(SLOTS, duration, **settings))

        yield make


async def test_metrics_gate_keeps_the_model_server_busy_and_its_queue_at_its_threshold(
    demo_stack: MakeDemoStack,
) -> None:
    # The scenario of `make bench`'s capacity table, shorter; bounds loose for a busy machine.
    stack = await demo_stack(
        duration=0.2, capacity="metrics", waiting_threshold=THRESHOLD, max_concurrency=64
    )
    assert stack.service.flow.capacity.status().fallback is False  # scraped before serving
    queued_peak = 0

    async def watch_queue() -> None:
        nonlocal queued_peak
        while True:
            queued_peak = max(queued_peak, stack.service.flow.queued)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_queue())
    flood = await stack.flood(clients=40, seconds=6.0)
    watcher.cancel()
    assert flood.statuses == Counter({200: flood.served})
    assert queued_peak >= 20  # the flood really waited in our queue, not in the server
    # Work-conserving: the server's slots were kept busy (the old rule: 2 of 4)...
    assert flood.busy() >= 0.8 * SLOTS, flood.running
    assert flood.served >= 0.7 * SLOTS / 0.2 * 6.0
    # ...and only the threshold queued inside it, at every sample and at its own count.
    assert max(flood.waiting) <= THRESHOLD + 2, flood.waiting
    assert await stack.backend_metric("demo_backend_max_waiting") <= THRESHOLD + 2
    status = stack.service.flow.capacity.status()
    assert status.fallback is False  # a scrape may time out on a busy machine; not many
    assert status.endpoints[0].slots == SLOTS
    await eventually(lambda: stack.service.flow.in_flight == 0)


async def test_without_a_gate_the_same_flood_waits_inside_the_model_server(
    demo_stack: MakeDemoStack,
) -> None:
    stack = await demo_stack(capacity="static", max_concurrency=0)
    await stack.flood(clients=40, seconds=3.0)
    assert await stack.backend_metric("demo_backend_max_waiting") >= 30


async def test_adaptive_learns_from_first_bytes_that_envoy_sends_on_request(
    demo_stack: MakeDemoStack,
) -> None:
    stack = await demo_stack(capacity="adaptive", max_concurrency=16, adaptive_min_limit=2)
    flood = await stack.flood(clients=20, seconds=8.0)
    assert set(flood.statuses) == {200}
    status = stack.service.flow.capacity.status()
    # Samples arrived only if Envoy honoured the mode override and sent response headers.
    assert status.min_latency is not None
    assert status.latency is not None
    assert status.min_latency < 0.25  # first byte, not the 0.5 s response
    assert 2 <= status.limit <= 16
    # The override kept response trailers: a request stays in flight until its last byte.
    url = f"http://127.0.0.1:{stack.envoy.port}/v1/completions"
    async with stack.http.post(url, json=completion(15)) as reply:
        await reply.content.readline()  # the first event: the response has begun
        assert stack.service.flow.in_flight == 1
        await reply.read()
    await eventually(lambda: stack.service.flow.in_flight == 0)
