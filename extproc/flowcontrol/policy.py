"""Ordering policies: which queued request the flow controller releases next.

The flow controller keeps one FIFO per flow (workload, criticality) and at
every dispatch asks `less` to compare the heads, so each decision sees the
metrics as they are now; no policy's order is ever frozen into a heap key.

- `fcfs`: arrival order across all workloads. The baseline.
- `fair-share`: weighted fair queuing over workloads (`fair_share.py`).
`policies.py` names them all.
- `workload-aware` (the seed's score), higher first, arrival order on ties::

      score = w_wait * min(wait / wait_saturation, 1)
            + w_criticality * criticality / 5
            - w_rate * min(request_rate / rate_saturation, 1)

  `wait` is the workload's average queue wait (EMA) -- or, when larger, how
  long the request being scored has waited so far. The seed used the average
  alone, which only moves when the workload is dispatched: a workload whose
  head never wins kept its stale, low average and could wait until timeout.
  With the head's own wait folded in, a waiting request's score rises until it
  wins, so every request is dispatched or times out, and each flow's wait is
  bounded relative to the others' by the spread of the other two terms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from extproc.context import MAX_CRITICALITY
from extproc.contracts import Clock, Datastore, QueuedRequest, TokenCount


class KeyedPolicy(ABC):
    """`less` defined by `sort_key`, so the two can never disagree."""

    @abstractmethod
    def sort_key(self, item: QueuedRequest) -> tuple[float, ...]: ...

    def less(self, a: QueuedRequest, b: QueuedRequest) -> bool:
        return self.sort_key(a) < self.sort_key(b)


class StatelessPolicy(KeyedPolicy):
    """A policy that orders by what it reads at decision time and keeps no accounts."""

    def on_enqueue(self, item: QueuedRequest) -> None:
        pass

    def on_dispatch(self, item: QueuedRequest) -> None:
        pass

    def on_undispatch(self, item: QueuedRequest) -> None:
        pass

    def on_done(self, item: QueuedRequest, service_time: float | None) -> None:
        pass

    def on_usage(self, item: QueuedRequest, usage: TokenCount | None) -> None:
        pass

    def forget(self, workload_id: str) -> None:
        pass


class FcfsPolicy(StatelessPolicy):
    name = "fcfs"
    stable_keys = True

    def sort_key(self, item: QueuedRequest) -> tuple[float, ...]:
        return (item.seq,)


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    wait: float = 0.4
    criticality: float = 0.4
    rate: float = 0.2
    wait_saturation: float = 60.0
    """Seconds of wait at which the wait term stops growing."""
    rate_saturation: float = 100.0
    """Requests per second at which the rate penalty stops growing."""


class WorkloadAwarePolicy(StatelessPolicy):
    name = "workload-aware"
    stable_keys = False  # the head's own wait and the rate move with time

    def __init__(
        self, datastore: Datastore, clock: Clock, weights: ScoreWeights | None = None
    ) -> None:
        self._datastore = datastore
        self._clock = clock
        self._weights = weights or ScoreWeights()

    def sort_key(self, item: QueuedRequest) -> tuple[float, ...]:
        return (-self.score(item), item.seq)

    def score(self, item: QueuedRequest) -> float:
        w = self._weights
        metrics = self._datastore.workload_get_metrics(item.workload_id)
        average_wait = metrics.average_wait_time if metrics else 0.0
        rate = metrics.request_rate if metrics else 0.0
        wait = max(average_wait, self._clock.now() - item.enqueued_at)
        return (
            w.wait * min(wait / w.wait_saturation, 1.0)
            + w.criticality * item.criticality / MAX_CRITICALITY
            - w.rate * min(rate / w.rate_saturation, 1.0)
        )
