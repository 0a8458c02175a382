"""End to end, two replicas sharing one real Redis behind one real Envoy (both in the
ext_proc cluster): fleet-wide counts and capacity, a replica killed, Redis stopped."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backend import Backend
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import eventually_async
from tests.support.process import ServeProcess, free_port
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

LIMIT = 4
LEASE = 2.0
WORKLOADS = ("alpha", "beta", "gamma")


@dataclass
class Fleet:
    redis: RedisServer
    backend: Backend
    replicas: list[ServeProcess]
    envoy: Envoy
    http: aiohttp.ClientSession

    async def flood(self, clients: int, seconds: float, work: float = 0.1) -> Counter[str]:
        """Requests back to back for `seconds`; (workload, status) -> count."""
        sent: Counter[str] = Counter()
        deadline = time.monotonic() + seconds
        url = f"http://127.0.0.1:{self.envoy.port}/work?seconds={work}"

        async def client(index: int) -> None:
            workload = WORKLOADS[index % len(WORKLOADS)]
            headers = {"x-workload-context": json.dumps({"workload_id": workload})}
            while time.monotonic() < deadline:
                async with self.http.get(url, headers=headers) as reply:
                    await reply.read()
                    sent[f"{workload} {reply.status}"] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        return sent

    async def capacity(self, replica: ServeProcess) -> dict[str, Any]:
        async with self.http.get(f"http://{replica.admin}/v1/capacity") as reply:
            return await reply.json()  # type: ignore[no-any-return]

    async def dispatched(self, replica: ServeProcess) -> float:
        """Requests this replica itself dispatched (its own counter, not the fleet's)."""
        async with self.http.get(f"http://{replica.admin}/metrics") as reply:
            text = await reply.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                named = sample.name == "extproc_requests_total"
                if named and sample.labels["outcome"] == "dispatched":
                    return sample.value
        return 0.0

    async def totals(self, replica: ServeProcess) -> dict[str, int]:
        return {w["workload_id"]: w["total_requests"] for w in await replica.workloads()}


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    redis, backend = RedisServer(), Backend()
    await redis.start()
    await backend.start()
    ports = [free_port(), free_port()]
    flags = ["--registry", redis.url, "--registry-sync-interval", "0.05"]
    flags += ["--registry-lease", str(LEASE), "--max-concurrency", str(LIMIT), "--policy", "fcfs"]
    # Teardown stops each replica: keep its drain well inside ServeProcess.terminate's wait.
    flags += ["--drain-timeout", "1", "--shutdown-grace", "2"]
    replicas = [ServeProcess("--listen", f"127.0.0.1:{port}", *flags) for port in ports]
    for replica in replicas:
        await replica.start()
    envoy = Envoy(bundled_config(ports[0], backend.port, *ports[1:]))
    await envoy.start()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield Fleet(redis, backend, replicas, envoy, http)
    await http.close()
    await envoy.stop()
    for replica in replicas:
        if replica.running:
            await replica.terminate()
    await backend.stop()
    await redis.close()


def by_workload(sent: Counter[str], status: int = 200) -> dict[str, int]:
    return {w: sent[f"{w} {status}"] for w in WORKLOADS}


async def test_counts_and_capacity_are_fleet_wide(fleet: Fleet) -> None:
    sent = await fleet.flood(clients=24, seconds=6.0)
    assert sum(sent.values()) == sum(by_workload(sent).values())  # every request 200
    # Never more in flight than the one fleet-wide limit, and the limit was used.
    assert fleet.backend.peak == LIMIT
    # A replica counts a request when its stream ends, a moment after the client
    # has the response: wait for the last ones.
    await eventually_async(lambda: _served_sum_is(fleet, sum(sent.values())))
    served = [await fleet.dispatched(replica) for replica in fleet.replicas]
    assert min(served) > 0.25 * sum(served)  # Envoy spread the requests over both
    for replica in fleet.replicas:  # and both know every request
        await eventually_async(lambda r=replica: _totals_are(fleet, r, by_workload(sent)))  # type: ignore[misc]
    await eventually_async(lambda: _all_idle(fleet.replicas[0]))


async def _all_idle(replica: ServeProcess) -> bool:
    return {w["active_requests"] for w in await replica.workloads()} == {0}


async def _served_sum_is(fleet: Fleet, expected: int) -> bool:
    return sum([await fleet.dispatched(replica) for replica in fleet.replicas]) == expected


async def _totals_are(fleet: Fleet, replica: ServeProcess, expected: dict[str, int]) -> bool:
    return await fleet.totals(replica) == expected


async def test_a_killed_replicas_slots_return_within_the_lease(fleet: Fleet) -> None:
    survivor, victim = fleet.replicas
    flood = asyncio.create_task(fleet.flood(clients=16, seconds=4.0 + LEASE))
    await asyncio.sleep(1.5)
    assert (await fleet.capacity(survivor))["limit"] < LIMIT  # sharing with the victim
    await victim.kill()
    # The survivor holds every slot within the lease (plus a second of slack).
    await eventually_async(lambda: _limit_is(fleet, survivor, LIMIT), within=LEASE + 1.0)
    fleet.backend.peak = 0
    sent = await flood
    assert fleet.backend.peak == LIMIT  # the survivor uses the whole fleet's capacity
    # Lost: only what the victim held when it died (at most one per client); Envoy's
    # outlier detection ejects it at once rather than at the next health check.
    failed = sum(sent.values()) - sum(by_workload(sent).values())
    assert 0 < failed <= 16
    assert set(by_workload(sent, 500)) == set(WORKLOADS)


async def _limit_is(fleet: Fleet, replica: ServeProcess, limit: int) -> bool:
    return (await fleet.capacity(replica))["limit"] == limit


async def test_redis_stopped_mid_load_fails_no_request_and_counts_reconcile(
    fleet: Fleet,
) -> None:
    flood = asyncio.create_task(fleet.flood(clients=12, seconds=7.0))
    await asyncio.sleep(1.5)
    await fleet.redis.stop()
    await asyncio.sleep(2.5)
    await fleet.redis.start()
    sent = await flood
    assert sum(sent.values()) == sum(by_workload(sent).values())  # every request 200
    for replica in fleet.replicas:
        await eventually_async(lambda r=replica: _totals_are(fleet, r, by_workload(sent)))  # type: ignore[misc]
