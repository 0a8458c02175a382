"""The shared Workload Registry: one view of every workload across processor replicas.

Each replica keeps its own requests in an `InMemoryWorkloadRegistry` (exact,
immediate, and what the replica falls back on) and, beside it, two things the
fleet sync (`fleet.FleetSync`) moves to and from Redis every sync interval:
- pending deltas: the new requests, dispatches and queue waits recorded here
  since the last sync, taken by the sync and put back if Redis fails, so no
  count is lost to an outage;
- the fleet snapshot: every workload's fleet-wide counters as of the last
  sync that changed them, with the active requests of the *other* replicas.
  A sync brings only the workloads that changed (`apply_changes`); the
  request rate is kept as the fleet's window counters and computed at read
  time on Redis's clock, so it decays for an idle workload without a resend.

Pending deltas are bounded through an outage: past `max_workloads` distinct
workloads (a long outage while the local registry forgets idle ones), new
ones are counted under the `overflow` workload, so no request goes uncounted
and memory stays bounded.

Reads combine them without a round trip: fleet totals plus this replica's
pending deltas, the other replicas' active requests plus this replica's own
(exact), the fleet's average wait and request rate. So a replica sees its own
events at once and the fleet's within one sync interval. When no sync has
succeeded for `stale_after` seconds, reads fall back to this replica's own
view until Redis answers again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from extproc.contracts import Clock, WorkloadMetrics
from extproc.registry.memory import OVERFLOW_WORKLOAD, InMemoryWorkloadRegistry
from extproc.registry.rate import WindowCounts

MAX_WAITS_PER_SYNC = 32
"""Queue waits carried per workload per sync; the fleet's average is an EMA, so
the latest few matter and the rest would change it by little."""


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """One workload's fleet-wide counters, as the last sync returned them."""

    total: int
    dispatched: int
    average_wait: float
    rate: WindowCounts
    """On Redis's clock."""
    others_active: int
    """Active requests on the other replicas."""


@dataclass(slots=True)
class Pending:
    new: int = 0
    dispatched: int = 0
    waits: list[float] = field(default_factory=list)

    def merge(self, newer: Pending) -> None:
        self.new += newer.new
        self.dispatched += newer.dispatched
        self.waits = (self.waits + newer.waits)[-MAX_WAITS_PER_SYNC:]


class SharedWorkloadRegistry:
    def __init__(self, local: InMemoryWorkloadRegistry, clock: Clock, stale_after: float) -> None:
        self.local = local
        self._clock = clock
        self._stale_after = stale_after
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._fleet: dict[str, FleetCounts] = {}
        self._synced_at: float | None = None
        self._server_offset = 0.0
        """Redis's clock minus ours, as of the last sync."""

    @property
    def max_workloads(self) -> int:
        return self.local.max_workloads

    # -- the tracking points: exact locally, queued as deltas for the fleet

    def increment_active(self, workload_id: str) -> None:
        self.local.increment_active(workload_id)
        with self._lock:
            self._pending_for(workload_id).new += 1

    def decrement_active(self, workload_id: str) -> None:
        # The fleet learns this from the replica's map of active requests.
        self.local.decrement_active(workload_id)

    def record_dispatch(self, workload_id: str, wait_time: float) -> None:
        self.local.record_dispatch(workload_id, wait_time)
        with self._lock:
            pending = self._pending_for(workload_id)
            pending.dispatched += 1
            if len(pending.waits) >= MAX_WAITS_PER_SYNC:
                del pending.waits[0]
            pending.waits.append(wait_time)

    def _pending_for(self, workload_id: str) -> Pending:
        pending = self._pending.get(workload_id)
        if pending is None:
            if len(self._pending) >= self.local.max_workloads:
                workload_id = OVERFLOW_WORKLOAD
                pending = self._pending.get(workload_id)
            if pending is None:
                pending = self._pending[workload_id] = Pending()
        return pending

    # -- what the fleet sync moves

    def take_pending(self) -> dict[str, Pending]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def restore_pending(self, pending: dict[str, Pending]) -> None:
        """A sync failed: its deltas go back in front of any recorded since."""
        with self._lock:
            newer, self._pending = self._pending, {}
            for workload_id, delta in pending.items():
                self._pending_for(workload_id).merge(delta)
            for workload_id, delta in newer.items():
                self._pending_for(workload_id).merge(delta)

    def apply_changes(
        self, changes: dict[str, FleetCounts | None], *, full: bool, server_time: float
    ) -> None:
        """A sync's reply: the workloads changed (None: forgotten), or all of them."""
        with self._lock:
            if full:
                self._fleet = {}
            for workload_id, counts in changes.items():
                if counts is None:
                    self._fleet.pop(workload_id, None)
                else:
                    self._fleet[workload_id] = counts
            now = self._clock.now()
            self._synced_at = now
            self._server_offset = server_time - now

    @property
    def fresh(self) -> bool:
        synced = self._synced_at
        return synced is not None and self._clock.now() - synced <= self._stale_after

    # -- reads

    def get_metrics(self, workload_id: str) -> WorkloadMetrics | None:
        local = self.local.get_metrics(workload_id)
        with self._lock:
            shared = self._fleet.get(workload_id) if self.fresh else None
            pending = self._pending.get(workload_id)
            server_now = self._clock.now() + self._server_offset
        if shared is None:
            return local
        return _combine(workload_id, shared, pending, local, server_now)

    def get_request_rate(self, workload_id: str) -> float:
        metrics = self.get_metrics(workload_id)
        return 0.0 if metrics is None else metrics.request_rate

    def list_metrics(self) -> list[WorkloadMetrics]:
        locals_ = {m.workload_id: m for m in self.local.list_metrics()}
        with self._lock:
            fleet = dict(self._fleet) if self.fresh else {}
            pending = dict(self._pending)
            server_now = self._clock.now() + self._server_offset
        return [
            _combine(wid, fleet[wid], pending.get(wid), locals_.get(wid), server_now)
            if wid in fleet
            else locals_[wid]
            for wid in sorted(fleet.keys() | locals_.keys())
        ]

    def recent_waits(self) -> dict[str, list[float]]:
        """This replica's latest dispatches (the fleet keeps only the average)."""
        return self.local.recent_waits()

    def sweep(self) -> list[str]:
        return self.local.sweep()

    def active_counts(self) -> dict[str, int]:
        return self.local.active_counts()

    def __len__(self) -> int:
        return len(self.local)


def _combine(
    workload_id: str,
    shared: FleetCounts,
    pending: Pending | None,
    local: WorkloadMetrics | None,
    server_now: float,
) -> WorkloadMetrics:
    new = pending.new if pending else 0
    dispatched = pending.dispatched if pending else 0
    average_wait = shared.average_wait
    if shared.dispatched == 0 and local is not None:
        average_wait = local.average_wait_time
    return WorkloadMetrics(
        workload_id=workload_id,
        total_requests=shared.total + new,
        active_requests=shared.others_active + (local.active_requests if local else 0),
        average_wait_time=average_wait,
        dispatched_count=shared.dispatched + dispatched,
        request_rate=shared.rate.rate(server_now),
    )
