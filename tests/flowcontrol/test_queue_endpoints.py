"""The flow controller with an endpoint pool: late binding, the release rule, the 503."""

from __future__ import annotations

import random

import pytest

from extproc.clock import VirtualClock
from extproc.contracts import PickRequest
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome, rejection_for
from tests.pool.support import feed, make_pool

E1, E2, E3 = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def only(*addresses: str) -> PickRequest:
    return PickRequest(subset=frozenset(addresses))


def test_without_a_pool_tickets_name_no_endpoint() -> None:
    flow = FlowController(FcfsPolicy(), VirtualClock(), max_concurrency=1)
    ticket = flow.enqueue(FlowRequest("a", 3))
    assert ticket.outcome is Outcome.DISPATCHED
    assert ticket.endpoints == ()
    ticket.served(E1)  # ignored: no pool
    ticket.close()
    assert flow.in_flight == 0


def test_dispatch_names_the_primary_alone_by_default() -> None:
    # ORIGINAL_DST, as InferencePool gateways route, parses one ip:port, not a list.
    clock = VirtualClock()
    flow = FlowController(FcfsPolicy(), clock, pool=make_pool(clock, [E1, E2, E3]))
    ticket = flow.enqueue(FlowRequest("a", 3))
    assert ticket.outcome is Outcome.DISPATCHED
    assert len(ticket.endpoints) == 1
    ticket.close()


@pytest.mark.parametrize("fallbacks", [1, 2, 5])
def test_dispatch_names_a_primary_and_the_fallbacks_asked_for_and_charges_the_primary(
    fallbacks: int,
) -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2, E3], max_in_flight=2, fallbacks=fallbacks)
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    ticket = flow.enqueue(FlowRequest("a", 3))
    assert ticket.outcome is Outcome.DISPATCHED
    assert len(ticket.endpoints) == min(fallbacks + 1, 3)
    assert len(set(ticket.endpoints)) == len(ticket.endpoints)
    primary = pool.endpoint(ticket.endpoints[0])
    assert primary is not None
    assert primary.in_flight == 1
    ticket.close()
    ticket.close()
    assert primary.in_flight == 0


def test_served_moves_the_count_once_and_ignores_unknown_addresses() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    ticket = flow.enqueue(FlowRequest("a", 3, only(E1)))
    assert ticket.endpoints[0] == E1
    ticket.served("10.9.9.9:1")
    ticket.served(E2)
    ticket.served(E2)
    counts = {a: pool.endpoint(a).in_flight for a in (E1, E2)}  # type: ignore[union-attr]
    assert counts == {E1: 0, E2: 1}
    ticket.close()
    ticket.served(E1)  # after the end: nothing to move
    counts = {a: pool.endpoint(a).in_flight for a in (E1, E2)}  # type: ignore[union-attr]
    assert counts == {E1: 0, E2: 0}


def test_no_eligible_endpoint_is_a_503_decided_at_enqueue() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    empty = flow.enqueue(FlowRequest("a", 3, only()))
    unknown = flow.enqueue(FlowRequest("a", 3, only("10.9.9.9:1")))
    assert empty.outcome is unknown.outcome is Outcome.REJECTED_NO_ENDPOINT
    assert "no endpoint" in empty.detail
    assert "subset" in unknown.detail
    rejection = rejection_for(Outcome.REJECTED_NO_ENDPOINT, detail=unknown.detail)
    assert rejection.status == 503
    assert rejection.content_type == "application/json"
    assert unknown.detail.encode() in rejection.body
    pool.update("static", {E1: False, E2: False})
    nobody = flow.enqueue(FlowRequest("a", 3))
    assert nobody.outcome is Outcome.REJECTED_NO_ENDPOINT
    assert "no endpoint of the pool is ready" in nobody.detail
    assert (flow.in_flight, flow.queued) == (0, 0)


def test_a_full_endpoint_gets_nothing_new_and_the_request_waits_for_room() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    feed(pool, clock, E1, waiting=5)  # saturated: 5 / 5
    feed(pool, clock, E2, waiting=4)  # one more request fills it (credit)
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    first = flow.enqueue(FlowRequest("a", 3))
    second = flow.enqueue(FlowRequest("a", 3))
    assert first.outcome is Outcome.DISPATCHED
    assert first.endpoints[0] == E2
    assert second.outcome is None
    clock.advance(0.5)
    feed(pool, clock, E1, waiting=2)  # a scrape shows room: dispatched at once
    assert second.outcome is Outcome.DISPATCHED
    assert second.endpoints[0] == E1
    assert second.wait_time == 0.5


def test_a_blocked_head_does_not_block_requests_that_can_go_elsewhere() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], max_in_flight=1)
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    busy = flow.enqueue(FlowRequest("a", 3, only(E1)))
    blocked = flow.enqueue(FlowRequest("a", 3, only(E1)))  # E1 full: waits
    other = flow.enqueue(FlowRequest("b", 3, only(E2)))
    assert busy.outcome is other.outcome is Outcome.DISPATCHED
    assert blocked.outcome is None
    assert other.endpoints[0] == E2
    later = flow.enqueue(FlowRequest("c", 3, only(E1)))
    other.close()  # room on E2 only: neither E1 request may take it
    assert blocked.outcome is None
    assert later.outcome is None
    busy.close()  # room on E1: the earlier of the two goes first
    assert blocked.outcome is Outcome.DISPATCHED
    assert later.outcome is None
    blocked.close()
    assert later.outcome is Outcome.DISPATCHED


def test_stable_key_policy_skips_blocked_workloads_and_keeps_their_place() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], max_in_flight=1)
    policy = FairSharePolicy()
    flow = FlowController(policy, clock, pool=pool)
    holders = [flow.enqueue(FlowRequest(w, 3, only(e))) for w, e in (("a", E1), ("b", E2))]
    assert all(t.outcome is Outcome.DISPATCHED for t in holders)
    wants_e1 = flow.enqueue(FlowRequest("c", 3, only(E1)))
    wants_e2 = flow.enqueue(FlowRequest("d", 3, only(E2)))
    clock.advance(1.0)
    holders[1].close()  # E2 frees: d goes though c may rank first
    assert wants_e2.outcome is Outcome.DISPATCHED
    assert wants_e1.outcome is None
    holders[0].close()
    assert wants_e1.outcome is Outcome.DISPATCHED
    assert (flow.queued, flow.in_flight) == (0, 2)


def test_queued_requests_get_503_when_their_endpoints_go_away() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], max_in_flight=1)
    flow = FlowController(FcfsPolicy(), clock, pool=pool)
    running = [flow.enqueue(FlowRequest("a", 3)) for _ in range(2)]
    queued = flow.enqueue(FlowRequest("a", 3))
    assert queued.outcome is None
    pool.update("static", {})  # every endpoint gone
    assert queued.outcome is Outcome.REJECTED_NO_ENDPOINT
    for ticket in running:
        ticket.close()  # counts given back although the endpoints left
    assert (flow.in_flight, flow.queued) == (0, 0)
    assert pool.addresses == []
    assert pool.endpoint(E1) is None


@pytest.mark.parametrize("policy", ["fcfs", "fair-share"])
@pytest.mark.parametrize("seed", range(20))
def test_release_rule_invariants_under_random_operations(policy: str, seed: int) -> None:
    """Random arrivals (subset hints included), completions, served reports, scrapes,
    readiness flips and timeouts; after every step: no queued head could be placed,
    each endpoint's count is its requests, the ceiling holds, every ticket ends once."""
    rng = random.Random(seed)
    clock = VirtualClock()
    addresses = [E1, E2, E3]
    pool = make_pool(clock, addresses, max_in_flight=2, seed=seed)
    made = FairSharePolicy() if policy == "fair-share" else FcfsPolicy()
    flow = FlowController(made, clock, pool=pool, max_queue=50, queue_timeout=5.0)
    tickets: list[Ticket] = []
    ready = dict.fromkeys(addresses, True)

    def check() -> None:
        for queued in flow._flows.values():
            head = next(iter(queued.values()))
            assert not pool.has_room(head.pick), "a head that could go is held"
        live = [t for t in tickets if t._holds_slot]
        assert flow.in_flight == len(live)
        for address in addresses:
            endpoint = pool.endpoint(address)
            mine = sum(t._endpoint == address for t in live)
            assert (endpoint.in_flight if endpoint else 0) == mine
        assert all(t.outcome is None or t.outcome in Outcome for t in tickets)

    for _ in range(400):
        action = rng.random()
        if action < 0.45:
            subset = None
            if rng.random() < 0.5:
                subset = frozenset(rng.sample(addresses, rng.randint(0, 2)))
            pick = PickRequest(prompt="p" * rng.randint(0, 300), subset=subset)
            tickets.append(flow.enqueue(FlowRequest(rng.choice("abc"), 3, pick)))
        elif action < 0.7:
            live = [t for t in tickets if t._holds_slot]
            if live:
                rng.choice(live).close()
        elif action < 0.75:
            live = [t for t in tickets if t._holds_slot]
            if live:
                rng.choice(live).served(rng.choice([*addresses, "10.9.9.9:1"]))
        elif action < 0.85:
            feed(pool, clock, rng.choice(addresses), waiting=rng.choice([0, 0, 2, 6]))
        elif action < 0.9:
            address = rng.choice(addresses)
            ready[address] = not ready[address]
            pool.update("static", ready)
        else:
            clock.advance(rng.uniform(0.1, 2.0))
        check()
    for ticket in tickets:
        ticket.close()
    check()
    assert (flow.in_flight, flow.queued) == (0, 0)
    decided = [t.outcome for t in tickets]
    assert None not in decided
    assert Outcome.REJECTED_NO_ENDPOINT in decided
