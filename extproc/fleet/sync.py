"""Replicas sharing one Redis: the sync loop, and capacity leased fleet-wide.

Every `interval` (default 100 ms) each replica runs one server-side script
(`fleet.lua`, atomic; one round trip): it hands over its pending deltas and
its map of active requests, renews its lease, asks for capacity slots, and
gets back the fleet's counters for every workload. Policies then read that
snapshot locally (`SharedWorkloadRegistry`), never Redis.

Fleet capacity: with `--max-concurrency C` the script shares C slots among
the live replicas (max-min fair by demand, spare slots spread as headroom)
and a replica dispatches only while it has fewer than its granted slots in
flight. Grants are leases: a replica that stops syncing (killed, cut off) is
forgotten `lease` seconds after its last sync, and its slots go back to the
others. The slots granted never sum past C.

Redis trouble: a failed or slow sync logs once, counts an error and keeps the
deltas for the next one; requests are served on the local view and readiness
does not change. For `lease` seconds the replica keeps using the slots it
held (Redis still counts them as its); after that, C divided by the last
known number of replicas. When Redis answers again the next sync applies
everything missed, and rewrites this replica's active requests, so the
fleet's counts reconcile exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from extproc.addresses import redact_url
from extproc.capacity.static import Gate
from extproc.contracts import CapacityStatus, Clock, FleetStatus
from extproc.fleet.registry import FleetCounts, Pending, SharedWorkloadRegistry

SCRIPT = importlib.resources.files("extproc.fleet").joinpath("fleet.lua").read_text()
Batch = tuple[int, dict[str, Any]]
"""(sequence number, {workload id: [new, dispatched, [queue waits]]})"""


@dataclass(frozen=True, slots=True)
class FleetOptions:
    url: str
    interval: float = 0.1
    lease: float = 5.0
    prefix: str = "extproc"
    rate_window: float = 60.0
    ema_alpha: float = 0.2
    idle_ttl: float = 300.0


class LeasedCapacity(Gate):
    """At most the slots this replica was granted in flight (see module docstring)."""

    name = "fleet"

    def __init__(self, limit: int, clock: Clock, lease: float) -> None:
        super().__init__()
        self.fleet_limit = limit
        self._clock = clock
        self._lease = lease
        self._granted = 0
        self._valid_until = -math.inf
        self._replicas = 1

    def grant(self, slots: int, replicas: int) -> None:
        more = slots > self.limit
        self._granted = slots
        self._replicas = max(replicas, 1)
        self._valid_until = self._clock.now() + self._lease
        if more:
            self._wake()

    @property
    def leased(self) -> bool:
        return self._clock.now() <= self._valid_until

    @property
    def limit(self) -> int:
        if self.leased:
            return self._granted
        return math.ceil(self.fleet_limit / self._replicas)

    def has_room(self, in_flight: int) -> bool:
        return in_flight < self.limit

    def status(self) -> CapacityStatus:
        return CapacityStatus(self.name, self.limit, fallback=not self.leased)


class FleetSync:
    def __init__(
        self,
        registry: SharedWorkloadRegistry,
        options: FleetOptions,
        demand: Callable[[], tuple[int, int]],
        capacity: LeasedCapacity | None = None,
    ) -> None:
        """`demand()` gives (in flight, queued) on this replica."""
        self._registry = registry
        self.options = options
        self._demand = demand
        self._capacity = capacity
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._redis = aioredis.Redis.from_url(
            options.url,
            socket_timeout=max(0.5, 5 * options.interval),
            socket_connect_timeout=max(0.5, 5 * options.interval),
        )
        self._script = self._redis.register_script(SCRIPT)
        self._seq = 0
        self._unacked: list[Batch] = []
        """Batches whose sync may or may not have run in Redis: re-sent as they were."""
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._errors = 0
        self._replicas = 1
        self._synced_at: float | None = None
        self._log = structlog.get_logger("extproc.fleet.sync")

    async def start(self) -> None:
        # One sync before serving: the first requests see the fleet and hold real slots.
        await self.sync()
        self._task = asyncio.create_task(self._sync_forever())

    async def stop(self) -> None:
        """Hand over the last deltas and leave the fleet (its slots free at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sync()
        with contextlib.suppress(RedisError, OSError):
            await self._leave()
        await self._redis.aclose()

    def status(self) -> FleetStatus:
        age = None if self._synced_at is None else time.monotonic() - self._synced_at
        return FleetStatus(self.replica, self._connected, self._replicas, self._errors, age)

    async def _sync_forever(self) -> None:
        due = time.monotonic()
        while True:
            due = max(due + self.options.interval, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            try:
                await self.sync()
            except Exception:  # a bug here must not end syncing for good
                self._errors += 1
                self._log.exception("fleet sync crashed")

    async def sync(self) -> bool:
        """One round trip; False (deltas kept for the next one) when Redis failed."""
        pending = self._registry.take_pending()
        self._seq += 1
        batch = _batch(self._seq, pending)
        try:
            if self._unacked:
                await self._settle_unacked()
            reply = await self._script(args=self._arguments([*self._unacked, batch]))
        except (RedisError, OSError) as error:
            if _never_sent(error):
                self._registry.restore_pending(pending)
            else:
                self._unacked.append(batch)
            self._failed(error)
            return False
        self._unacked = []
        granted, replicas, fleet = _parse(reply)
        self._registry.apply_snapshot(fleet)
        self._replicas = replicas
        self._synced_at = time.monotonic()
        if self._capacity is not None:
            self._capacity.grant(granted, replicas)
        if not self._connected:
            self._connected = True
            self._log.info("fleet sync up", redis=redact_url(self.options.url), replicas=replicas)
        return True

    async def _settle_unacked(self) -> None:
        """Ask Redis which in-doubt batches it applied; fold the others into one.

        Each sync is atomic and carries every earlier unacknowledged batch, so
        what Redis applied is exactly the batches numbered up to its record.
        The rest were never applied and can merge safely: the list stays short
        however long Redis stays slow."""
        record = await self._redis.hget(f"{self.options.prefix}:seq", self.replica)  # type: ignore[misc]
        applied = int(record) if record is not None else -1
        rest = [b for b in self._unacked if b[0] > applied]
        self._unacked = [_fold(rest)] if rest else []

    def _arguments(self, batches: list[Batch]) -> list[str | float]:
        o = self.options
        in_flight, queued = self._demand()
        limit = self._capacity.fleet_limit if self._capacity is not None else 0
        return [
            o.prefix, self.replica, int(o.lease * 1000), limit,
            in_flight + queued, in_flight, int(o.rate_window * 1000), o.ema_alpha,
            int(o.idle_ttl * 1000), json.dumps(batches), json.dumps(self._registry.active_counts()),
        ]  # fmt: skip

    def _failed(self, error: Exception) -> None:
        self._errors += 1
        if self._connected or self._errors == 1:
            self._log.warning(
                "fleet sync failed: serving on the local view",
                redis=redact_url(self.options.url),
                error=str(error) or type(error).__name__,
            )
        self._connected = False

    async def _leave(self) -> None:
        p, me = self.options.prefix, self.replica
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{p}:replicas", me)
            pipe.hdel(f"{p}:held", me)
            pipe.hdel(f"{p}:demand", me)
            pipe.hdel(f"{p}:seq", me)
            pipe.delete(f"{p}:active:{me}")
            await pipe.execute()


def _fold(batches: list[Batch]) -> Batch:
    """Batches never applied, as one under the newest number."""
    merged: dict[str, Pending] = {}
    for _, deltas in batches:
        for wid, (new, dispatched, waits) in deltas.items():
            delta = Pending(new, dispatched, list(waits))
            if wid in merged:
                merged[wid].merge(delta)
            else:
                merged[wid] = delta
    return _batch(batches[-1][0], merged)


def _batch(seq: int, pending: dict[str, Pending]) -> Batch:
    return seq, {wid: [p.new, p.dispatched, p.waits] for wid, p in pending.items()}


def _never_sent(error: Exception) -> bool:
    """True when the sync failed before reaching Redis (its deltas can simply merge
    into the next); False when it may have run there (its reply was lost)."""
    return isinstance(error, (ConnectionRefusedError, RedisConnectionError)) and (
        "connecting to" in str(error) or isinstance(error, ConnectionRefusedError)
    )


def _parse(reply: list[object]) -> tuple[int, int, dict[str, FleetCounts]]:
    granted, replicas = int(reply[0]), int(reply[1])  # type: ignore[call-overload]
    fleet: dict[str, FleetCounts] = {}
    rest = reply[2:]
    for i in range(0, len(rest), 6):
        wid, total, dispatched, ema, rate, others = rest[i : i + 6]
        fleet[_text(wid)] = FleetCounts(
            total=int(total),  # type: ignore[call-overload]
            dispatched=int(dispatched),  # type: ignore[call-overload]
            average_wait=float(_text(ema)),
            rate=float(_text(rate)),
            others_active=int(others),  # type: ignore[call-overload]
        )
    return granted, replicas, fleet


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
