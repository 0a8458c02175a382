"""The in-memory Workload Registry: per-workload counters behind one lock.

Concurrency: every method takes a single `threading.Lock` for a few
arithmetic operations, so the registry is safe from asyncio tasks and from
other threads alike; readers get frozen copies and never hold the lock while
they use them. One lock is cheaper in CPython than the seed's per-entry
RWMutex, because the GIL already serialises the work done under it.

Lifecycle: a workload appears on its first request (`increment_active`) and
stays while it has active requests. Once it has none and has been quiet for
`idle_ttl` seconds, `sweep` forgets it (a workload with requests queued or in
flight always has active requests, so it is never forgotten). At most
`max_workloads` are tracked: a new one beyond that raises `RegistryFull`,
except the reserved OVERFLOW_WORKLOAD, which is always admitted. Counters per
workload:
- total_requests: requests ever seen; active_requests: seen, not completed
  (queued plus in flight); dispatched_count: released by the queue.
- average_wait_time: EMA with factor alpha of enqueue-to-dispatch time; the
  first dispatch seeds it.
- request_rate: `SlidingWindowRate` over `rate_window` seconds.
Across workloads, the waits of the latest RECENT_WAITS dispatches are kept
(constant memory) for the read API's recent p99.
"""

from __future__ import annotations

import threading
from collections import deque

from extproc.context import OVERFLOW_WORKLOAD
from extproc.contracts import Clock, RegistryFull, WorkloadMetrics
from extproc.registry.rate import SlidingWindowRate

__all__ = ["OVERFLOW_WORKLOAD", "RECENT_WAITS", "InMemoryWorkloadRegistry"]
RECENT_WAITS = 10_000


class _Workload:
    __slots__ = ("active", "average_wait", "dispatched", "last_seen", "rate", "total")

    def __init__(self, rate: SlidingWindowRate, now: float) -> None:
        self.total = 0
        self.active = 0
        self.dispatched = 0
        self.average_wait = 0.0
        self.rate = rate
        self.last_seen = now


class InMemoryWorkloadRegistry:
    def __init__(
        self,
        clock: Clock,
        *,
        ema_alpha: float = 0.2,
        rate_window: float = 60.0,
        max_workloads: int = 100_000,
        idle_ttl: float = 300.0,
    ) -> None:
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError("ema_alpha must be in (0, 1]")
        self._clock = clock
        self._alpha = ema_alpha
        self._rate_window = rate_window
        self.max_workloads = max_workloads
        self.idle_ttl = idle_ttl
        self._lock = threading.Lock()
        self._workloads: dict[str, _Workload] = {}
        self._recent: deque[tuple[str, float]] = deque(maxlen=RECENT_WAITS)

    def increment_active(self, workload_id: str) -> None:
        now = self._clock.now()
        with self._lock:
            workload = self._workloads.get(workload_id)
            if workload is None:
                full = len(self._workloads) >= self.max_workloads
                if full and workload_id != OVERFLOW_WORKLOAD:
                    raise RegistryFull(workload_id)
                workload = _Workload(SlidingWindowRate(self._rate_window, now), now)
                self._workloads[workload_id] = workload
            workload.total += 1
            workload.active += 1
            workload.last_seen = now
            workload.rate.record(now)

    def decrement_active(self, workload_id: str) -> None:
        now = self._clock.now()
        with self._lock:
            workload = self._workloads.get(workload_id)
            # A decrement without its increment is a caller bug; flooring at zero
            # keeps one bug from corrupting every later count of the workload.
            if workload is not None and workload.active > 0:
                workload.active -= 1
                workload.last_seen = now

    def sweep(self) -> list[str]:
        """Forget workloads with nothing active, quiet for `idle_ttl`; returns their ids."""
        horizon = self._clock.now() - self.idle_ttl
        with self._lock:
            idle = [
                workload_id
                for workload_id, w in self._workloads.items()
                if w.active == 0 and w.last_seen <= horizon
            ]
            for workload_id in idle:
                del self._workloads[workload_id]
        return idle

    def record_dispatch(self, workload_id: str, wait_time: float) -> None:
        with self._lock:
            workload = self._workloads.get(workload_id)
            if workload is None:
                return
            if workload.dispatched == 0:
                workload.average_wait = wait_time
            else:
                workload.average_wait += self._alpha * (wait_time - workload.average_wait)
            workload.dispatched += 1
            self._recent.append((workload_id, wait_time))

    def recent_waits(self) -> dict[str, list[float]]:
        """The waits of the latest dispatches (at most RECENT_WAITS), by workload."""
        with self._lock:
            recent = list(self._recent)
        by_workload: dict[str, list[float]] = {}
        for workload_id, wait in recent:
            by_workload.setdefault(workload_id, []).append(wait)
        return by_workload

    def get_metrics(self, workload_id: str) -> WorkloadMetrics | None:
        now = self._clock.now()
        with self._lock:
            workload = self._workloads.get(workload_id)
            return None if workload is None else _copy(workload_id, workload, now)

    def get_request_rate(self, workload_id: str) -> float:
        now = self._clock.now()
        with self._lock:
            workload = self._workloads.get(workload_id)
            return 0.0 if workload is None else workload.rate.rate(now)

    def list_metrics(self) -> list[WorkloadMetrics]:
        now = self._clock.now()
        with self._lock:
            return [_copy(wid, w, now) for wid, w in sorted(self._workloads.items())]

    def active_counts(self) -> dict[str, int]:
        """Every workload with active requests, and how many."""
        with self._lock:
            return {wid: w.active for wid, w in self._workloads.items() if w.active}

    def __len__(self) -> int:
        return len(self._workloads)


def _copy(workload_id: str, workload: _Workload, now: float) -> WorkloadMetrics:
    return WorkloadMetrics(
        workload_id=workload_id,
        total_requests=workload.total,
        active_requests=workload.active,
        average_wait_time=workload.average_wait,
        dispatched_count=workload.dispatched,
        request_rate=workload.rate.rate(now),
    )
