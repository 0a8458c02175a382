"""Ordering policies: which queued request the flow controller releases next.

The flow controller keeps one FIFO per flow (workload, criticality) and at
every dispatch asks `less` to compare the heads, so each decision sees the
metrics as they are now; no policy's order is ever frozen into a heap key.

- `fcfs`: arrival order across all workloads. The baseline.
- `fair-share`: weighted fair queuing over workloads (`fair_share.py`).
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

from collections.abc import Callable
from dataclasses import dataclass

from extproc.context import MAX_CRITICALITY
from extproc.contracts import Clock, Datastore, Policy, QueuedRequest
from extproc.fair_share import DEFAULT_WEIGHTS, Cost, FairSharePolicy


class StatelessPolicy:
    """A policy that orders by what it reads at decision time and keeps no accounts."""

    def on_enqueue(self, item: QueuedRequest) -> None:
        pass

    def on_dispatch(self, item: QueuedRequest) -> None:
        pass

    def on_done(self, item: QueuedRequest, service_time: float | None) -> None:
        pass

    def forget(self, workload_id: str) -> None:
        pass


class FcfsPolicy(StatelessPolicy):
    name = "fcfs"

    def less(self, a: QueuedRequest, b: QueuedRequest) -> bool:
        return a.seq < b.seq


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

    def __init__(
        self, datastore: Datastore, clock: Clock, weights: ScoreWeights | None = None
    ) -> None:
        self._datastore = datastore
        self._clock = clock
        self._weights = weights or ScoreWeights()

    def less(self, a: QueuedRequest, b: QueuedRequest) -> bool:
        score_a, score_b = self.score(a), self.score(b)
        if score_a != score_b:
            return score_a > score_b
        return a.seq < b.seq

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


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    score: ScoreWeights = ScoreWeights()
    """workload-aware's weights."""
    cost: Cost = "occupancy"
    """fair-share's unit of service."""
    criticality_weights: tuple[float, ...] = DEFAULT_WEIGHTS
    """fair-share's weight for criticality 1..5."""


PolicyFactory = Callable[[Datastore, Clock, PolicyOptions], Policy]

POLICIES: dict[str, PolicyFactory] = {
    FcfsPolicy.name: lambda _datastore, _clock, _options: FcfsPolicy(),
    WorkloadAwarePolicy.name: lambda datastore, clock, options: WorkloadAwarePolicy(
        datastore, clock, options.score
    ),
    FairSharePolicy.name: lambda _datastore, _clock, options: FairSharePolicy(
        options.cost, options.criticality_weights
    ),
}


def make_policy(
    name: str, datastore: Datastore, clock: Clock, options: PolicyOptions | None = None
) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
    return factory(datastore, clock, options or PolicyOptions())
