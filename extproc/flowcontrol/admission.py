"""Admission to a full queue: the workload holding the most, by weight, gives way.

Algorithm
- Each workload w has q_w requests queued and a weight g_w > 0 (its `weight`
  in --workloads; 1 otherwise: criticality is the client's claim, so it buys
  order in the queue, never space in it). Its load is q_w / g_w.
- A request of workload a arrives and the queue holds M = max_queue:
  - if (q_a + 1) / g_a >= max over w != a of q_w / g_w (in particular when a
    itself holds the most), a is refused at the door (queue-full): a swap
    between equals would only churn;
  - otherwise the heaviest other workload h gives way: its newest queued
    request is pushed out (queue-full) and a's request takes its place.
  Loads sit in a max-heap with lazy deletion (as the queue's own heap):
  O(log W) per change and per decision, W = workloads with requests queued.

Guarantee (proved by property tests on virtual time)
- Let S be the workloads with requests queued plus the arriving one, and
  share_a = M * g_a / sum of g_w over S. A workload that, counting the arriving
  request, holds no more than its share is never refused queue-full: its
  request is admitted, and no request of it is pushed out.
  Proof: the queue is full, so the weighted mean m of the loads over S is
  M / sum g = share_a / g_a. Admission: if q_a + 1 <= share_a = m g_a, the
  others hold M - q_a >= m (G - g_a) + 1 requests, G = sum g: their weighted
  mean load, hence their maximum, is above m >= (q_a + 1) / g_a, so a is
  admitted. Push-out: h gives way to b only when q_h / g_h > (q_b + 1) / g_b
  > q_b / g_b and h is the heaviest; a maximum above one member of S is above
  the mean, so q_h > share_h.
- The queue never holds more than M, and every push-out is one outcome of one
  ticket (the queue's exactly-once rule), so it is counted out once.

Concurrency: owned by the flow controller, on its event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadLimits:
    """What the operator allows one workload (--workloads); the defaults limit nothing."""

    weight: float | None = None
    """Fair-share weight, and the workload's weight in the queue's shares (None: 1)."""
    max_in_flight: int | None = None
    """Its requests dispatched and not completed, at most; the rest wait."""
    max_queued: int | None = None
    """Its requests waiting, at most; beyond: workload-limit."""


NO_LIMITS = WorkloadLimits()


class QueueShares:
    """How many requests each workload has queued, and who gives way when the queue is full."""

    def __init__(self, weight: Callable[[str], float]) -> None:
        self._weight = weight
        self._counts: dict[str, int] = {}
        self._heap: list[tuple[float, int, str]] = []
        """(-load, version, workload); an entry is live while its version is current."""
        self._versions: dict[str, int] = {}
        self._version = itertools.count()

    def count(self, workload_id: str) -> int:
        return self._counts.get(workload_id, 0)

    def add(self, workload_id: str) -> None:
        self._counts[workload_id] = self.count(workload_id) + 1
        self._rekey(workload_id)

    def remove(self, workload_id: str) -> None:
        left = self._counts[workload_id] - 1
        if left:
            self._counts[workload_id] = left
            self._rekey(workload_id)
        else:
            del self._counts[workload_id]
            del self._versions[workload_id]

    def reweigh(self) -> None:
        """The weights changed (a reloaded --workloads): key every workload afresh."""
        self._heap.clear()
        self._versions.clear()
        for workload_id in self._counts:
            self._rekey(workload_id)

    def give_way(self, arriving: str) -> str | None:
        """The workload whose newest request makes room for `arriving`; None: refuse it."""
        while self._heap:
            negative_load, version, heaviest = self._heap[0]
            if self._versions.get(heaviest) == version:
                break
            heapq.heappop(self._heap)
        else:
            return None
        if heaviest == arriving:
            return None
        if (self.count(arriving) + 1) / self._weight(arriving) >= -negative_load:
            return None
        return heaviest

    def _rekey(self, workload_id: str) -> None:
        version = self._versions[workload_id] = next(self._version)
        load = self._counts[workload_id] / self._weight(workload_id)
        heapq.heappush(self._heap, (-load, version, workload_id))
        if len(self._heap) > 4 * len(self._versions) + 64:
            self._heap = [e for e in self._heap if self._versions.get(e[2]) == e[1]]
            heapq.heapify(self._heap)
