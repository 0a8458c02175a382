"""Replicas syncing through a proxy that drops, delays, duplicates and cuts Redis's
replies (tests/support/redis_proxy.py), against a real redis-server; invariants
checked after every sync:
- the grants recorded in Redis never sum past C, and while every replica's
  lease holds, neither do the requests in flight;
- a newcomer reaches its fair share within two leases while the other replica
  stays backlogged;
- after lost, duplicated and delayed replies, every workload's fleet-wide
  totals equal the requests sent;
- a replica cut off for longer than a lease comes back without overselling.
Each replica is a real registry, flow controller and fleet sync in this
process; requests are served by timers. Seeded faults, bounded steps.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from extproc.clock import SystemClock
from extproc.fleet.registry import SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.registry.memory import InMemoryWorkloadRegistry
from tests.support.redis_proxy import Faults, FaultyProxy
from tests.support.redis_server import RedisServer

C = 8
LEASE = 1.5
INTERVAL = 0.1
SERVICE = 0.15
PREFIX = "faults"


class SimReplica:
    """One replica: requests tracked, queued, dispatched under the leased gate,
    served for SERVICE seconds by a timer, completed."""

    def __init__(self, name: str, url: str) -> None:
        clock = SystemClock()
        self.name = name
        self.registry = SharedWorkloadRegistry(
            InMemoryWorkloadRegistry(clock), clock, stale_after=LEASE
        )
        self.capacity = LeasedCapacity(C, clock, LEASE, margin=INTERVAL, replicas=2)
        self.flow = FlowController(
            FcfsPolicy(), clock, capacity=self.capacity, queue_timeout=None,
            on_decided=self._decided,
        )  # fmt: skip
        options = FleetOptions(url=url, interval=INTERVAL, lease=LEASE, prefix=PREFIX)
        self.fleet = FleetSync(
            self.registry, options, lambda: (self.flow.in_flight, self.flow.queued), self.capacity
        )
        self.sent: Counter[str] = Counter()
        self.fallback_served_until = 0.0
        """When the last request dispatched without a lease (on the fallback) ends."""

    def submit(self, workload: str) -> None:
        self.registry.increment_active(workload)
        self.sent[workload] += 1
        self.flow.enqueue(FlowRequest(workload, 3))

    def keep_backlogged(self, depth: int = 2 * C) -> None:
        n = 0
        while self.flow.queued < depth:
            self.submit(f"{self.name}-w{n % 3}")
            n += 1

    def _decided(self, ticket: Ticket) -> None:
        assert ticket.outcome is Outcome.DISPATCHED
        workload = ticket.request.workload_id
        self.registry.record_dispatch(workload, ticket.wait_time)
        if not self.capacity.leased:
            self.fallback_served_until = time.monotonic() + SERVICE + 2 * INTERVAL

        def done() -> None:
            ticket.close()
            self.registry.decrement_active(workload)

        asyncio.get_running_loop().call_later(SERVICE, done)


class Fleet:
    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.direct = aioredis.Redis.from_url(redis.url)
        self.replicas: list[SimReplica] = []
        self.proxies: list[FaultyProxy] = []

    async def add(self, name: str, faults: Faults) -> tuple[SimReplica, FaultyProxy]:
        proxy = FaultyProxy(self.redis.port, faults)
        await proxy.start()
        replica = SimReplica(name, proxy.url)
        self.proxies.append(proxy)
        self.replicas.append(replica)
        return replica, proxy

    async def grants(self) -> int:
        grants = await self.direct.hgetall(f"{PREFIX}:grant")  # type: ignore[misc]
        return sum(int(v) for v in grants.values())

    async def step(self) -> None:
        """Each replica syncs once (through its proxy); then the invariants. Requests
        dispatched on a fallback limit (no lease: before a first sync, or cut off past
        the lease) may exceed C -- availability over strictness -- but only until
        they end: from then on, while every lease holds, never more than C."""
        for replica in self.replicas:
            await replica.fleet.sync()
            assert await self.grants() <= C
            now = time.monotonic()
            if all(r.capacity.leased and now > r.fallback_served_until for r in self.replicas):
                assert sum(r.flow.in_flight for r in self.replicas) <= C

    async def settle_counts(self) -> None:
        """Faults off, arrivals stopped: drain, then sync until every replica's
        last deltas are in."""
        for proxy in self.proxies:
            proxy.faults.rate = 0.0
            proxy.partition(False)
        deadline = time.monotonic() + 30
        while any(r.flow.in_flight or r.flow.queued for r in self.replicas):
            assert time.monotonic() < deadline, "the replicas did not drain"
            await self.step()
            await asyncio.sleep(INTERVAL)
        for replica in self.replicas:
            for _ in range(5):
                if await replica.fleet.sync():
                    break
            assert replica.fleet.status().connected

    async def fleet_totals(self) -> dict[str, tuple[int, int]]:
        totals = {}
        for replica in self.replicas:
            for workload in replica.sent:
                total, dispatched = await self.direct.hmget(  # type: ignore[misc]
                    f"{PREFIX}:w:{workload}", "total", "dispatched"
                )
                totals[workload] = (int(total), int(dispatched))
        return totals

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.fleet.stop()
        for proxy in self.proxies:
            await proxy.close()
        await self.direct.aclose()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    redis = RedisServer()
    await redis.start()
    made = Fleet(redis)
    yield made
    await made.close()
    await redis.close()


def sent(fleet: Fleet) -> dict[str, tuple[int, int]]:
    return {w: (n, n) for r in fleet.replicas for w, n in r.sent.items()}


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_newcomer_gets_its_share_and_every_request_counts_once(
    fleet: Fleet, seed: int
) -> None:
    a, proxy_a = await fleet.add("a", Faults(rate=0.25, seed=seed))
    a.keep_backlogged()
    for _ in range(10):  # a alone, backlogged: every slot
        await fleet.step()
        a.keep_backlogged()
        await asyncio.sleep(INTERVAL)
    b, proxy_b = await fleet.add("b", Faults(rate=0.25, seed=seed + 100))
    joined = time.monotonic()
    await b.fleet.sync()  # as the service does before serving (a fault may fail it)
    reached: float | None = None
    while time.monotonic() < joined + 3 * LEASE:
        a.keep_backlogged()
        b.keep_backlogged()
        await fleet.step()
        if reached is None and b.capacity.limit >= C // 2:
            reached = time.monotonic()
        await asyncio.sleep(INTERVAL)
    assert reached is not None, "the newcomer never got its share"
    assert reached - joined <= 2 * LEASE
    assert sum(proxy_a.faults.counts.values()) + sum(proxy_b.faults.counts.values()) >= 5
    await fleet.settle_counts()
    assert await fleet.fleet_totals() == sent(fleet)


async def test_a_replica_cut_off_past_its_lease_comes_back_without_overselling(
    fleet: Fleet,
) -> None:
    a, proxy_a = await fleet.add("a", Faults())
    b, _ = await fleet.add("b", Faults())
    for _ in range(8):
        a.keep_backlogged()
        b.keep_backlogged()
        await fleet.step()
        await asyncio.sleep(INTERVAL)
    proxy_a.partition(True)
    cut = time.monotonic()
    while time.monotonic() < cut + 1.5 * LEASE:
        a.keep_backlogged()
        b.keep_backlogged()
        await fleet.step()  # a's syncs fail; the grants in Redis still hold
        await asyncio.sleep(INTERVAL)
    assert not a.capacity.leased
    assert b.capacity.limit == C  # Redis forgot a: b has every slot
    proxy_a.partition(False)
    back: float | None = None
    for _ in range(40):
        a.keep_backlogged()
        b.keep_backlogged()
        synced = a.fleet.status().connected
        await fleet.step()
        if not synced and a.fleet.status().connected:
            back = time.monotonic()
            assert a.capacity.limit <= C - b.flow.in_flight + 1  # never past what b leaves
        await asyncio.sleep(INTERVAL)
    assert back is not None
    assert a.capacity.limit >= 1  # and a gets slots back
    await fleet.settle_counts()
    assert await fleet.fleet_totals() == sent(fleet)


async def test_calls_landing_late_on_dead_connections_count_once(fleet: Fleet) -> None:
    """Consecutive delayed calls: one lands after the replica gave up on it, fenced
    it and re-sent its deltas -- and before (or after) the re-sent call itself."""
    a, proxy = await fleet.add("a", Faults(rate=0.5, kinds=("delay", "drop"), seed=7))
    for _ in range(30):
        a.keep_backlogged(depth=4)
        await fleet.step()
        await asyncio.sleep(INTERVAL)
    assert proxy.faults.counts.get("delay", 0) >= 5
    await fleet.settle_counts()
    assert await fleet.fleet_totals() == sent(fleet)
