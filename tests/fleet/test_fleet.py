"""Replicas sharing one real Redis: counts, leased capacity, lost replies, outages.

The replicas here are registries and fleet syncs in one process (no gRPC), so
each step is explicit; tests/test_e2e_fleet.py runs real replicas behind Envoy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import grpc
import pytest
from pydantic import ValidationError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.clock import SystemClock
from extproc.config import Settings, public_view
from extproc.fleet.registry import SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity
from extproc.registry.memory import InMemoryWorkloadRegistry
from tests.conftest import StartService
from tests.support.extproc_client import exchange, workload_headers
from tests.support.metrics_page import scrape
from tests.support.redis_server import RedisServer


class Replica:
    def __init__(self, url: str, capacity: int = 0, lease: float = 5.0) -> None:
        clock = SystemClock()
        self.registry = SharedWorkloadRegistry(
            InMemoryWorkloadRegistry(clock), clock, stale_after=lease
        )
        self.capacity = LeasedCapacity(capacity, clock, lease) if capacity else None
        self.demand = (0, 0)
        self.fleet = FleetSync(
            self.registry,
            FleetOptions(url=url, lease=lease, prefix="test"),
            lambda: self.demand,
            self.capacity,
        )

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
    assert len(a.fleet._unacked) == 2  # what Redis applied was dropped, the rest folded
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
    a.demand = (1, 0)  # a needs one; b may have the rest
    await a.fleet.sync()
    await b.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (1, 3)
    a.demand = (0, 0)  # idle: spare slots are spread as headroom
    b.demand = (0, 0)
    await a.fleet.sync()
    await b.fleet.sync()
    await a.fleet.sync()
    assert (a.capacity.limit, b.capacity.limit) == (2, 2)


async def test_a_silent_replicas_slots_come_back_after_its_lease(replica: MakeReplica) -> None:
    a, b = await replica(capacity=4, lease=0.5), await replica(capacity=4, lease=0.5)
    assert a.capacity is not None
    assert b.capacity is not None
    a.demand = b.demand = (2, 10)
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
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "top", "--once",
        "--address", f"127.0.0.1:{service.grpc_port}",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    frame = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
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
