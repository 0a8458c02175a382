"""Replicas sharing one real Redis: counts, leased capacity, lost replies, outages.

The replicas here are registries and fleet syncs in one process (no gRPC), so
each step is explicit; tests/test_e2e_fleet.py runs real replicas behind Envoy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import grpc
import pytest
from pydantic import ValidationError
from redis import asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.clock import SystemClock, VirtualClock
from extproc.config import Settings, public_view
from extproc.fleet.registry import SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest
from extproc.outcomes import Outcome
from extproc.registry.memory import OVERFLOW_WORKLOAD, InMemoryWorkloadRegistry
from extproc.service.app import make_capacity
from tests.conftest import StartService
from tests.support.extproc_client import exchange, workload_headers
from tests.support.metrics_page import scrape
from tests.support.process import top_frame
from tests.support.redis_server import RedisServer


class Replica:
    def __init__(
        self, url: str, capacity: int = 0, lease: float = 5.0, idle_ttl: float = 300.0
    ) -> None:
        clock = SystemClock()
        self.registry = SharedWorkloadRegistry(
            InMemoryWorkloadRegistry(clock), clock, stale_after=lease
        )
        options = FleetOptions(url=url, lease=lease, prefix="test", idle_ttl=idle_ttl)
        self.capacity = (
            LeasedCapacity(capacity, clock, lease, margin=options.interval) if capacity else None
        )
        self.demand = (0, 0)
        self.fleet = FleetSync(self.registry, options, lambda: self.demand, self.capacity)

    def new(self, workload: str, count: int = 1) -> None:
        for _ in range(count):
            self.registry.increment_active(workload)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.close()


MakeReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def replica(redis_server: RedisServer) -> AsyncIterator[MakeReplica]:
    made: list[Replica] = []

    async def make(**options: object) -> Replica:
        replica = Replica(redis_server.url, **options)  # type: ignore[arg-type]
        made.append(replica)
        return replica

    yield make
    for r in made:
        await r.fleet.stop()


async def test_each_replica_sees_the_fleets_counts(replica: MakeReplica) -> None:
    a, b = await replica(), await replica()
    a.new("team", 3)
    b.new("team", 2)
    b.registry.record_dispatch("team", 0.5)
    assert a.registry.get_metrics("team").total_requests == 3  # type: ignore[union-attr]
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert await a.fleet.sync()
    seen_by_a = a.registry.get_metrics("team")
    assert seen_by_a is not None
    assert (seen_by_a.total_requests, seen_by_a.active_requests) == (5, 5)
    assert (seen_by_a.dispatched_count, seen_by_a.average_wait_time) == (1, 0.5)
    assert seen_by_a.request_rate == pytest.approx(5.0, rel=0.01)  # 5 in the first second
    b.registry.decrement_active("team")
    a.new("team")  # a's own events show at once, before any sync
    assert await b.fleet.sync()
    assert await a.fleet.sync()
    now = a.registry.get_metrics("team")
    assert now is not None
    assert (now.total_requests, now.active_requests) == (6, 5)
    assert [m.workload_id for m in b.registry.list_metrics()] == ["team"]


async def test_syncs_in_doubt_are_counted_exactly_once(replica: MakeReplica) -> None:
    a, b = await replica(), await replica()
    run_script = a.fleet._script

    async def reply_lost(**kwargs: object) -> object:
        await run_script(**kwargs)  # type: ignore[arg-type]
        raise RedisTimeoutError("Timeout reading from socket")

    async def never_ran(**kwargs: object) -> object:
        raise RedisTimeoutError("Timeout writing to socket")

    a.new("team", 4)
    a.fleet._script = reply_lost  # type: ignore[assignment]
    assert await a.fleet.sync() is False  # applied, but a cannot know
    a.new("team", 2)
    a.fleet._script = never_ran  # type: ignore[assignment]
    assert await a.fleet.sync() is False  # not applied, and a cannot know either
    assert await a.fleet.sync() is False
    assert a.fleet._in_doubt is not None  # one sync in doubt at most: the others settled
    a.fleet._script = run_script
    a.new("team", 1)
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert b.registry.get_metrics("team").total_requests == 7  # type: ignore[union-attr]


async def test_capacity_is_shared_fairly_and_never_oversold(replica: MakeReplica) -> None:
    a, b = await replica(capacity=4), await replica(capacity=4)
    assert a.capacity is not None
    assert b.capacity is not None
    a.demand = b.demand = (0, 10)
    for _ in range(3):
        await a.fleet.sync()
        await b.fleet.sync()
        assert a.capacity.limit + b.capacity.limit <= 4
    assert (a.capacity.limit, b.capacity.limit) == (2, 2)
    a.demand = (1, 0)  # a needs one; b may have the rest once a no longer uses 2
    for _ in range(2):
        await a.fleet.sync()
        await b.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (1, 3)
    a.demand = (0, 0)  # idle: spare slots are spread as headroom
    b.demand = (0, 0)
    for _ in range(3):
        await a.fleet.sync()
        await b.fleet.sync()
        assert a.capacity.limit + b.capacity.limit <= 4
    assert (a.capacity.limit, b.capacity.limit) == (2, 2)


async def test_a_silent_replicas_slots_come_back_after_its_lease(replica: MakeReplica) -> None:
    a, b = await replica(capacity=4, lease=0.5), await replica(capacity=4, lease=0.5)
    assert a.capacity is not None
    assert b.capacity is not None
    a.demand = b.demand = (2, 10)
    for _ in range(3):
        await a.fleet.sync()
        await b.fleet.sync()
    assert b.capacity.limit == 2
    await asyncio.sleep(0.6)  # a goes silent, as if killed
    await b.fleet.sync()
    assert b.capacity.limit == 4
    assert b.fleet.status().replicas == 1


async def test_redis_down_the_replica_serves_locally_and_reconciles(
    replica: MakeReplica, redis_server: RedisServer
) -> None:
    a, b = await replica(capacity=4, lease=0.5), await replica()
    assert a.capacity is not None
    a.demand = (1, 0)
    a.new("team", 2)
    assert await a.fleet.sync()
    await redis_server.stop()
    a.new("team", 3)
    assert await a.fleet.sync() is False
    assert a.fleet.status().connected is False
    assert a.capacity.limit == 4  # slots still leased: Redis counts them as a's
    await asyncio.sleep(0.6)
    assert a.registry.get_metrics("team").total_requests == 5  # type: ignore[union-attr]
    assert a.capacity.status().fallback is True
    assert a.capacity.limit == 4  # C / the one replica it knew of
    await redis_server.start()
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    team = b.registry.get_metrics("team")
    assert team is not None
    assert (team.total_requests, team.active_requests) == (5, 5)
    assert a.fleet.status().connected is True


def test_registry_settings() -> None:
    with pytest.raises(ValidationError, match="expected memory, redis://"):
        Settings(registry="localhost:6379")
    with pytest.raises(ValidationError, match="at least 3 x --registry-sync-interval"):
        Settings(registry="redis://r:6379/0", registry_lease=0.2)
    settings = Settings(registry="redis://user:secret@r:6379/0")
    assert public_view(settings)["registry"] == "redis://***@r:6379/0"


async def test_the_service_reports_its_fleet(
    start_service: StartService, redis_server: RedisServer
) -> None:
    service = await start_service(registry=redis_server.url, max_concurrency=6)
    samples = await scrape(service)
    assert samples["extproc_fleet_connected", ()] == 1
    assert samples["extproc_fleet_replicas", ()] == 1
    assert samples["extproc_fleet_sync_errors_total", ()] == 0
    assert samples["extproc_max_concurrency", ()] == 6  # alone: the whole fleet's limit
    assert service.flow.capacity.status().mode == "fleet"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/v1/fleet") as reply,
    ):
        fleet = await reply.json()
    assert (fleet["connected"], fleet["replicas"], fleet["errors"]) == (True, 1, 0)
    frame = await top_frame(service.grpc_port)
    assert "capacity fleet   limit 6" in frame
    assert "fleet 1 replicas   synced" in frame
    assert fleet["replica"] in frame


async def test_a_lone_replica_has_no_fleet(start_service: StartService) -> None:
    service = await start_service()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/v1/fleet") as reply,
    ):
        assert reply.status == 404
        assert "not shared" in (await reply.json())["detail"]


async def test_the_service_starts_and_serves_without_redis(start_service: StartService) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    service = await start_service(registry=nobody, max_concurrency=2, registry_lease=0.5)
    assert service.ready
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        _, answer = await exchange(channel, workload_headers("team"))
    assert answer.WhichOneof("response") == "request_headers"  # dispatched, not failed
    status = service.fleet.status() if service.fleet else None
    assert status is not None
    assert status.connected is False
    assert status.errors >= 1
    assert service.registry.get_metrics("team").total_requests == 1  # type: ignore[union-attr]


def test_a_failed_syncs_deltas_keep_their_order_before_newer_ones() -> None:
    clock = SystemClock()
    registry = SharedWorkloadRegistry(InMemoryWorkloadRegistry(clock), clock, stale_after=1)
    registry.increment_active("team")
    registry.record_dispatch("team", 1.0)
    taken = registry.take_pending()
    registry.increment_active("team")
    registry.record_dispatch("team", 2.0)
    registry.restore_pending(taken)
    pending = registry.take_pending()["team"]
    assert (pending.new, pending.dispatched, pending.waits) == (2, 2, [1.0, 2.0])


async def test_any_valid_workload_id_survives_the_trip_through_redis(replica: MakeReplica) -> None:
    a, b = await replica(), await replica()
    ids = ["team-😀", 'q"uo\\te', "ключ", "a:b{c}*", "x" * 128]
    for workload in ids:
        a.new(workload, 2)
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert {m.workload_id: m.total_requests for m in b.registry.list_metrics()} == dict.fromkeys(
        ids, 2
    )


async def grants(redis_server: RedisServer) -> dict[str, int]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        recorded = await client.hgetall("test:grant")  # type: ignore[misc]
    finally:
        await client.aclose()
    return {k.decode(): int(v) for k, v in recorded.items()}


async def test_a_backlogged_replica_drains_down_to_its_share(
    replica: MakeReplica, redis_server: RedisServer
) -> None:
    """#16.1: the in-flight figure is a reservation, not a dispatch limit."""
    a = await replica(capacity=10)
    assert a.capacity is not None
    a.demand = (10, 20)  # alone and backlogged: every slot, each refilled at once
    await a.fleet.sync()
    assert a.capacity.limit == 10
    b = await replica(capacity=10)
    assert b.capacity is not None
    b.demand = (0, 20)
    await b.fleet.sync()
    assert b.capacity.limit == 0  # a's 10 in flight are still a's
    await a.fleet.sync()
    assert a.capacity.limit == 5  # a dispatches no more until it is down to its share
    a.demand = (5, 20)  # completions drained a to its share
    await a.fleet.sync()
    await b.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (5, 5)
    assert sum((await grants(redis_server)).values()) <= 10


async def test_the_local_lease_ends_before_redis_forgets_the_slots(replica: MakeReplica) -> None:
    """#16.3: the lease runs from the send (less a margin), not from the reply."""
    a = await replica(capacity=4, lease=1.0)
    assert a.capacity is not None
    run_script = a.fleet._script

    async def slow(**kwargs: object) -> object:
        await asyncio.sleep(0.3)
        return await run_script(**kwargs)  # type: ignore[arg-type]

    a.fleet._script = slow  # type: ignore[assignment]
    sent = time.monotonic()
    assert await a.fleet.sync()
    assert a.capacity.leased
    await asyncio.sleep(max(0.0, sent + 0.95 - time.monotonic()))
    assert not a.capacity.leased  # Redis keeps the slots until >= sent + 1.0


def test_before_the_first_sync_a_replica_assumes_the_expected_fleet() -> None:
    """#16.3: a replica that starts while Redis is down must not assume it is alone."""
    settings = Settings(registry="redis://r:6379/0", max_concurrency=10, registry_replicas_hint=4)
    capacity = make_capacity(settings, SystemClock())
    assert isinstance(capacity, LeasedCapacity)
    assert capacity.limit == 3
    with pytest.raises(ValidationError, match="registry_replicas_hint"):
        Settings(registry_replicas_hint=0)


async def test_a_batch_in_flight_on_a_dead_connection_is_never_applied_twice(
    replica: MakeReplica,
) -> None:
    """#16.4: an old sync landing after the replica re-read its sequence is refused."""
    a, b = await replica(), await replica()
    run_script = a.fleet._script
    in_flight: list[dict[str, object]] = []

    async def lost_in_the_network(**kwargs: object) -> object:
        in_flight.append(kwargs)  # sent, not yet arrived
        raise RedisTimeoutError("Timeout reading from socket")

    async def first_lands_late_then_runs(**kwargs: object) -> object:
        reply = await run_script(**kwargs)  # type: ignore[arg-type]
        await run_script(**in_flight[0])  # type: ignore[arg-type]
        return reply

    async def first_lands_before(**kwargs: object) -> object:
        await run_script(**in_flight[0])  # type: ignore[arg-type]
        return await run_script(**kwargs)  # type: ignore[arg-type]

    for lands in (first_lands_late_then_runs, first_lands_before):
        in_flight.clear()
        a.new("team", 4)
        a.fleet._script = lost_in_the_network  # type: ignore[assignment]
        assert await a.fleet.sync() is False
        a.new("team", 2)
        assert await a.fleet.sync() is False  # two batches in doubt
        a.new("team", 1)
        a.fleet._script = lands  # type: ignore[assignment]
        assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert b.registry.get_metrics("team").total_requests == 14  # type: ignore[union-attr]


async def test_a_sync_returns_only_what_changed(replica: MakeReplica) -> None:
    """#16.5: the reply grows with the changes since this replica's last sync."""
    a, b = await replica(), await replica()
    for n in range(60):
        a.new(f"w{n}")
    assert await a.fleet.sync()
    assert await b.fleet.sync()  # b's first sync: everything
    assert len(b.registry.list_metrics()) == 60
    run_script = b.fleet._script
    replies: list[list[object]] = []

    async def recorded(**kwargs: object) -> object:
        reply = await run_script(**kwargs)  # type: ignore[arg-type]
        replies.append(reply)
        return reply

    b.fleet._script = recorded  # type: ignore[assignment]
    a.new("w7", 2)
    a.registry.decrement_active("w8")
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert len(replies[-1]) < 60  # two workloads changed, not sixty
    seen = {m.workload_id: m for m in b.registry.list_metrics()}
    assert (seen["w7"].total_requests, seen["w7"].active_requests) == (3, 3)
    assert (seen["w8"].total_requests, seen["w8"].active_requests) == (1, 0)
    assert (seen["w9"].total_requests, seen["w9"].active_requests) == (1, 1)
    assert seen["w9"].request_rate == pytest.approx(1.0, rel=0.2)  # still computed, not resent


async def test_forgotten_workloads_leave_every_replicas_view(replica: MakeReplica) -> None:
    a, b = await replica(idle_ttl=0.3), await replica(idle_ttl=0.3)
    a.new("gone")
    a.new("stays")
    a.registry.decrement_active("gone")
    assert await a.fleet.sync()
    assert await b.fleet.sync()
    assert {m.workload_id for m in b.registry.list_metrics()} == {"gone", "stays"}
    await asyncio.sleep(0.4)
    assert await a.fleet.sync()  # "stays" is still active on a: kept
    assert await b.fleet.sync()
    assert {m.workload_id for m in b.registry.list_metrics()} == {"stays"}


def test_deltas_kept_through_an_outage_are_bounded() -> None:
    """#16.5: workloads seen during an outage past the registry's size fold into overflow."""
    clock = VirtualClock()
    local = InMemoryWorkloadRegistry(clock, max_workloads=3, idle_ttl=1.0)
    registry = SharedWorkloadRegistry(local, clock, stale_after=5.0)
    for n in range(10):  # each seen, completed, forgotten locally: Redis is down
        registry.increment_active(f"w{n}")
        registry.decrement_active(f"w{n}")
        clock.advance(2.0)
        registry.sweep()
    pending = registry.take_pending()
    assert len(pending) <= 4
    assert sum(p.new for p in pending.values()) == 10  # none lost
    assert pending[OVERFLOW_WORKLOAD].new >= 6


def test_a_lease_running_out_wakes_the_queue() -> None:
    """#16.2: granted 0 with requests queued; the lease ends and the fallback has room."""
    clock = VirtualClock()
    capacity = LeasedCapacity(4, clock, lease=5.0)
    flow = FlowController(FcfsPolicy(), clock, capacity=capacity, max_queue=10)
    capacity.grant(0, replicas=2, sent_at=clock.now())
    tickets = [flow.enqueue(FlowRequest("a", 3)) for _ in range(3)]
    assert flow.queued == 3
    clock.advance(5.1)  # no sync since: ceil(4 / 2) slots, and nobody completes
    assert [t.outcome for t in tickets] == [Outcome.DISPATCHED, Outcome.DISPATCHED, None]


async def flush(redis_server: RedisServer) -> None:
    """Redis loses its data: a restart without persistence, a failover to an empty one."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def test_after_redis_loses_its_data_the_fleet_is_not_oversold(
    replica: MakeReplica, redis_server: RedisServer
) -> None:
    """Review of #16: the first replica back must not find itself alone while the
    others' leases (and their requests in flight) still hold."""
    a, b = await replica(capacity=8), await replica(capacity=8)
    assert a.capacity is not None
    assert b.capacity is not None
    for _ in range(3):
        a.demand, b.demand = (a.capacity.limit, 20), (b.capacity.limit, 20)
        await a.fleet.sync()
        await b.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (4, 4)
    await flush(redis_server)
    a.demand = (4, 20)
    await a.fleet.sync()
    assert a.capacity.leased
    assert b.capacity.leased
    assert a.capacity.limit + b.capacity.limit <= 8
    await b.fleet.sync()
    await a.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (4, 4)
    assert sum((await grants(redis_server)).values()) <= 8


async def test_after_redis_loses_its_data_each_replica_reloads_its_view(
    replica: MakeReplica, redis_server: RedisServer
) -> None:
    """Review of #16: a replica's last-seen version above Redis's new one would
    otherwise miss every change made since, for good."""
    a, b = await replica(), await replica()
    b.new("gone", 3)
    for _ in range(10):
        await b.fleet.sync()
        await a.fleet.sync()
    assert a.registry.get_metrics("gone").active_requests == 3  # type: ignore[union-attr]
    await flush(redis_server)
    for _ in range(3):
        b.registry.decrement_active("gone")
    b.new("after")
    for _ in range(3):
        await b.fleet.sync()
    await a.fleet.sync()
    assert a.registry.get_metrics("gone") is None
    assert a.registry.get_metrics("after").active_requests == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("ran", [False, True], ids=["not-run", "ran"])
async def test_a_sync_cancelled_by_stop_counts_once(
    redis_server: RedisServer, replica: MakeReplica, ran: bool
) -> None:
    """Review of #16: stop() cancels the loop while it awaits the script; the batch
    it took must be neither lost nor sent twice."""
    a, b = Replica(redis_server.url), await replica()
    await a.fleet.start()
    run_script = a.fleet._script
    waiting = asyncio.Event()

    async def hangs(**kwargs: object) -> object:
        if ran:
            await run_script(**kwargs)  # type: ignore[arg-type]
        waiting.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    a.fleet._script = hangs  # type: ignore[assignment]
    a.new("team", 5)
    await asyncio.wait_for(waiting.wait(), 10)
    a.fleet._script = run_script
    await a.fleet.stop()
    assert await b.fleet.sync()
    assert b.registry.get_metrics("team").total_requests == 5  # type: ignore[union-attr]


async def test_a_late_copy_of_the_last_sync_cannot_bring_a_departed_replica_back(
    redis_server: RedisServer,
) -> None:
    """Review of #16: stop()'s last sync lost its reply, the replica left; the call
    landing afterwards must be refused, not re-admit the replica for a lease."""
    a = Replica(redis_server.url, capacity=4)
    await a.fleet.start()
    run_script = a.fleet._script
    on_the_way: list[dict[str, object]] = []

    async def lost_in_the_network(**kwargs: object) -> object:
        on_the_way.append(kwargs)
        raise RedisTimeoutError("Timeout reading from socket")

    a.fleet._script = lost_in_the_network  # type: ignore[assignment]
    a.new("team", 2)
    await a.fleet.stop()
    assert on_the_way
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        late = client.register_script(run_script.script)
        reply = await late(**on_the_way[-1])  # type: ignore[arg-type]
        assert int(reply[0]) < 0
        assert await client.zscore("test:replicas", a.fleet.replica) is None
        assert await client.hget("test:held", a.fleet.replica) is None  # type: ignore[misc]
        clean = Replica(redis_server.url, capacity=4)
        await clean.fleet.start()
        await clean.fleet.stop()  # no reply ever lost: nothing of it is kept
        for kept in ("test:seq", "test:fence"):
            assert await client.hget(kept, clean.fleet.replica) is None  # type: ignore[misc]
    finally:
        await client.aclose()
