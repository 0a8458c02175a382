"""Hostile numbers and hooks that raise (issue 23): no leaked slot, no poisoned fair share.

Every test runs the real flow controller and policies on the virtual clock."""

import math
from collections import Counter

import pytest

from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import MAX_TOKENS, PickRequest, QueuedRequest, TokenCount
from extproc.flowcontrol.admission import WorkloadLimits
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policy import FcfsPolicy, WorkloadAwarePolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome, rejection_for
from extproc.pool.body import parse
from extproc.pool.usage import estimate
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from tests.pool.support import make_pool


class Bomb(Exception):
    pass


class BrokenPolicy(FcfsPolicy):
    """FCFS, except that the hook named `where` raises for workload "bad"."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def _maybe(self, hook: str, item: QueuedRequest) -> None:
        if hook == self.where and item.workload_id == "bad":
            raise Bomb(hook)

    def on_enqueue(self, item: QueuedRequest) -> None:
        self._maybe("on_enqueue", item)

    def on_dispatch(self, item: QueuedRequest) -> None:
        self._maybe("on_dispatch", item)

    def on_done(self, item: QueuedRequest, service_time: float | None) -> None:
        self._maybe("on_done", item)

    def on_usage(self, item: QueuedRequest, usage: TokenCount | None) -> None:
        self._maybe("on_usage", item)


def controller(policy: object, clock: VirtualClock, **kw: object) -> FlowController:
    options: dict[str, object] = {"max_concurrency": 1, "max_queue": 10, "queue_timeout": 30.0}
    options.update(kw)
    return FlowController(policy, clock, **options)  # type: ignore[arg-type]


# -- case 1: a hook that raises rejects that request only ---------------------------------


@pytest.mark.parametrize("where", ["on_enqueue", "on_dispatch"])
def test_a_hook_raising_at_once_rejects_that_request_and_frees_its_slot(where: str) -> None:
    clock = VirtualClock()
    flow = controller(BrokenPolicy(where), clock)
    bad = flow.enqueue(FlowRequest("bad", 3))
    assert bad.outcome is Outcome.REJECTED_INTERNAL
    assert where in bad.detail
    assert (flow.in_flight, flow.queued, flow.in_flight_for("bad")) == (0, 0, 0)
    good = flow.enqueue(FlowRequest("good", 3))
    assert good.outcome is Outcome.DISPATCHED
    answer = rejection_for(bad.outcome, detail=bad.detail)
    assert answer.status == 500
    assert b"internal-error" in answer.body
    assert where.encode() in answer.body


def test_a_queued_request_whose_hook_raises_never_hurts_the_innocent_one() -> None:
    """Issue 23 case 1, queued: the error surfaced in the innocent request's completion,
    the bad request's queue timer raised KeyError, and the slot was lost."""
    clock = VirtualClock()
    flow = controller(BrokenPolicy("on_dispatch"), clock)
    innocent = flow.enqueue(FlowRequest("good", 3))
    bad = flow.enqueue(FlowRequest("bad", 3))
    after = flow.enqueue(FlowRequest("good", 3))
    assert bad.outcome is None
    innocent.close()  # must not raise
    assert bad.outcome is Outcome.REJECTED_INTERNAL
    assert after.outcome is Outcome.DISPATCHED
    clock.advance(60)  # the bad request's timer was cancelled: nothing fires, nothing raises
    after.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


def test_on_done_and_on_usage_raising_are_logged_not_surfaced() -> None:
    clock = VirtualClock()
    for where in ("on_done", "on_usage"):
        flow = controller(BrokenPolicy(where), clock)
        bad = flow.enqueue(FlowRequest("bad", 3))
        waiting = flow.enqueue(FlowRequest("good", 3))
        assert bad.outcome is Outcome.DISPATCHED
        bad.usage(TokenCount(1, 1))
        bad.close()  # must not raise, and must hand the slot on
        assert waiting.outcome is Outcome.DISPATCHED
        waiting.close()
        assert (flow.in_flight, flow.queued) == (0, 0)


def test_a_queue_timeout_never_raises_even_when_the_policy_does() -> None:
    clock = VirtualClock()
    flow = controller(BrokenPolicy("on_done"), clock, queue_timeout=5.0)
    first = flow.enqueue(FlowRequest("good", 3))
    bad = flow.enqueue(FlowRequest("bad", 3))
    clock.advance(6)  # on_done(None) raises inside the timer
    assert bad.outcome is Outcome.EVICTED_QUEUE_TIMEOUT
    first.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


def huge_max_tokens_request() -> TokenCount:
    body = b'{"prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}"
    tokens = estimate(parse(body))
    assert tokens is not None
    return tokens


def test_a_huge_max_tokens_is_clamped_where_it_enters() -> None:
    tokens = huge_max_tokens_request()
    assert tokens.output == MAX_TOKENS
    prompt = estimate(parse(b'{"prompt": "' + b"x" * (8 * MAX_TOKENS) + b'"}'))
    assert prompt is not None
    assert prompt.input == MAX_TOKENS


def test_a_huge_max_tokens_neither_leaks_a_slot_nor_raises() -> None:
    clock = VirtualClock()
    flow = controller(FairSharePolicy("tokens"), clock)
    first = flow.enqueue(FlowRequest("good", 3, tokens=TokenCount(10, 10)))
    queued = flow.enqueue(FlowRequest("bad", 3, tokens=huge_max_tokens_request()))
    first.close()
    assert queued.outcome is Outcome.DISPATCHED
    queued.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


# -- case 2: virtual time stays finite and comparable -------------------------------------


def serve(
    flow: FlowController,
    clock: VirtualClock,
    workloads: dict[str, int],
    dispatches: int,
    *,
    tokens: TokenCount | None = None,
    usage: TokenCount | None = None,
    usage_for: int = 0,
    service: float = 1.0,
) -> Counter[str]:
    """Keep every workload backlogged (criticality from `workloads`); complete the oldest
    request in flight after `service` seconds, the first `usage_for` completions reporting
    `usage`, the others none; count the dispatches."""
    served: Counter[str] = Counter()
    running: list[Ticket] = []
    waiting: list[Ticket] = []

    def top_up() -> None:
        for workload, criticality in workloads.items():
            while flow.queued_for(workload) < 3:
                waiting.append(flow.enqueue(FlowRequest(workload, criticality, tokens=tokens)))

    top_up()
    completed = 0
    while sum(served.values()) < dispatches:
        for ticket in [t for t in waiting if t.outcome is not None]:
            waiting.remove(ticket)
            assert ticket.outcome is Outcome.DISPATCHED
            served[ticket.request.workload_id] += 1
            running.append(ticket)
        top_up()
        clock.advance(service)
        done = running.pop(0)
        done.usage(usage if completed < usage_for else None)
        done.close()
        completed += 1
    return served


def test_a_huge_max_tokens_does_not_poison_fair_share() -> None:
    """Issue 23 case 2: virtual time jumped to ~1e299, and weight 1 vs 5 got 1/119."""
    clock = VirtualClock()
    policy = FairSharePolicy("tokens")
    flow = controller(policy, clock)
    flow.enqueue(FlowRequest("hostile", 3, tokens=huge_max_tokens_request())).close()
    served = serve(flow, clock, {"light": 1, "heavy": 5}, 120, tokens=TokenCount(10, 10))
    assert math.isfinite(policy.counter("light"))
    assert served["light"] in range(19, 22)
    assert served["heavy"] in range(99, 102)


def test_usage_numbers_are_clamped_in_the_policy_too() -> None:
    policy = FairSharePolicy("tokens")
    item = QueuedRequest("a", 1, 0.0, 1, TokenCount(1, 1))
    policy.on_enqueue(item)
    policy.on_dispatch(item)
    policy.on_usage(item, TokenCount(10**400, 10**400))
    assert policy.counter("a") == 3 * MAX_TOKENS


# -- case 3: the tokens -> occupancy fallback -----------------------------------------------


def test_the_fallback_to_occupancy_keeps_two_equal_workloads_level() -> None:
    """Issue 23 case 3: after the switch one workload got 998 dispatches in a row. The
    module's bound: while both stay backlogged their counters differ by at most 2U; with
    equal requests that is a difference of at most 2 dispatches, plus the request in
    flight at the switch."""
    clock = VirtualClock()
    policy = FairSharePolicy("tokens", fallback_after=20)
    flow = controller(policy, clock, max_concurrency=2)
    served = serve(
        flow,
        clock,
        {"a": 3, "b": 3},
        1000,
        tokens=TokenCount(100, 100),
        usage=TokenCount(100, 90),
        usage_for=40,
    )
    assert policy.cost == "occupancy"
    assert abs(served["a"] - served["b"]) <= 3, served
    assert math.isfinite(policy.counter("a"))


def test_the_request_completing_at_the_switch_is_not_refunded() -> None:
    """It was charged 300 tokens; it must end billed its slot-seconds priced in tokens
    (2 s at the measured 150 tokens/s), not refunded down to 2 "seconds"."""
    policy = FairSharePolicy("tokens", fallback_after=3)
    policy.on_enqueue(QueuedRequest("a", 1, 0.0, 99))  # keeps "a" backlogged: its counter stays
    for seq in (1, 2, 3):
        item = QueuedRequest("a", 1, 0.0, seq, TokenCount(100, 100))
        policy.on_enqueue(item)
        before = policy.counter("a")
        policy.on_dispatch(item)
        policy.on_usage(item, None)
        policy.on_done(item, 2.0)
    assert policy.cost == "occupancy"
    assert policy.counter("a") - before == pytest.approx(300)


# -- case 6: criticality weights -------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [(math.nan, 2, 3, 4, 5), (1, 2, math.inf, 4, 5), (0, 1, 1, 1, 1), (1e-9, 1, 1, 1, 1)]
)
def test_criticality_weights_must_be_finite_and_in_range(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="criticality"):
        FairSharePolicy("requests", weights)


# -- case 4: shed in pool mode ----------------------------------------------------------------

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"


def test_shed_below_sheds_when_no_endpoint_has_room() -> None:
    """Issue 23 case 4: the gate is unlimited, the one endpoint full; a criticality-1
    request was queued instead of shed."""
    clock = VirtualClock()
    pool = make_pool(clock, [E1], max_in_flight=1)
    flow = FlowController(FcfsPolicy(), clock, pool=pool, shed_below=2)
    first = flow.enqueue(FlowRequest("a", 3))
    assert first.outcome is Outcome.DISPATCHED
    low = flow.enqueue(FlowRequest("b", 1))
    assert low.outcome is Outcome.REJECTED_SHED
    high = flow.enqueue(FlowRequest("b", 3))
    assert high.outcome is None  # at or above shed_below: it waits
    first.close()
    assert high.outcome is Outcome.DISPATCHED
    high.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


# -- case 8: a served report before the first byte --------------------------------------------


def test_a_move_before_the_first_byte_leaves_the_old_endpoints_started_count() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    running = flow.enqueue(FlowRequest("a", 3, PickRequest(subset=frozenset({E1}))))
    running.first_byte()
    moved = flow.enqueue(FlowRequest("a", 3, PickRequest(subset=frozenset({E1}))))
    old, new = pool.endpoint(E1), pool.endpoint(E2)
    assert old is not None
    assert new is not None
    assert (old.in_flight, old.server.started_in_flight) == (2, 1)
    moved.served(E2)  # before its first byte
    assert (old.in_flight, old.server.started_in_flight) == (1, 1)
    moved.first_byte()
    assert (new.in_flight, new.server.started_in_flight) == (1, 1)
    running.served(E2)  # after its first byte: it moves as started
    assert (old.server.started_in_flight, new.server.started_in_flight) == (0, 2)
    running.close()
    moved.close()
    assert (new.in_flight, new.server.started_in_flight) == (0, 0)


# -- a dispatch undone after on_dispatch succeeded --------------------------------------------


class FailingGate(StaticCapacity):
    """No limit; `on_dispatch` raises while `failing`."""

    def __init__(self) -> None:
        super().__init__(0)
        self.failing = False

    def on_dispatch(self) -> None:
        if self.failing:
            raise Bomb("capacity.on_dispatch")


@pytest.mark.parametrize("cost", ["occupancy", "tokens", "requests"])
def test_a_dispatch_undone_after_on_dispatch_teaches_fair_share_nothing(cost: str) -> None:
    """The undo used to be on_done(0.0): a 0 s service time fed to the estimators, and
    (cost requests) the charge kept for a request never served."""
    clock = VirtualClock()
    policy = FairSharePolicy(cost)  # type: ignore[arg-type]
    gate = FailingGate()
    flow = FlowController(policy, clock, capacity=gate)
    served = flow.enqueue(FlowRequest("a", 3, tokens=TokenCount(10, 10)))
    clock.advance(4)
    served.usage(TokenCount(10, 10))
    served.close()
    before = (policy.counter("a"), policy._average_service, policy._seconds_average)
    gate.failing = True
    refused = flow.enqueue(FlowRequest("a", 3, tokens=TokenCount(10, 10)))
    assert refused.outcome is Outcome.REJECTED_INTERNAL
    assert (policy.counter("a"), policy._average_service, policy._seconds_average) == before
    assert not policy._charged
    assert not policy._in_flight


class LatencyFailingGate(StaticCapacity):
    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        raise Bomb("capacity.on_latency")


def test_a_gate_raising_at_first_byte_does_not_skip_the_pools_started_count() -> None:
    """The pool's first byte was skipped when the gate's raised, and the release (as
    started) then took the started count of another request at that endpoint."""
    clock = VirtualClock()
    pool = make_pool(clock, [E1])
    flow = FlowController(FcfsPolicy(), clock, capacity=LatencyFailingGate(), pool=pool)
    first = flow.enqueue(FlowRequest("a", 3))
    second = flow.enqueue(FlowRequest("a", 3))
    endpoint = pool.endpoint(E1)
    assert endpoint is not None
    first.first_byte()
    second.first_byte()
    assert endpoint.server.started_in_flight == 2
    first.close()
    assert endpoint.server.started_in_flight == 1
    second.close()
    assert (flow.in_flight, endpoint.in_flight) == (0, 0)


def test_a_read_raising_for_a_queued_head_refuses_that_head_not_the_completion() -> None:
    """The dispatch walk's reads (has_room for a head's pick) were unguarded: the error
    came out of the innocent request's close, and the head blocked every later one."""
    clock = VirtualClock()
    pool = make_pool(clock, [E1], max_in_flight=1)
    has_room = pool.has_room

    def hostile(pick: PickRequest | None) -> bool:
        if pick is not None and pick.prompt == "boom":
            raise Bomb("pool.has_room")
        return has_room(pick)

    pool.has_room = hostile  # type: ignore[method-assign]
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    innocent = flow.enqueue(FlowRequest("a", 3))
    filler = flow.enqueue(FlowRequest("f", 3))
    bad = flow.enqueue(FlowRequest("bad", 3, PickRequest("boom")))
    good = flow.enqueue(FlowRequest("g", 3))
    assert (innocent.outcome, bad.outcome, good.outcome) == (Outcome.DISPATCHED, None, None)
    filler.close()  # the bad request is now the head
    innocent.close()  # must not raise
    assert bad.outcome is Outcome.REJECTED_INTERNAL
    assert "pool.has_room" in bad.detail
    assert good.outcome is Outcome.DISPATCHED
    good.close()
    assert (flow.in_flight, flow.queued) == (0, 0)
    endpoint = pool.endpoint(E1)
    assert endpoint is not None
    assert endpoint.in_flight == 0


def test_a_gate_read_raising_in_a_completion_is_logged_and_the_queue_still_served() -> None:
    clock = VirtualClock()
    gate = StaticCapacity(1)
    flow = FlowController(FcfsPolicy(), clock, capacity=gate)
    first = flow.enqueue(FlowRequest("a", 3))
    waiting = flow.enqueue(FlowRequest("b", 3))
    has_room = gate.has_room

    def raising(in_flight: int) -> bool:
        raise Bomb("capacity.has_room")

    gate.has_room = raising  # type: ignore[method-assign]
    first.close()  # must not raise
    assert waiting.outcome is None
    gate.has_room = has_room  # type: ignore[method-assign]
    flow.wake()
    assert waiting.outcome is Outcome.DISPATCHED
    waiting.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


def test_limits_that_raise_while_re_keying_escape_neither_enqueue_nor_a_completion() -> None:
    """Re-keying read the limits unguarded: raising there escaped `enqueue` after the
    request had joined the queue, and a completion's `close()`."""
    broken = {"on": True}
    flow: FlowController

    def limits(workload_id: str) -> WorkloadLimits:
        if broken["on"] and flow.queued_for(workload_id):
            raise Bomb("limits table mid-reload")
        return WorkloadLimits()

    flow = FlowController(
        FairSharePolicy(), VirtualClock(), limits=limits, max_concurrency=1, queue_timeout=30.0
    )
    first = flow.enqueue(FlowRequest("w", 3))
    queued = flow.enqueue(FlowRequest("w", 3))  # re-keyed as it joins: the read raises
    assert (first.outcome, queued.outcome) == (Outcome.DISPATCHED, None)
    first.close()  # the completion re-keys "w": the read raises again
    assert (flow.in_flight, flow.queued) == (0, 1)  # held back, not lost
    broken["on"] = False
    flow.wake()  # the limits readable again: back in the running at the next round
    assert queued.outcome is Outcome.DISPATCHED
    queued.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


def test_limits_that_raise_under_a_time_keyed_policy_hold_back_only_their_workload() -> None:
    """workload-aware re-reads every head's limits at each pick: one workload's raising
    read failed every dispatch round, and the others' requests waited with slots free."""
    clock = VirtualClock(100.0)
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    flow: FlowController

    def limits(workload_id: str) -> WorkloadLimits:
        if workload_id == "bad" and flow.queued_for(workload_id):
            raise Bomb("limits table mid-reload")
        return WorkloadLimits()

    flow = FlowController(
        WorkloadAwarePolicy(datastore, clock), clock, limits=limits, max_concurrency=1
    )
    first = flow.enqueue(FlowRequest("good", 3))
    held = flow.enqueue(FlowRequest("bad", 3))
    waiting = flow.enqueue(FlowRequest("good", 3))
    first.close()
    assert (held.outcome, waiting.outcome) == (None, Outcome.DISPATCHED)
    waiting.close()
    assert (flow.in_flight, flow.queued) == (0, 1)
