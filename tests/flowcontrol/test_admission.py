"""Fair admission to a full queue (flowcontrol/admission.py) on a virtual clock: the
stated guarantee as a property, checked at every step against shares computed here."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.clock import VirtualClock
from extproc.flowcontrol.admission import QueueShares, WorkloadLimits
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome

FULL = Outcome.REJECTED_QUEUE_FULL


def controller(
    clock: VirtualClock,
    weights: dict[str, float] | None = None,
    seen: list[Ticket] | None = None,
    **kw: object,
) -> FlowController:
    table = {w: WorkloadLimits(weight=g) for w, g in (weights or {}).items()}
    options: dict[str, object] = {"max_concurrency": 1, "max_queue": 4, "queue_timeout": 30.0}
    options.update(kw)
    return FlowController(
        FairSharePolicy(),
        clock,
        limits=lambda w: table.get(w, WorkloadLimits()),
        on_decided=None if seen is None else seen.append,
        **options,  # type: ignore[arg-type]
    )


def test_the_heaviest_workloads_own_request_is_refused_at_the_door() -> None:
    flow = controller(VirtualClock())
    flow.enqueue(FlowRequest("flood", 3))  # takes the one slot
    queued = [flow.enqueue(FlowRequest("flood", 3)) for _ in range(4)]
    refused = flow.enqueue(FlowRequest("flood", 3))
    assert refused.outcome is FULL
    assert all(t.outcome is None for t in queued)


def test_a_lighter_workload_pushes_out_the_heaviests_newest_request() -> None:
    seen: list[Ticket] = []
    flow = controller(VirtualClock(), seen=seen)
    flow.enqueue(FlowRequest("flood", 3))
    queued = [flow.enqueue(FlowRequest("flood", c)) for c in (3, 5, 1, 3)]
    light = flow.enqueue(FlowRequest("light", 1))
    assert light.outcome is None
    assert [t.outcome for t in queued] == [None, None, None, FULL]  # the newest, any flow
    assert (flow.queued, flow.queued_for("flood"), flow.queued_for("light")) == (4, 3, 1)
    assert Counter(id(t) for t in seen)[id(queued[-1])] == 1


def test_weight_buys_queue_space() -> None:
    # weight 3 against 1: a holds 3 of 4 before b's arrival displaces nothing of it.
    flow = controller(VirtualClock(), weights={"a": 3.0})
    flow.enqueue(FlowRequest("x", 3))
    a = [flow.enqueue(FlowRequest("a", 3)) for _ in range(3)]
    b = flow.enqueue(FlowRequest("b", 3))
    assert b.outcome is None  # queue not full yet
    assert flow.enqueue(FlowRequest("b", 3)).outcome is FULL  # b at 2/1 > a at 3/3
    assert all(t.outcome is None for t in a)


def test_shares_refuse_when_nothing_is_queued_or_the_swap_gains_nothing() -> None:
    shares = QueueShares(lambda _w: 1.0)
    assert shares.give_way("a") is None
    shares.add("a")
    shares.add("a")
    assert shares.give_way("a") is None  # the heaviest itself
    assert shares.give_way("b") == "a"  # (0 + 1) / 1 < 2
    shares.add("b")
    assert shares.give_way("b") is None  # (1 + 1) / 1 = 2: equals do not swap
    assert shares.give_way("c") == "a"
    shares.remove("a")
    assert shares.give_way("c") is None  # a and b at 1: a newcomer would only tie


def test_without_fair_admission_the_light_tenant_is_refused() -> None:
    """Negative control for the scenario below: tail drop refuses the light tenant."""
    light = _flood_and_trickle(fair=False)
    assert light.count(FULL) > len(light) // 2


def test_a_flooder_cannot_keep_a_light_tenant_out() -> None:
    light = _flood_and_trickle(fair=True)
    assert light.count(FULL) == 0
    assert light.count(Outcome.DISPATCHED) == len(light)


def _flood_and_trickle(fair: bool) -> list[Outcome]:
    """The issue's scenario on virtual time: C=2, max_queue=20, a flooder keeping 60
    requests active, a light tenant with one at a time; each request holds 1 s."""
    clock = VirtualClock()

    def on_decided(ticket: Ticket) -> None:
        if ticket.outcome is Outcome.DISPATCHED:
            clock.call_later(1.0, ticket.close)

    flow = FlowController(
        FairSharePolicy(), clock, max_concurrency=2, max_queue=20, queue_timeout=None,
        on_decided=on_decided,
    )  # fmt: skip
    if not fair:
        flow._make_room = lambda _workload_id: False  # type: ignore[method-assign]
    light: list[Ticket] = []
    for _ in range(400):
        active = flow.queued_for("flood") + flow.in_flight_for("flood")
        for _ in range(60 - active):
            flow.enqueue(FlowRequest("flood", 3))
        if (
            not light
            or light[-1].outcome not in (None, Outcome.DISPATCHED)
            or (light[-1].outcome is Outcome.DISPATCHED and not light[-1]._holds_slot)
        ):
            light.append(flow.enqueue(FlowRequest("light", 3)))
        clock.advance(0.1)
    return [t.outcome for t in light if t.outcome is not None]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, float], int, int, list[tuple[str, object]]]:
    names = ["a", "b", "c", "d"]
    weights = {n: draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for n in names}
    max_queue = draw(st.integers(1, 12))
    concurrency = draw(st.integers(1, 3))
    ops = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("enqueue"), st.sampled_from(names)),
                st.tuples(st.just("complete"), st.integers(0, 10)),
                st.tuples(st.just("advance"), st.floats(0.1, 3.0)),
            ),
            max_size=120,
        )
    )
    return weights, max_queue, concurrency, ops


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_a_workload_within_its_weighted_share_is_never_refused(
    scenario: tuple[dict[str, float], int, int, list[tuple[str, object]]],
) -> None:
    weights, max_queue, concurrency, ops = scenario
    clock = VirtualClock()
    seen: list[Ticket] = []
    flow = controller(
        clock,
        weights,
        seen,
        max_concurrency=concurrency,
        max_queue=max_queue,
        queue_timeout=5.0,
    )
    tickets: list[Ticket] = []
    for op, arg in ops:
        if op == "enqueue":
            assert isinstance(arg, str)
            before = {w: flow.queued_for(w) for w in weights}
            backlogged = {w for w, q in before.items() if q} | {arg}
            total_weight = sum(weights[w] for w in backlogged)

            def share(w: str) -> float:
                return max_queue * weights[w] / total_weight  # noqa: B023

            decided_before = len(seen)
            ticket = flow.enqueue(FlowRequest(arg, 3))
            tickets.append(ticket)
            if ticket.outcome is FULL:
                assert sum(before.values()) == max_queue
                assert before[arg] + 1 > share(arg) - 1e-9
            for pushed in seen[decided_before:]:
                if pushed is not ticket:
                    assert pushed.outcome is FULL
                    victim = pushed.request.workload_id
                    assert victim != arg
                    assert before[victim] > share(victim) + 1e-9
        elif op == "complete":
            assert isinstance(arg, int)
            running = [t for t in tickets if t.outcome is Outcome.DISPATCHED and t._holds_slot]
            if running:
                running[arg % len(running)].close()
        else:
            assert isinstance(arg, float)
            clock.advance(arg)
        assert flow.queued <= max_queue
        assert flow.queued == sum(flow.queued_for(w) for w in weights)
        assert flow.queued == sum(t.outcome is None for t in tickets)
        assert flow.in_flight == sum(t._holds_slot for t in tickets)
    for ticket in tickets:
        ticket.close()
    assert (flow.queued, flow.in_flight) == (0, 0)
    assert sorted(Counter(id(t) for t in seen).values()) == [1] * len(tickets)


@pytest.mark.parametrize("policy", [FcfsPolicy(), FairSharePolicy()])
def test_in_flight_cap_holds_a_workload_back_while_others_go(policy: object) -> None:
    table = {"capped": WorkloadLimits(max_in_flight=1, max_queued=2)}
    flow = FlowController(
        policy,  # type: ignore[arg-type]
        VirtualClock(),
        max_concurrency=3,
        max_queue=10,
        limits=lambda w: table.get(w, WorkloadLimits()),
    )
    first = flow.enqueue(FlowRequest("capped", 3))
    held = [flow.enqueue(FlowRequest("capped", 3)) for _ in range(2)]
    over = flow.enqueue(FlowRequest("capped", 3))
    other = flow.enqueue(FlowRequest("other-tenant", 3))
    assert first.outcome is Outcome.DISPATCHED
    assert [t.outcome for t in held] == [None, None]  # room in the gate, but capped
    assert over.outcome is Outcome.REJECTED_WORKLOAD_LIMIT
    assert other.outcome is Outcome.DISPATCHED
    first.close()
    assert [t.outcome for t in held] == [Outcome.DISPATCHED, None]
    assert flow.in_flight_for("capped") == 1
    table["capped"] = WorkloadLimits(max_in_flight=2)
    flow.reconfigure()
    assert held[1].outcome is Outcome.DISPATCHED


def test_shed_below_refuses_low_criticality_only_while_saturated() -> None:
    flow = FlowController(FcfsPolicy(), VirtualClock(), max_concurrency=1, shed_below=3)
    low_first = flow.enqueue(FlowRequest("a", 1))
    assert low_first.outcome is Outcome.DISPATCHED  # room: never shed
    assert flow.enqueue(FlowRequest("a", 2)).outcome is Outcome.REJECTED_SHED
    assert flow.enqueue(FlowRequest("a", 3)).outcome is None
