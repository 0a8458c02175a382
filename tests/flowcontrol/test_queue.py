"""The flow controller's outcomes on a virtual clock, including every cancellation path."""

import asyncio
import random

import pytest

from extproc.clock import VirtualClock
from extproc.contracts import QueuedRequest
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policy import FcfsPolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome

A = FlowRequest("a", 3)
B = FlowRequest("b", 3)


def controller(clock: VirtualClock, **kw: object) -> FlowController:
    options: dict[str, object] = {"max_concurrency": 1, "max_queue": 10, "queue_timeout": 30.0}
    options.update(kw)
    return FlowController(FcfsPolicy(), clock, **options)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_free_slot_dispatches_at_once() -> None:
    flow = controller(VirtualClock())
    ticket = flow.enqueue(A)
    assert ticket.outcome is Outcome.DISPATCHED
    assert ticket.wait_time == 0.0
    assert (flow.in_flight, flow.queued) == (1, 0)


def test_completion_dispatches_the_next_request_in_the_same_instant() -> None:
    clock = VirtualClock()
    flow = controller(clock)
    first, second = flow.enqueue(A), flow.enqueue(B)
    assert second.outcome is None
    assert (flow.queued, flow.queued_for("b")) == (1, 1)
    clock.advance(2.5)
    first.close()
    assert second.outcome is Outcome.DISPATCHED
    assert second.wait_time == 2.5  # no tick: released the instant the slot freed
    assert (flow.in_flight, flow.queued, flow.queued_for("b")) == (1, 0, 0)


def test_full_queue_rejects() -> None:
    flow = controller(VirtualClock(), max_queue=2)
    tickets = [flow.enqueue(A) for _ in range(4)]
    assert [t.outcome for t in tickets] == [
        Outcome.DISPATCHED,
        None,
        None,
        Outcome.REJECTED_QUEUE_FULL,
    ]


def test_zero_queue_rejects_whenever_capacity_is_taken() -> None:
    flow = controller(VirtualClock(), max_queue=0)
    assert flow.enqueue(A).outcome is Outcome.DISPATCHED
    assert flow.enqueue(A).outcome is Outcome.REJECTED_QUEUE_FULL


def test_unlimited_capacity_never_queues() -> None:
    flow = controller(VirtualClock(), max_concurrency=0, max_queue=0)
    assert all(flow.enqueue(A).outcome is Outcome.DISPATCHED for _ in range(1000))
    assert flow.in_flight == 1000


def test_queue_timeout_evicts_at_exactly_the_timeout() -> None:
    clock = VirtualClock()
    flow = controller(clock, queue_timeout=5.0)
    flow.enqueue(A)
    waiting = flow.enqueue(B)
    clock.advance(4.999)
    assert waiting.outcome is None
    clock.advance(0.002)
    assert waiting.outcome is Outcome.EVICTED_QUEUE_TIMEOUT
    assert waiting.wait_time == pytest.approx(5.0, abs=1e-9)
    assert flow.queued == 0


def test_dispatched_request_is_not_timed_out_later() -> None:
    clock = VirtualClock()
    flow = controller(clock, queue_timeout=5.0)
    first, second = flow.enqueue(A), flow.enqueue(B)
    first.close()
    clock.advance(60)
    assert second.outcome is Outcome.DISPATCHED


async def test_waiter_learns_its_outcome() -> None:
    clock = VirtualClock()
    flow = controller(clock)
    first = flow.enqueue(A)
    waiter = asyncio.create_task(flow.enqueue_and_wait(B))
    await settle()
    assert not waiter.done()
    clock.advance(1.0)
    first.close()
    ticket = await waiter
    assert ticket.outcome is Outcome.DISPATCHED
    assert ticket.wait_time == 1.0


async def test_client_gone_while_queued_leaves_the_queue_at_once() -> None:
    clock = VirtualClock()
    flow = controller(clock)
    first = flow.enqueue(A)
    second = flow.enqueue(B)
    waiter = asyncio.create_task(second.wait())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert second.outcome is Outcome.EVICTED_CLIENT_GONE
    assert (flow.queued, flow.queued_for("b")) == (0, 0)
    first.close()
    assert flow.in_flight == 0  # the gone request took no slot


async def test_release_and_client_gone_in_the_same_instant_hands_the_slot_on() -> None:
    clock = VirtualClock()
    flow = controller(clock)
    first = flow.enqueue(A)
    racing = flow.enqueue(B)
    third = flow.enqueue(A)
    waiter = asyncio.create_task(racing.wait())
    await settle()
    first.close()  # releases `racing`: its slot is taken, its waiter not yet resumed
    assert racing.outcome is Outcome.DISPATCHED
    waiter.cancel()  # ... and the client goes away before the waiter runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert racing.outcome is Outcome.EVICTED_CLIENT_GONE
    assert third.outcome is Outcome.DISPATCHED  # the slot moved on
    assert flow.in_flight == 1
    racing.close()  # the handler's `finally` must not free the slot twice
    assert flow.in_flight == 1


def test_closing_a_queued_ticket_evicts_it() -> None:
    flow = controller(VirtualClock())
    flow.enqueue(A)
    queued = flow.enqueue(B)
    queued.close()
    assert queued.outcome is Outcome.EVICTED_CLIENT_GONE
    assert flow.queued == 0


def test_close_is_idempotent() -> None:
    flow = controller(VirtualClock(), max_concurrency=2)
    ticket = flow.enqueue(A)
    flow.enqueue(A)
    ticket.close()
    ticket.close()
    assert flow.in_flight == 1


async def test_shutdown_rejects_queued_and_new_requests() -> None:
    flow = controller(VirtualClock())
    running = flow.enqueue(A)
    queued = [flow.enqueue(B) for _ in range(3)]
    waiters = [asyncio.create_task(t.wait()) for t in queued]
    await settle()
    flow.close()
    assert await asyncio.gather(*waiters) == [Outcome.REJECTED_SHUTDOWN] * 3
    assert flow.enqueue(A).outcome is Outcome.REJECTED_SHUTDOWN
    assert running.outcome is Outcome.DISPATCHED  # in flight: left to finish
    running.close()
    assert flow.in_flight == 0


def test_each_criticality_of_a_workload_is_its_own_flow() -> None:
    class CriticalFirst(FcfsPolicy):
        def sort_key(self, item: QueuedRequest) -> tuple[float, ...]:
            return (-item.criticality, item.seq)

    flow = FlowController(CriticalFirst(), VirtualClock(), max_concurrency=1)
    running = flow.enqueue(FlowRequest("a", 1))
    low = flow.enqueue(FlowRequest("a", 1))
    high = flow.enqueue(FlowRequest("a", 5))
    running.close()
    assert high.outcome is Outcome.DISPATCHED  # not stuck behind its own workload's low one
    assert low.outcome is None


def test_observer_sees_every_decision_once() -> None:
    clock = VirtualClock()
    seen: list[Ticket] = []
    flow = FlowController(
        FcfsPolicy(),
        clock,
        max_concurrency=1,
        max_queue=1,
        queue_timeout=1.0,
        on_decided=seen.append,
    )
    first, second, third = flow.enqueue(A), flow.enqueue(A), flow.enqueue(A)
    clock.advance(2.0)
    first.close()
    assert seen == [first, third, second]
    assert [t.outcome for t in seen] == [
        Outcome.DISPATCHED,
        Outcome.REJECTED_QUEUE_FULL,
        Outcome.EVICTED_QUEUE_TIMEOUT,
    ]


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_keep_every_count_balanced(seed: int) -> None:
    """Random enqueues, completions, abandons, timeouts: slots and queue lengths never drift."""
    rng = random.Random(seed)
    clock = VirtualClock()
    flow = controller(
        clock,
        max_concurrency=rng.randint(1, 4),
        max_queue=rng.randint(0, 8),
        queue_timeout=rng.uniform(0.5, 3.0),
    )
    tickets: list[Ticket] = []
    for _ in range(400):
        action = rng.random()
        if action < 0.45:
            tickets.append(flow.enqueue(FlowRequest(rng.choice("abc"), rng.randint(1, 5))))
        elif action < 0.8 and tickets:
            rng.choice(tickets).close()
        else:
            clock.advance(rng.uniform(0, 1))
        live = [t for t in tickets if t._holds_slot]
        assert flow.in_flight == len(live) <= flow.max_concurrency
        assert flow.queued == sum(1 for t in tickets if t.outcome is None) <= flow.max_queue
        assert flow.queued == 0 or flow.in_flight == flow.max_concurrency  # work-conserving
    for ticket in tickets:
        ticket.close()
    assert (flow.in_flight, flow.queued) == (0, 0)
    assert all(t.outcome is not None for t in tickets)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        FlowController(FcfsPolicy(), VirtualClock(), max_queue=-1)
    with pytest.raises(ValueError, match="positive"):
        FlowController(FcfsPolicy(), VirtualClock(), queue_timeout=0)


async def test_wait_for_wakes_when_the_queue_empties() -> None:
    clock = VirtualClock()
    flow = controller(clock)
    running = flow.enqueue(A)
    flow.enqueue(B)
    emptied = asyncio.create_task(flow.wait_for(lambda: flow.queued == 0))
    idle = asyncio.create_task(flow.wait_for(lambda: flow.in_flight == 0))
    await settle()
    assert not emptied.done()
    running.close()  # B is dispatched: the queue is empty, a slot still taken
    await settle()
    assert emptied.done()
    assert not idle.done()
    idle.cancel()
    await settle()
    assert flow._waiters == []


class ScanningFairShare(FairSharePolicy):
    """fair-share with its keys declared unstable: the queue scans every head instead."""

    stable_keys = False


@pytest.mark.parametrize("seed", range(30))
def test_heap_and_scan_dispatch_in_the_same_order(seed: int) -> None:
    """The heap of flow heads must pick exactly what a full scan picks, op for op."""
    dispatched: dict[str, list[int]] = {"heap": [], "scan": []}
    for name, policy in (("heap", FairSharePolicy()), ("scan", ScanningFairShare())):
        rng = random.Random(seed)
        clock = VirtualClock()
        order = dispatched[name]

        def record(ticket: Ticket, order: list[int] = order) -> None:
            if ticket.outcome is Outcome.DISPATCHED:
                order.append(ticket.request.seq)

        flow = FlowController(policy, clock, max_concurrency=3, max_queue=50,
                              queue_timeout=5.0, on_decided=record)  # fmt: skip
        live: list[Ticket] = []
        for _ in range(600):
            action = rng.random()
            if action < 0.5:
                request = FlowRequest(f"w{rng.randrange(8)}", rng.randint(1, 5))
                live.append(flow.enqueue(request))
            elif action < 0.85 and live:
                running = [t for t in live if t.outcome is Outcome.DISPATCHED]
                pool = running if running and rng.random() < 0.8 else live
                ticket = pool[rng.randrange(len(pool))]
                live.remove(ticket)
                ticket.close()
            else:
                clock.advance(rng.uniform(0, 2))
        assert len(flow._heap) <= 4 * len(flow._versions) + 64 + 1
    assert dispatched["heap"] == dispatched["scan"]
    assert len(dispatched["heap"]) > 100


class _Room:
    """A gate whose room grows without a wake-up."""

    name = "room"
    wants_first_byte = False
    limit = 0

    def bind(self, wake: object) -> None:
        pass

    def has_room(self, in_flight: int) -> bool:
        return in_flight < self.limit

    def on_dispatch(self) -> None:
        pass

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        pass

    def on_release(self) -> None:
        pass

    def status(self) -> object:
        return None


def test_a_newcomer_never_passes_the_queue() -> None:
    """#16.2: the fast path is only for an empty queue."""
    gate = _Room()
    flow = FlowController(FcfsPolicy(), VirtualClock(), capacity=gate)  # type: ignore[arg-type]
    first, second = flow.enqueue(A), flow.enqueue(B)
    gate.limit = 1
    third = flow.enqueue(A)
    assert [first.outcome, second.outcome, third.outcome] == [Outcome.DISPATCHED, None, None]
