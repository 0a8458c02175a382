"""fair-share: weighted fair queuing over workloads with virtual counters (after VTC, OSDI '24).

Algorithm
- Every workload w keeps a virtual counter c_w: the service it has received,
  each unit divided by the weight of the request that received it. A
  request's weight is its workload's `weight` in --workloads when it has one,
  else it comes from its criticality (default: weight = criticality, so a
  criticality-5 request costs a fifth of a criticality-1 one).
- Order: the queued request whose workload has the smallest counter goes
  first; within a workload, higher criticality, then arrival order.
- Charging, cost `requests`: c_w += 1/weight at dispatch.
  Cost `occupancy` (slot-seconds, what a capacity-limited backend really
  spends): at dispatch c_w += e_w/weight, where e_w is the workload's
  expected service time (an EMA of its measured dispatch-to-completion times;
  the all-workload average before it has any; 0 before anything is measured,
  since an over-estimate would mislead lifts, while an under-estimate is at
  most C requests' worth). At completion the guess is corrected by
  (measured - e_w)/weight, as Kubernetes APF corrects its seat-seconds.
  Cost `tokens` (VTC's own unit, when bodies pass through the processor):
  at dispatch c_w += (input + 2 * output)/weight with the request's estimate
  (prompt length, max_tokens; the workload's last measured cost when the body
  was not read); at completion the charge is corrected to the response's
  reported `usage`. A response that completes without usage (an error body,
  an Envoy local reply, a stream without include_usage) keeps its request's
  estimate, uncorrected: one such response says nothing about the others.
  Only a run of `fallback_after` (20) consecutive responses without usage
  switches the policy to `occupancy` for good (it says so once in the log):
  a unit that is never measured must not be billed by guesses alone. A
  response with usage ends the run. The counters keep their unit across the
  switch: occupancy is then priced in tokens, at the rate measured so far
  (an EMA of the tokens billed per completed request over an EMA of its
  slot-seconds, within 1e-3..1e9 tokens per second), so no comparison ever
  mixes tokens with seconds, and a request in flight at the switch -- charged
  in tokens -- is corrected to its priced slot-seconds, not refunded.
- Numbers from outside are bounded where they enter: token counts within
  0..`contracts.MAX_TOKENS` (clamped), weights within `MIN_WEIGHT..MAX_WEIGHT`
  (refused otherwise, at start). A single charge is therefore finite and at
  most 3 * MAX_TOKENS / MIN_WEIGHT token units, and the counters stay finite.
- Hooks are atomic: each computes everything that can fail before it changes
  any state (the flow controller refuses a request whose hook raised). A
  dispatch refused by a later step is undone (`on_undispatch`): its charge is
  refunded and no service time is learnt from it.
- No banking of idle credit: when a workload with nothing queued enqueues,
  c_w = max(c_w, floor). The floor is the system's virtual time -- the
  counter, before charging, of the most recent dispatch, as in start-time
  fair queuing -- or the smallest counter of a backlogged workload if an
  occupancy correction has put one below it. A returning workload thus starts
  level with the workloads being served, at most one charge ahead of them.
  An idle workload's counter is forgotten once it is at or below the floor,
  and in any case when the registry forgets the workload (idle TTL): a debt
  older than that is forgiven. The smallest backlogged counter comes from a
  min-heap with lazy deletion (an entry is stale once its workload left the
  backlog or its counter moved; stale entries are dropped as they surface, and
  the heap is rebuilt when they outnumber the live ones): O(log W) amortised
  per hook, W = backlogged workloads.

Guarantees
- Work-conserving: the policy only orders; it never keeps a free slot idle.
- Fairness: while two workloads i and j both stay backlogged, their weighted
  service c_i and c_j differ by at most 2U, U being the largest single charge
  (VTC's bound; cost `requests`: U = 1/min weight). With cost `occupancy` the
  bound also carries the not-yet-corrected estimation error of the requests in
  flight, which the correction removes as each one completes.
- A workload returning from idle starts at the floor: it gets its fair share
  from then on, never a burst paid for by past idleness.

Concurrency: called only by the flow controller, on its event loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Literal

import structlog

from extproc.contracts import QueuedRequest, TokenCount, clamp_tokens
from extproc.flowcontrol.policy import KeyedPolicy

Cost = Literal["requests", "occupancy", "tokens"]
OUTPUT_TOKEN_WEIGHT = 2.0
"""An answer token costs this many prompt tokens (decode is dearer than prefill)."""
DEFAULT_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
MIN_WEIGHT = 1e-3
MAX_WEIGHT = 1e3
"""The declared range of a weight (criticality weights, a workload's `weight`)."""
_MIN_RATE, _MAX_RATE = 1e-3, 1e9
"""Tokens per slot-second, when occupancy is priced in tokens after the fallback."""
_ESTIMATE_ALPHA = 0.2
FALLBACK_AFTER = 20
"""tokens: this many consecutive responses without usage switch the cost to occupancy."""


class FairSharePolicy(KeyedPolicy):
    name = "fair-share"
    stable_keys = True  # a counter moves only in the hooks about its workload

    def __init__(
        self,
        cost: Cost = "occupancy",
        criticality_weights: Sequence[float] = DEFAULT_WEIGHTS,
        workload_weight: Callable[[str], float | None] | None = None,
        fallback_after: int = FALLBACK_AFTER,
    ) -> None:
        check_weights(criticality_weights)
        self.cost = cost
        self._unit = 1.0
        """Counter units per slot-second: 1 with cost occupancy; tokens per second once
        the tokens cost fell back to occupancy."""
        self._token_average: float | None = None
        self._seconds_average: float | None = None
        """tokens: EMAs of the tokens billed and the slot-seconds of completed requests."""
        self._weights = tuple(criticality_weights)
        self._workload_weight = workload_weight or (lambda _workload_id: None)
        self._counters: dict[str, float] = {}
        self._queued: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._estimates: dict[str, float] = {}
        self._charged: dict[int, float] = {}
        self._average_service: float | None = None
        self._token_costs: dict[str, float] = {}
        """tokens: each workload's last measured cost, the estimate for an unread body."""
        self._fallback_after = fallback_after
        self._without_usage = 0
        """tokens: consecutive responses that reported no usage."""
        self._virtual_time = 0.0
        self._backlog: list[tuple[float, str]] = []
        """(counter, workload) of backlogged workloads; see the module's note on staleness."""

    def counter(self, workload_id: str) -> float:
        return self._counters.get(workload_id, self._floor())

    def sort_key(self, item: QueuedRequest) -> tuple[float, ...]:
        return (self._counters[item.workload_id], -item.criticality, item.seq)

    def on_enqueue(self, item: QueuedRequest) -> None:
        workload = item.workload_id
        idle = not self._queued.get(workload)
        if idle:
            self._counters[workload] = max(self._counters.get(workload, 0.0), self._floor())
        self._queued[workload] = self._queued.get(workload, 0) + 1
        if idle:
            self._rekey(workload)

    def on_dispatch(self, item: QueuedRequest) -> None:
        workload = item.workload_id
        charge = self._charge(item)
        weighted = charge / self._weight(item)
        self._leave_queue(workload)
        self._in_flight[workload] = self._in_flight.get(workload, 0) + 1
        self._virtual_time = max(self._virtual_time, self._counters[workload])
        self._charged[item.seq] = charge
        self._counters[workload] += weighted
        self._rekey(workload)

    def on_undispatch(self, item: QueuedRequest) -> None:
        # Refused after on_dispatch: as if never charged, and nothing learnt from it.
        weight = self._weight(item)
        charged = self._leave_flight(item)
        self._counters[item.workload_id] -= charged / weight
        self._rekey(item.workload_id)
        self._forget_if_idle(item.workload_id)

    def on_done(self, item: QueuedRequest, service_time: float | None) -> None:
        workload = item.workload_id
        if service_time is None:
            self._leave_queue(workload)
        else:
            charged = self._leave_flight(item)
            if self.cost == "occupancy":
                priced = service_time * self._unit
                self._counters[workload] += (priced - charged) / self._weight(item)
                self._learn(workload, service_time)
                self._rekey(workload)
            elif self.cost == "tokens":
                # Also learn seconds and their price, so a switch to occupancy starts informed.
                self._learn(workload, service_time)
                self._token_average = _ema(self._token_average, charged)
                self._seconds_average = _ema(self._seconds_average, service_time)
        self._forget_if_idle(workload)

    def on_usage(self, item: QueuedRequest, usage: TokenCount | None) -> None:
        if self.cost != "tokens" or item.seq not in self._charged:
            return
        if usage is None:
            self._without_usage += 1
            if self._without_usage >= self._fallback_after:
                self._fall_back()
            return
        measured = _token_cost(usage)
        correction = (measured - self._charged[item.seq]) / self._weight(item)
        self._without_usage = 0
        self._counters[item.workload_id] += correction
        self._rekey(item.workload_id)
        # Corrected once: on_done must not correct it again.
        self._charged[item.seq] = measured
        self._token_costs[item.workload_id] = measured

    def _fall_back(self) -> None:
        tokens, seconds = self._token_average, self._seconds_average
        rate = tokens / seconds if tokens and seconds else 1.0
        self._unit = min(max(rate, _MIN_RATE), _MAX_RATE)
        structlog.get_logger("extproc.policy").warning(
            "fair-share-cost-fallback",
            detail=f"{self._without_usage} responses in a row reported no token usage: "
            f"fair-share charges occupancy (slot-seconds) from now on, priced at "
            f"{self._unit:.6g} tokens per second",
        )
        self.cost = "occupancy"

    def _charge(self, item: QueuedRequest) -> float:
        if self.cost == "occupancy":
            return self._estimate(item.workload_id) * self._unit
        if self.cost == "tokens":
            if item.tokens is not None:
                return _token_cost(item.tokens)
            return self._token_costs.get(item.workload_id, 0.0)
        return 1.0

    def forget(self, workload_id: str) -> None:
        if workload_id not in self._queued and workload_id not in self._in_flight:
            self._counters.pop(workload_id, None)
            self._estimates.pop(workload_id, None)
            self._token_costs.pop(workload_id, None)

    def _floor(self) -> float:
        # The virtual time is the counter of the latest dispatch, so normally no
        # backlogged counter is below it; an occupancy correction can push one
        # below, and a newcomer must not then start behind it.
        heap = self._backlog
        while heap:
            counter, workload = heap[0]
            if workload in self._queued and self._counters.get(workload) == counter:
                return min(self._virtual_time, counter)
            heapq.heappop(heap)
        return self._virtual_time

    def _rekey(self, workload: str) -> None:
        """The workload's counter moved: enter its new value if it is backlogged."""
        if workload not in self._queued:
            return
        heapq.heappush(self._backlog, (self._counters[workload], workload))
        if len(self._backlog) > 2 * len(self._queued) + 64:
            self._backlog = [(self._counters[w], w) for w in self._queued]
            heapq.heapify(self._backlog)

    def _weight(self, item: QueuedRequest) -> float:
        weight = self._workload_weight(item.workload_id) or self._weights[item.criticality - 1]
        return min(max(weight, MIN_WEIGHT), MAX_WEIGHT)

    def _estimate(self, workload: str) -> float:
        # Nothing measured yet: charge nothing and let completion bill the truth.
        # Guessing high would lift newcomers onto counters that later fall away.
        return self._estimates.get(workload, self._average_service or 0.0)

    def _learn(self, workload: str, service_time: float) -> None:
        self._estimates[workload] = _ema(self._estimates.get(workload), service_time)
        self._average_service = _ema(self._average_service, service_time)

    def _leave_flight(self, item: QueuedRequest) -> float:
        """Its charge, no longer in flight."""
        charged = self._charged.pop(item.seq)
        workload = item.workload_id
        self._in_flight[workload] -= 1
        if not self._in_flight[workload]:
            del self._in_flight[workload]
        return charged

    def _leave_queue(self, workload: str) -> None:
        left = self._queued[workload] - 1
        if left:
            self._queued[workload] = left
        else:
            del self._queued[workload]

    def _forget_if_idle(self, workload: str) -> None:
        idle = workload not in self._queued and workload not in self._in_flight
        if idle and self._counters.get(workload, 0.0) <= self._floor():
            self._counters.pop(workload, None)
            self._estimates.pop(workload, None)
            self._token_costs.pop(workload, None)


def check_weights(weights: Sequence[float]) -> None:
    """Five finite weights within MIN_WEIGHT..MAX_WEIGHT, else ValueError saying so."""
    if len(weights) != len(DEFAULT_WEIGHTS) or not all(
        MIN_WEIGHT <= weight <= MAX_WEIGHT
        for weight in weights  # False for NaN
    ):
        raise ValueError(
            f"criticality weights: five numbers from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, "
            "for criticality 1..5"
        )


def _token_cost(tokens: TokenCount) -> float:
    return clamp_tokens(tokens.input) + OUTPUT_TOKEN_WEIGHT * clamp_tokens(tokens.output)


def _ema(average: float | None, value: float) -> float:
    return value if average is None else average + _ESTIMATE_ALPHA * (value - average)
