"""End to end: real Envoy (bundled config), the real gRPC service, a real HTTP backend,
all on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from extproc.service.app import Service
from extproc.stats import percentile
from tests.conftest import StartService
from tests.support.backend import Backend
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually, eventually_async

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    service: Service
    backend: Backend
    envoy: Envoy
    http: aiohttp.ClientSession

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.envoy.port}{path}"

    def get(self, workload: str, path: str = "/", criticality: int = 3, **kw: Any) -> Any:
        context = json.dumps({"workload_id": workload, "criticality": criticality})
        return self.http.get(self.url(path), headers={"x-workload-context": context}, **kw)

    async def fetch(self, workload: str, path: str = "/", criticality: int = 3) -> int:
        async with self.get(workload, path, criticality) as reply:
            await reply.read()
            return reply.status

    def counts(self, workload: str) -> tuple[int, int]:
        """(active, queued) for the workload; (0, 0) when it is unknown."""
        status = self.service.reader.get(workload)
        return (status.metrics.active_requests, status.queued_requests) if status else (0, 0)


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(start_service: StartService) -> AsyncIterator[MakeStack]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(envoy_filter: dict[str, Any] | None = None, **settings: object) -> Stack:
        backend = Backend()
        await backend.start()
        cleanups.append(backend.stop)
        service = await start_service(**settings)
        envoy = Envoy(bundled_config(service.grpc_port, backend.port, **(envoy_filter or {})))
        cleanups.append(envoy.stop)
        await envoy.start()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        cleanups.append(http.close)
        return Stack(service, backend, envoy, http)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


async def hold_capacity(stack: Stack, count: int = 1) -> list[asyncio.Task[int]]:
    """Occupy `count` slots with requests the backend holds until its gate opens."""
    tasks = [asyncio.create_task(stack.fetch("blocker", "/held")) for _ in range(count)]
    await eventually(lambda: stack.backend.running == count)
    return tasks


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("workload-aware", ["crit-5", "crit-3", "crit-1"]), ("fcfs", ["crit-1", "crit-5", "crit-3"])],
)
async def test_held_requests_are_released_in_policy_order(
    make_stack: MakeStack, policy: str, expected: list[str]
) -> None:
    stack = await make_stack(max_concurrency=1, policy=policy)
    blocker = await hold_capacity(stack)
    waiting = []
    for queued, criticality in enumerate((1, 5, 3), start=1):
        waiting.append(asyncio.create_task(stack.fetch(f"crit-{criticality}", "/", criticality)))
        await eventually(lambda n=queued: stack.service.flow.queued == n)  # type: ignore[misc]
    stack.backend.gate.set()
    assert await asyncio.gather(*blocker, *waiting) == [200] * 4
    assert stack.backend.arrivals[1:] == expected


async def test_full_queue_answers_429_with_retry_after(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=1, max_queue=1)
    blocker = await hold_capacity(stack)
    queued = asyncio.create_task(stack.fetch("a"))
    await eventually(lambda: stack.service.flow.queued == 1)
    async with stack.get("a") as reply:
        assert reply.status == 429
        assert reply.headers["retry-after"] == "1"
        assert reply.headers["x-workload-dropped-reason"] == "queue-full"
        assert "queue-full" in await reply.text()
    stack.backend.gate.set()
    assert await asyncio.gather(*blocker, queued) == [200, 200]
    await eventually(lambda: stack.counts("a") == (0, 0))


async def test_queue_timeout_answers_503_after_outliving_envoys_message_timeout(
    make_stack: MakeStack,
) -> None:
    # With Envoy's message_timeout at 1 s and the queue timeout longer, a 503 from the
    # queue (not Envoy's 504) proves the held request's timeout override reached Envoy.
    stack = await make_stack({"message_timeout": "1s"}, max_concurrency=1, queue_timeout=1.5)
    blocker = await hold_capacity(stack)
    started = asyncio.get_running_loop().time()
    async with stack.get("late") as reply:
        assert reply.status == 503
        assert reply.headers["x-workload-dropped-reason"] == "queue-timeout"
        assert "queue-timeout" in await reply.text()
    assert asyncio.get_running_loop().time() - started >= 1.4
    await eventually(lambda: stack.counts("late") == (0, 0))
    stack.backend.gate.set()
    await asyncio.gather(*blocker)
    stats = await stack.envoy.stats("ext_proc")
    assert stats.get("http.ingress.ext_proc.message_timeouts", 0) == 0


async def test_client_disconnect_while_queued_is_counted_out(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=1)
    blocker = await hold_capacity(stack)
    leaving = asyncio.create_task(stack.fetch("leaver"))
    await eventually(lambda: stack.counts("leaver") == (1, 1))
    leaving.cancel()  # closes the client's connection to Envoy
    await eventually(lambda: stack.counts("leaver") == (0, 0))
    assert stack.service.flow.queued == 0
    stack.backend.gate.set()
    await asyncio.gather(*blocker)
    await eventually(lambda: stack.service.flow.in_flight == 0)
    assert "leaver" not in stack.backend.arrivals


async def test_backend_reset_mid_response_is_counted_out(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=2)
    with pytest.raises(aiohttp.ClientPayloadError):
        await stack.fetch("victim", "/reset")
    await eventually(lambda: stack.counts("victim") == (0, 0))
    assert stack.service.flow.in_flight == 0
    status = stack.service.reader.get("victim")
    assert status is not None
    assert status.metrics.dispatched_count == 1


async def test_streamed_response_stays_active_until_its_last_byte(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=1)
    async with stack.get("streamer", "/stream") as reply:
        assert await reply.content.readline() == b"first chunk\n"
        # Well past Envoy's 1 s message timeout, the response is still streaming and
        # still counted: the processor must not have been told it ended.
        for _ in range(15):
            assert stack.counts("streamer") == (1, 0)
            assert stack.service.flow.in_flight == 1
            await asyncio.sleep(0.1)
        stack.backend.gate.set()
        assert await reply.content.readline() == b"last chunk\n"
        await reply.read()
    await eventually(lambda: stack.counts("streamer") == (0, 0))
    assert stack.service.flow.in_flight == 0


async def test_1500_requests_held_at_once_all_complete(make_stack: MakeStack) -> None:
    total, slots = 1500, 50
    stack = await make_stack(max_concurrency=slots)
    tasks = [
        asyncio.create_task(stack.fetch(f"w{i % 20}", "/held", criticality=1 + i % 5))
        for i in range(total)
    ]
    await eventually(
        lambda: stack.service.flow.queued == total - slots and stack.backend.running == slots,
        within=60,
    )
    stack.backend.gate.set()
    statuses = await asyncio.gather(*tasks)
    assert statuses.count(200) == total
    assert stack.backend.peak == slots  # capacity held: never more in flight than allowed
    metrics = stack.service.registry.list_metrics()
    assert sum(m.total_requests for m in metrics) == total
    assert sum(m.dispatched_count for m in metrics) == total
    await eventually(lambda: all(stack.counts(m.workload_id) == (0, 0) for m in metrics))
    assert stack.service.flow.in_flight == 0


async def test_bad_header_gets_400_and_never_reaches_the_backend(make_stack: MakeStack) -> None:
    stack = await make_stack()
    headers = {"x-workload-context": '{"workload_id": "a", "criticality": "high"}'}
    async with stack.http.get(stack.url(), headers=headers) as reply:
        assert reply.status == 400
        assert reply.headers["x-workload-dropped-reason"] == "invalid-workload-context"
        body = await reply.json()
    assert body["header"] == "x-workload-context"
    assert "criticality" in body["detail"]
    assert stack.backend.arrivals == []
    assert stack.service.registry.list_metrics() == []


async def test_fairness_id_header_and_default_workload(make_stack: MakeStack) -> None:
    stack = await make_stack()

    async def processor_healthy() -> bool:
        async with stack.http.get(stack.envoy.admin_url("/clusters")) as reply:
            text = await reply.text()
        return (
            f"workload_extproc::127.0.0.1:{stack.service.grpc_port}::health_flags::healthy" in text
        )

    await eventually_async(processor_healthy)
    headers = {"x-gateway-inference-fairness-id": "gie-tenant"}
    async with stack.http.get(stack.url(), headers=headers) as reply:
        assert reply.status == 200
    async with stack.http.get(stack.url()) as reply:
        assert reply.status == 200
    assert stack.backend.arrivals == ["gie-tenant", "default"]


async def noisy_neighbour_light_p99(stack: Stack, seconds: float) -> tuple[float, int]:
    """A closed-loop flood from one tenant and steady traffic from four light ones;
    returns the light tenants' p99 queue wait (ms, as the backend saw it) and their count."""
    service = 0.05
    deadline = asyncio.get_running_loop().time() + seconds

    async def flood() -> None:
        while asyncio.get_running_loop().time() < deadline:
            await stack.fetch("heavy", f"/work?seconds={service}")

    async def light(name: str) -> None:
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.gather(stack.fetch(name, f"/work?seconds={service}"), asyncio.sleep(0.2))

    await asyncio.gather(*(flood() for _ in range(24)), *(light(f"light-{i}") for i in range(4)))
    waits = [wait for workload, wait in stack.backend.waits if workload.startswith("light")]
    return percentile(waits, 99), len(waits)


async def test_noisy_neighbour_through_envoy(make_stack: MakeStack) -> None:
    fair = await make_stack(max_concurrency=4, policy="fair-share")
    fair_p99, fair_count = await noisy_neighbour_light_p99(fair, seconds=5)
    fcfs = await make_stack(max_concurrency=4, policy="fcfs")
    fcfs_p99, fcfs_count = await noisy_neighbour_light_p99(fcfs, seconds=5)
    assert min(fair_count, fcfs_count) >= 40
    # Measured here: about 50 ms against 350 ms; the claim is a factor of 3.
    assert fair_p99 * 3 <= fcfs_p99, (fair_p99, fcfs_p99)


async def blocked_with_queue(stack: Stack, queued: int) -> tuple[list[Any], list[Any]]:
    """One slot held at the backend, `queued` requests waiting behind it."""
    blocker = await hold_capacity(stack)
    waiting = [asyncio.create_task(stack.fetch(f"q{i}")) for i in range(queued)]
    await eventually(lambda: stack.service.flow.queued == queued)
    return blocker, waiting


async def test_drain_dispatches_the_queue_then_stops(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=1)
    blocker, queued = await blocked_with_queue(stack, 3)
    stopping = asyncio.create_task(stack.service.stop(drain_timeout=10, grace=10))
    await eventually(lambda: not stack.service.ready)
    async with stack.http.get(f"http://127.0.0.1:{stack.service.admin_port}/readyz") as reply:
        assert reply.status == 503
    async with stack.get("late") as reply:
        assert reply.status == 503
        assert reply.headers["x-workload-dropped-reason"] == "shutdown"
    stack.backend.gate.set()  # capacity frees: the queue drains through it
    assert await asyncio.gather(*blocker, *queued) == [200] * 4
    await stopping
    assert all(m.active_requests == 0 for m in stack.service.registry.list_metrics())


async def test_drain_timeout_rejects_the_rest_and_in_flight_finishes(make_stack: MakeStack) -> None:
    stack = await make_stack(max_concurrency=1)
    blocker, queued = await blocked_with_queue(stack, 3)
    stopping = asyncio.create_task(stack.service.stop(drain_timeout=0.3, grace=10))
    assert await asyncio.gather(*queued) == [503] * 3  # drain timed out: shutdown
    assert not stopping.done()  # the in-flight response still has its grace period
    stack.backend.gate.set()
    assert await asyncio.gather(*blocker) == [200]
    await stopping
    assert all(m.active_requests == 0 for m in stack.service.registry.list_metrics())
    assert stack.service.flow.in_flight == 0
