"""Replicas sharing one Redis: the sync loop, and capacity leased fleet-wide.

Every `interval` (default 100 ms) each replica runs one server-side script
(`fleet.lua`, atomic; one round trip): it hands over its pending deltas and
its map of active requests, renews its lease, asks for capacity slots, and
gets back the fleet's counters for the workloads that changed since its last
sync (all of them at its first). Policies then read that snapshot locally
(`SharedWorkloadRegistry`), never Redis. A sync's cost follows what changed,
not how many workloads the fleet knows.

Fleet capacity: with `--max-concurrency C` the script shares C slots among
the live replicas (max-min fair by demand, spare slots spread as headroom)
and a replica dispatches only while it has fewer than its granted slots in
flight. Requests it already has in flight beyond its grant, and the limit
it uses until the reply arrives, are a reservation the others respect (no
licence to dispatch more), so a backlogged replica drains down to its share
when another arrives, and a lost reply cannot oversell. Grants are leases:
a replica that stops syncing (killed, cut off) is forgotten `lease` seconds
after its last sync, and its slots go back to the others. The grants
recorded never sum past C, nor, while every replica's lease holds, do the
limits in force, even when Redis loses its data while leases run (restart
without persistence, failover to an empty copy): for one lease after the
script notices, no replica is granted more than the limit it was using, and
each replica reloads its whole view of the fleet. During a partition longer
than a lease the cut-off replica uses its fallback while the others share
all C: availability over strictness.

The lease is timed locally from the moment the sync was *sent*, less a margin
(one interval), so it ends before Redis's, which starts when the script runs.
Before its first good sync a replica assumes `replicas` replicas
(`--registry-replicas-hint`), not that it is alone. Redis's leases run on
Redis's clock: a forward step of it larger than a lease forgets the other
replicas while they still hold slots (not guarded against; NTP slews).

Redis trouble: a failed or slow sync logs once, counts an error and keeps the
deltas for the next one; requests are served on the local view and readiness
does not change. Until its lease ends the replica keeps using the slots it
was granted (Redis still counts them as its); after that, C divided by the
last known number of replicas, and the queue is woken when that is more.
When Redis answers again the next sync applies everything missed, and
rewrites this replica's active requests, so the fleet's counts reconcile
exactly.

Exactly once: each sync is numbered, and the script ignores a call numbered
at or below the last it applied. A sync whose reply was lost may still be
on its way to Redis; before its deltas are sent again, `fence.lua` raises the
replica's fence to its number (so it can no longer be applied if it lands
late) and says whether it was applied; a sync cancelled while it awaits the
script (stop() ending the loop) is in doubt the same way. So at most one
sync is in doubt at a time, and none is ever applied twice. A replica that
ever lost a reply keeps its fence when it leaves, so a late copy cannot bring
it back into the fleet (and its slots into the sharing) after it has gone.
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

import structlog
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from extproc.addresses import redact_url
from extproc.capacity.static import Gate
from extproc.contracts import CapacityStatus, Clock, FleetStatus, TimerHandle
from extproc.fleet.registry import FleetCounts, Pending, SharedWorkloadRegistry
from extproc.registry.rate import WindowCounts
from extproc.tasks import cancel_and_wait

_SCRIPTS = importlib.resources.files("extproc.fleet")
SCRIPT = _SCRIPTS.joinpath("fleet.lua").read_text()
FENCE_SCRIPT = _SCRIPTS.joinpath("fence.lua").read_text()
LEAVE_SCRIPT = _SCRIPTS.joinpath("leave.lua").read_text()
_ENTRY = 9
"""Fields per workload in a sync's reply (see fleet.lua)."""


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

    def __init__(
        self, limit: int, clock: Clock, lease: float, *, margin: float = 0.0, replicas: int = 1
    ) -> None:
        """`replicas`: the fleet's size assumed until the first grant."""
        super().__init__()
        self.fleet_limit = limit
        self.clock = clock
        self._lease = lease - margin
        self._granted = 0
        self._valid_until = -math.inf
        self._replicas = max(replicas, 1)
        self._expiry: TimerHandle | None = None

    def grant(self, slots: int, replicas: int, sent_at: float) -> None:
        """Slots granted by a sync sent at `sent_at` (on `clock`)."""
        before = self.limit
        self._granted = slots
        self._replicas = max(replicas, 1)
        self._valid_until = sent_at + self._lease
        self._watch_expiry()
        if self.limit > before:
            self._wake()

    def _watch_expiry(self) -> None:
        # When the lease runs out the limit becomes the fallback, maybe more than
        # the grant: nothing else would dispatch the queue then.
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        left = self._valid_until - self.clock.now()
        if left > 0:
            self._expiry = self.clock.call_later(left, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.leased:  # fired a hair early
            self._watch_expiry()
        else:
            self._wake()

    @property
    def leased(self) -> bool:
        return self.clock.now() < self._valid_until

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
        self._fence = self._redis.register_script(FENCE_SCRIPT)
        self._leave = self._redis.register_script(LEAVE_SCRIPT)
        self._seq = 0
        self._in_doubt: tuple[int, dict[str, Pending]] | None = None
        """The one sync that may or may not have run in Redis (its reply was lost)."""
        self._ever_in_doubt = False
        """A copy of some sync may still be on its way: leaving keeps the fence."""
        self._since = -1
        """The fleet's version as of this replica's last sync; -1: ask for everything."""
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
        await cancel_and_wait(self._task)
        self._task = None
        await self.sync()
        with contextlib.suppress(RedisError, OSError):
            fence = self._seq if self._ever_in_doubt else 0
            await self._leave(args=[self.options.prefix, self.replica, fence])
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
        try:
            if self._in_doubt is not None:
                await self._settle()
        except (RedisError, OSError) as error:
            self._failed(error)
            return False
        pending = self._registry.take_pending()
        self._seq += 1
        sent_at = self._capacity.clock.now() if self._capacity is not None else 0.0
        try:
            reply = await self._script(args=self._arguments(pending))
        except asyncio.CancelledError:  # stop(): the call may have run, or may yet
            self._doubt(pending)
            raise
        except (RedisError, OSError) as error:
            if _never_sent(error):
                self._registry.restore_pending(pending)
            else:
                self._doubt(pending)
            self._failed(error)
            return False
        if int(reply[0]) < 0:  # refused as late: cannot be, numbers only grow
            self._registry.restore_pending(pending)
            self._failed(RuntimeError(f"sync {self._seq} refused as already applied"))
            return False
        granted, replicas, version, full, server_ms = (int(v) for v in reply[:5])
        changes = _parse(reply[5:], self.options.rate_window)
        self._registry.apply_changes(changes, full=bool(full), server_time=server_ms / 1000)
        self._since = version
        self._replicas = replicas
        self._synced_at = time.monotonic()
        if self._capacity is not None:
            self._capacity.grant(granted, replicas, sent_at)
        if not self._connected:
            self._connected = True
            self._log.info("fleet sync up", redis=redact_url(self.options.url), replicas=replicas)
        return True

    def _doubt(self, pending: dict[str, Pending]) -> None:
        self._in_doubt = (self._seq, pending)
        self._ever_in_doubt = True

    async def _settle(self) -> None:
        """Fence off the sync in doubt and learn whether it ran; if not, its deltas
        go back in front of the pending ones, to be sent under a new number."""
        assert self._in_doubt is not None
        seq, pending = self._in_doubt
        applied = int(await self._fence(args=[self.options.prefix, self.replica, seq]))
        if applied < seq:
            self._registry.restore_pending(pending)
        self._in_doubt = None

    def _arguments(self, pending: dict[str, Pending]) -> list[str | float]:
        o = self.options
        in_flight, queued = self._demand()
        limit = self._capacity.fleet_limit if self._capacity is not None else 0
        deltas = {wid: [p.new, p.dispatched, p.waits] for wid, p in pending.items()}
        return [
            o.prefix, self.replica, int(o.lease * 1000), limit,
            in_flight + queued, in_flight, int(o.rate_window * 1000), o.ema_alpha,
            int(o.idle_ttl * 1000), self._seq, json.dumps(deltas),
            json.dumps(self._registry.active_counts()), self._since,
            self._capacity.limit if self._capacity is not None and self._capacity.leased else 0,
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


def _never_sent(error: Exception) -> bool:
    """True when the sync failed before reaching Redis (its deltas can simply merge
    into the next); False when it may have run there (its reply was lost)."""
    return isinstance(error, (ConnectionRefusedError, RedisConnectionError)) and (
        "connecting to" in str(error) or isinstance(error, ConnectionRefusedError)
    )


def _parse(entries: list[object], window: float) -> dict[str, FleetCounts | None]:
    """The workloads a sync returned; None for those the fleet forgot."""
    changes: dict[str, FleetCounts | None] = {}
    for i in range(0, len(entries), _ENTRY):
        wid, total, dispatched, ema, start, bucket, cur, prev, others = entries[i : i + _ENTRY]
        if int(total) < 0:  # type: ignore[call-overload]
            changes[_text(wid)] = None
            continue
        changes[_text(wid)] = FleetCounts(
            total=int(total),  # type: ignore[call-overload]
            dispatched=int(dispatched),  # type: ignore[call-overload]
            average_wait=float(_text(ema)),
            rate=WindowCounts(
                window,
                int(start) / 1000,  # type: ignore[call-overload]
                int(bucket) / 1000,  # type: ignore[call-overload]
                int(prev),  # type: ignore[call-overload]
                int(cur),  # type: ignore[call-overload]
            ),
            others_active=int(others),  # type: ignore[call-overload]
        )
    return changes


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
