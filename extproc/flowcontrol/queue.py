"""The flow-control queue: hold requests until there is capacity, release them in policy order.

Algorithm
- Requests are grouped into flows, one per (workload id, criticality); each
  flow is a FIFO, and only flow heads compete. The winner of each dispatch is
  the head with the lowest `policy.sort_key` at that instant:
  - for policies with stable keys (a key changes only in a hook about its
    workload: fcfs, fair-share) each backlogged workload has one heap entry,
    keyed by the best of its (at most five) flow heads, and every hook or
    change of head about a workload re-keys that entry: O(log W) per
    decision, W = backlogged workloads. Superseded entries carry an old
    version and are dropped when they surface;
  - for policies whose keys move with time (workload-aware), every head is
    keyed afresh at every decision: O(F), exact.
  Either way no order is ever read from keys stored at enqueue time.
  A workload at its `max_in_flight` (`admission.WorkloadLimits`) is out of
  the running until one of its requests completes.
- Capacity is a gate (`contracts.Capacity`) consulted before every release:
  a fixed limit C on requests in flight (released, not yet completed), or one
  that follows the backend (`saturation`, `adaptive`). A request is released
  the moment it is enqueued if none is queued and the gate has room (never
  ahead of those waiting), each completion releases
  the next one synchronously, and a gate whose room grows by itself wakes the
  controller: no polling tick, no idle gap. Invariant: the queue holds a
  request only while the gate says no or its workload is at its in-flight cap.
- Limits, checked at the door in this order: nothing could take the request
  now -- the gate says no or (with a pool) no endpoint it may use has room --
  and its criticality is below `shed_below` (shed); the workload already has its
  `max_queued` waiting (workload-limit); `max_queue` requests wait, and
  `admission.QueueShares` picks who gives way (queue-full, for the arrival or
  the heaviest workload's newest request). Each request waits at most
  `queue_timeout` seconds (then: queue-timeout, via a clock timer).

Guarantees
- Every ticket ends in exactly one `Outcome`, and a slot is taken only by a
  DISPATCHED ticket and given back exactly once, by `Ticket.close`.
- Cancellation (the client went away, Envoy reset the stream): the awaiting
  task gets `CancelledError` in `Ticket.wait`. A queued ticket leaves its flow
  at once. A ticket that the queue released in the same instant -- its slot
  taken, but the waiter cancelled before it could resume -- is turned into
  EVICTED_CLIENT_GONE and its slot handed to the next request, so the race
  loses no capacity and dispatches nothing to a dead stream.

Endpoints (when the controller has a `contracts.EndpointPool`)
- Release rule: a request is released when the gate has room AND some
  endpoint it may use (its subset hint, else the whole pool) has room -- the
  pool's per-endpoint saturation below 1 and in flight below the per-endpoint
  ceiling. The policy decides WHICH request: among the flow heads that can be
  placed now, the one it ranks first; then the pool decides WHERE (late
  binding: the endpoint is chosen at release, from the state of that moment).
- A head whose allowed endpoints are all full is skipped, keeping its key and
  its place. Requests of other flows pass it. But it does block the later
  requests of its own flow (same workload, same criticality), even those
  whose subset hints name endpoints with room: a flow is FIFO -- only its
  head competes, which keeps each decision O(log W) and a workload's requests
  of one criticality in arrival order -- so nothing behind the head is
  looked at until the head goes (released, timed out, or gone). A workload
  that sends requests pinned to different endpoints at one criticality
  should expect that head-of-line wait. Invariant: the queue holds no head
  that could be placed now.
- Fairness: without subset hints every head may use every endpoint, so the
  order is exactly the policy's. With them, the policy's order holds among
  the requests that can be placed at each instant; a skipped head goes first
  the moment one of its endpoints has room, ahead of any request it ranks
  before. Cost: O(log W) per decision plus O(log W) per skipped workload;
  while no endpoint at all has room, one O(endpoints) check and no walk.
- A request with no eligible endpoint (empty subset, none of its endpoints
  ready, none ready at all) is answered REJECTED_NO_ENDPOINT at enqueue, and
  queued ones when the pool's membership changes so that none is left.

Hooks that raise (a policy's, the admission limits', the gate's, the pool's)
- A hook that raises while a request is admitted or released refuses THAT
  request (REJECTED_INTERNAL, `Ticket.detail` naming the hook), undoes what it
  had taken -- hooks are atomic: one that raises has changed nothing -- and
  logs the error; the others are served as if it had never come. A hook that
  raises later (completion, usage, first byte, move) is logged and skipped, and
  the slot is given back all the same: an error never surfaces in another
  request's completion, and a queue timer never raises. Releasing runs inside
  those completions and callbacks: a queued head whose pool read (`has_room`)
  raises is refused; another read that raises (the gate's, the limits') is
  logged and releasing resumes at the next completion or wake; re-keying a
  workload whose limits raise leaves it out of the running, tried again at each
  of those (logged once until it reads), and at weight 1 in the queue shares.
  `sort_key` must not raise (it is a read of the policy's own state).

Concurrency: single-threaded, on the event loop that owns the controller;
only the policy's metric reads reach across threads (through the registry).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from extproc.capacity.static import StaticCapacity
from extproc.contracts import (
    Capacity,
    Clock,
    EndpointPool,
    PickRequest,
    Policy,
    QueuedRequest,
    TimerHandle,
    TokenCount,
)
from extproc.flowcontrol.admission import NO_LIMITS, QueueShares, WorkloadLimits
from extproc.outcomes import Outcome

FlowKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class FlowRequest:
    workload_id: str
    criticality: int
    pick: PickRequest | None = None
    """What the endpoint picker may use; ignored without an endpoint pool."""
    tokens: TokenCount | None = None
    """The request's estimated tokens, for fair-share's `tokens` cost."""


class _HeadFailed(Exception):
    """The pool raised on a queued head's pick: that head is refused."""

    def __init__(self, ticket: Ticket, error: Exception) -> None:
        super().__init__(ticket, error)
        self.ticket = ticket
        self.error = error


class Ticket:
    """One request's passage through the queue."""

    __slots__ = (
        "_controller",
        "_endpoint",
        "_future",
        "_holds_slot",
        "_sampled",
        "_timer",
        "detail",
        "endpoints",
        "outcome",
        "pick",
        "request",
        "wait_time",
    )

    def __init__(
        self, controller: FlowController, request: QueuedRequest, pick: PickRequest | None = None
    ) -> None:
        self._controller = controller
        self.request = request
        self.pick = pick
        self.outcome: Outcome | None = None
        self.wait_time = 0.0
        """Seconds from enqueue until the outcome was decided."""
        self.endpoints: tuple[str, ...] = ()
        """With an endpoint pool, once dispatched: "ip:port", primary first, then fallbacks."""
        self.detail = ""
        """Why the outcome, when there is more to say (which endpoints were missing)."""
        self._endpoint: str | None = None
        """The endpoint this request's in-flight count is accounted to."""
        self._holds_slot = False
        self._sampled = False
        self._future: asyncio.Future[Outcome] | None = None
        self._timer: TimerHandle | None = None

    def first_byte(self) -> None:
        """The backend began to answer: report dispatch-to-first-byte latency, once."""
        if self._holds_slot and not self._sampled:
            self._sampled = True
            self._controller._first_byte(self)

    def usage(self, tokens: TokenCount | None) -> None:
        """The response completed and reported `tokens` used (None: it reported none).

        Call at most once, before `close`; ignored unless the request holds a slot."""
        if self._holds_slot:
            controller = self._controller
            controller._quietly(
                "policy.on_usage", self, controller._policy.on_usage, self.request, tokens
            )

    def served(self, address: str) -> None:
        """The data plane says `address` served the request: account it there from now on.

        Idempotent; an address the pool does not know is ignored."""
        current = self._endpoint
        if self._holds_slot and current is not None and address != current:
            controller = self._controller
            pool = controller.pool
            assert pool is not None
            try:
                moved = pool.move(current, address, self._sampled)
            except Exception as error:
                controller._failed("pool.move", self, error)
                return
            if moved:
                self._endpoint = address
                controller.wake()  # the endpoint it left has room for another

    async def wait(self) -> Outcome:
        """The outcome, once decided. Cancelling the caller abandons the ticket."""
        if self.outcome is not None:
            return self.outcome
        self._future = asyncio.get_running_loop().create_future()
        try:
            return await self._future
        except asyncio.CancelledError:
            if self.outcome is Outcome.DISPATCHED:
                # Released in the very instant the caller was cancelled: nobody will
                # forward the request, so it counts as gone and its slot moves on.
                self.outcome = Outcome.EVICTED_CLIENT_GONE
            self.close()
            raise

    def close(self) -> None:
        """The request is over: leave the queue if still in it, give back its slot if held.

        Idempotent; call it once the response completed or the stream ended.
        """
        if self.outcome is None:
            self._controller._evict(self, Outcome.EVICTED_CLIENT_GONE)
        if self._holds_slot:
            self._holds_slot = False
            self._controller._free_slot(self)

    def _decide(self, outcome: Outcome, now: float) -> None:
        self.outcome = outcome
        self.wait_time = now - self.request.enqueued_at
        self._holds_slot = outcome is Outcome.DISPATCHED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._future is not None and not self._future.done():
            self._future.set_result(outcome)
        if self._controller.on_decided is not None:
            self._controller.on_decided(self)


class FlowController:
    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        *,
        max_concurrency: int = 0,
        capacity: Capacity | None = None,
        max_queue: int = 10_000,
        queue_timeout: float | None = 30.0,
        pool: EndpointPool | None = None,
        on_decided: Callable[[Ticket], None] | None = None,
        on_pick: Callable[[float], None] | None = None,
        limits: Callable[[str], WorkloadLimits] | None = None,
        shed_below: int = 0,
    ) -> None:
        if max_concurrency < 0 or max_queue < 0:
            raise ValueError("max_concurrency and max_queue must be >= 0")
        if queue_timeout is not None and queue_timeout <= 0:
            raise ValueError("queue_timeout must be positive")
        self._policy = policy
        self._clock = clock
        self.capacity: Capacity = capacity or StaticCapacity(max_concurrency)
        self.capacity.bind(self.wake)
        self.pool = pool
        """Where released requests go; None: Envoy's own load balancing decides."""
        if pool is not None:
            pool.bind(self.wake, self._endpoints_changed)
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.on_decided = on_decided
        """Observer called synchronously the moment each ticket's outcome is decided."""
        self.on_pick = on_pick
        """Observer of the seconds each dispatch decision took (wall clock, not `clock`)."""
        self._limits = limits or (lambda _workload_id: NO_LIMITS)
        self.shed_below = shed_below
        """While nothing could take a request now (the gate says no, or no endpoint it may
        use has room), refuse criticalities below this at once (shed)."""
        self._flows: dict[FlowKey, OrderedDict[int, Ticket]] = {}
        self._criticalities: dict[str, set[int]] = {}
        """The criticalities of each workload's non-empty flows."""
        self._heap: list[tuple[tuple[float, ...], int, FlowKey]] = []
        self._versions: dict[str, int] = {}
        """The version of each backlogged workload's one live heap entry."""
        self._unreadable: set[str] = set()
        """Workloads out of the running because their limits raised: re-keyed at every
        dispatch round until the read works (the failure is logged once)."""
        self._version = itertools.count()
        self._shares = QueueShares(self._weight_of)
        self._queued = 0
        self._in_flight = 0
        self._running: dict[str, int] = {}
        """Requests in flight, by workload (for `max_in_flight`)."""
        self._seq = itertools.count()
        self._accepting = True
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._log = structlog.get_logger("extproc.flow")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_concurrency(self) -> int:
        """The in-flight limit in force now; 0 means none."""
        return self.capacity.status().limit

    @property
    def queued(self) -> int:
        return self._queued

    def queued_for(self, workload_id: str) -> int:
        return self._shares.count(workload_id)

    def in_flight_for(self, workload_id: str) -> int:
        return self._running.get(workload_id, 0)

    def enqueue(self, request: FlowRequest) -> Ticket:
        """Admit a request; its ticket is decided at once when a slot is free or the queue full."""
        now = self._clock.now()
        ticket = Ticket(
            self,
            QueuedRequest(
                request.workload_id, request.criticality, now, next(self._seq), request.tokens
            ),
            request.pick,
        )
        workload_id = request.workload_id
        try:  # reads only: a hook that raises here has nothing to give back
            limits = self._limits(workload_id)
            room = self._has_free_slot()
            missing = None if self.pool is None else self.pool.ineligible(request.pick)
            at_once = (
                not self._queued
                and room
                and self._under_cap(workload_id, limits)
                and self._placeable(ticket)
            )
            # Shed when nothing could take it now: the gate, or (pool) every endpoint.
            shed = request.criticality < self.shed_below and not (room and self._placeable(ticket))
        except Exception as error:
            self._refuse(ticket, "admission", error, now)
            return ticket
        if not self._accepting:
            ticket._decide(Outcome.REJECTED_SHUTDOWN, now)
        elif missing is not None:
            ticket.detail = missing
            ticket._decide(Outcome.REJECTED_NO_ENDPOINT, now)
        elif at_once:
            if self._enter_policy(ticket, now):
                self._take_slot(ticket, now)
        elif shed:
            ticket._decide(Outcome.REJECTED_SHED, now)
        elif limits.max_queued is not None and self.queued_for(workload_id) >= limits.max_queued:
            ticket._decide(Outcome.REJECTED_WORKLOAD_LIMIT, now)
        elif self._queued >= self.max_queue and not self._make_room(workload_id):
            ticket._decide(Outcome.REJECTED_QUEUE_FULL, now)
        elif self._enter_policy(ticket, now):
            self._push(ticket)
            # Those queued go first, in policy order, should the gate have room.
            self._dispatch_ready()
        return ticket

    def _enter_policy(self, ticket: Ticket, now: float) -> bool:
        """`policy.on_enqueue`; False when it raised and the ticket was refused."""
        try:
            self._policy.on_enqueue(ticket.request)
        except Exception as error:
            self._refuse(ticket, "policy.on_enqueue", error, now)
            return False
        return True

    def _refuse(self, ticket: Ticket, hook: str, error: Exception, now: float) -> None:
        """A hook raised on this request, which holds nothing: refuse it, 500."""
        self._failed(hook, ticket, error)
        ticket.endpoints = ()
        ticket._endpoint = None
        ticket.detail = f"{hook} raised {type(error).__name__}"
        ticket._decide(Outcome.REJECTED_INTERNAL, now)

    def _failed(self, hook: str, ticket: Ticket, error: Exception) -> None:
        self._hook_failed(hook, ticket.request.workload_id, error)

    def _hook_failed(self, hook: str, workload_id: str, error: Exception) -> None:
        self._log.error(
            "flow-control hook failed",
            hook=hook,
            workload=workload_id,
            error=f"{type(error).__name__}: {error}"[:500],
            exc_info=error,
        )

    def _quietly(
        self, hook: str, ticket: Ticket, call: Callable[..., object], *args: object
    ) -> None:
        """Run a hook about `ticket` whose failure must not stop the caller: log it."""
        try:
            call(*args)
        except Exception as error:
            self._failed(hook, ticket, error)

    def _make_room(self, workload_id: str) -> bool:
        """Push out the newest request of the workload that gives way, if one does."""
        heaviest = self._shares.give_way(workload_id)
        if heaviest is None:
            return False
        newest = max(
            (
                next(reversed(self._flows[(heaviest, c)].values()))
                for c in self._criticalities[heaviest]
            ),
            key=lambda ticket: ticket.request.seq,
        )
        self._evict(newest, Outcome.REJECTED_QUEUE_FULL)
        return True

    def reconfigure(self) -> None:
        """The workload limits changed: re-weigh the shares, re-admit workloads below a cap."""
        self._shares.reweigh()
        for workload_id in list(self._criticalities):
            self._rekey(workload_id)
        self.wake()

    async def enqueue_and_wait(self, request: FlowRequest) -> Ticket:
        """Enqueue and wait for the outcome; `close` the ticket when the request is over."""
        ticket = self.enqueue(request)
        await ticket.wait()
        return ticket

    def forget(self, workload_id: str) -> None:
        """The registry forgot this idle workload: so does the policy."""
        self._policy.forget(workload_id)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, re-checked whenever the queue or a slot changes."""
        if condition():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((condition, future))
        try:
            await future
        finally:
            self._waiters = [(c, f) for c, f in self._waiters if f is not future]

    def _notify(self) -> None:
        # Called only once an operation has finished, never from a state in between.
        for condition, future in self._waiters:
            if not future.done() and condition():
                future.set_result(None)

    def stop_accepting(self) -> None:
        """Refuse new requests (REJECTED_SHUTDOWN); those queued keep being dispatched."""
        self._accepting = False

    def close(self) -> None:
        """Refuse new requests and reject every queued one with REJECTED_SHUTDOWN."""
        self._accepting = False
        for flow in list(self._flows.values()):
            for ticket in list(flow.values()):
                self._evict(ticket, Outcome.REJECTED_SHUTDOWN)

    def _push(self, ticket: Ticket) -> None:
        request = ticket.request
        key = (request.workload_id, request.criticality)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = OrderedDict()
            self._criticalities.setdefault(request.workload_id, set()).add(request.criticality)
        flow[request.seq] = ticket
        self._queued += 1
        self._shares.add(request.workload_id)
        self._rekey(request.workload_id)
        if self.queue_timeout is not None:
            ticket._timer = self._clock.call_later(self.queue_timeout, lambda: self._expire(ticket))

    def _expire(self, ticket: Ticket) -> None:
        """The queue timeout: a clock callback, which must never raise."""
        try:
            self._evict(ticket, Outcome.EVICTED_QUEUE_TIMEOUT)
        except Exception as error:
            self._failed("queue-timeout", ticket, error)

    def _remove(self, ticket: Ticket) -> None:
        request = ticket.request
        key = (request.workload_id, request.criticality)
        flow = self._flows[key]
        del flow[request.seq]
        if not flow:
            del self._flows[key]
            criticalities = self._criticalities[request.workload_id]
            criticalities.discard(request.criticality)
            if not criticalities:
                del self._criticalities[request.workload_id]
                self._versions.pop(request.workload_id, None)
        self._queued -= 1
        self._shares.remove(request.workload_id)

    def wake(self) -> None:
        """The gate may have room without a completion: dispatch what it allows."""
        if self._flows:
            self._dispatch_ready()
            if self._waiters:
                self._notify()

    def _endpoints_changed(self) -> None:
        """The pool's membership changed: answer queued requests left with no endpoint."""
        pool = self.pool
        assert pool is not None
        for flow in list(self._flows.values()):
            for ticket in list(flow.values()):
                missing = pool.ineligible(ticket.pick)
                if missing is not None:
                    ticket.detail = missing
                    self._evict(ticket, Outcome.REJECTED_NO_ENDPOINT)
        self.wake()

    def _has_free_slot(self) -> bool:
        return self.capacity.has_room(self._in_flight)

    def _under_cap(self, workload_id: str, limits: WorkloadLimits) -> bool:
        cap = limits.max_in_flight
        return cap is None or self.in_flight_for(workload_id) < cap

    def _placeable(self, ticket: Ticket) -> bool:
        return self.pool is None or self.pool.has_room(ticket.pick)

    def _take_slot(self, ticket: Ticket, now: float) -> None:
        """Dispatch `ticket` (already out of the queue, known to the policy). A hook that
        raises refuses it instead, every step before it undone in reverse."""
        request, pool = ticket.request, self.pool
        hook = "policy.on_dispatch"
        undo: list[tuple[str, Callable[..., object], tuple[object, ...]]] = []
        try:
            self._policy.on_dispatch(request)
            undo.append(("policy.on_undispatch", self._policy.on_undispatch, (request,)))
            if pool is not None:
                hook = "pool.pick"
                ticket.endpoints = pool.pick(ticket.pick)
                ticket._endpoint = ticket.endpoints[0]
                undo.append(("pool.on_release", pool.on_release, (ticket._endpoint, False)))
            hook = "capacity.on_dispatch"
            self.capacity.on_dispatch()
        except Exception as error:
            if not undo:  # it left the queue without a slot, as an eviction does
                undo.append(("policy.on_done", self._policy.on_done, (request, None)))
            for step, call, args in reversed(undo):
                self._quietly(step, ticket, call, *args)
            self._refuse(ticket, hook, error, now)
            return
        self._in_flight += 1
        workload_id = request.workload_id
        self._running[workload_id] = self.in_flight_for(workload_id) + 1
        ticket._decide(Outcome.DISPATCHED, now)

    def _first_byte(self, ticket: Ticket) -> None:
        dispatched_at = ticket.request.enqueued_at + ticket.wait_time
        seconds = self._clock.now() - dispatched_at
        # Each counts the first byte on its own: one that raised must not skip the other.
        self._quietly(
            "capacity.on_latency", ticket, self.capacity.on_latency, seconds, dispatched_at
        )
        if self.pool is not None and ticket._endpoint is not None:
            self._quietly(
                "pool.on_first_byte", ticket, self.pool.on_first_byte, ticket._endpoint, seconds
            )

    def _free_slot(self, ticket: Ticket) -> None:
        self._in_flight -= 1
        workload_id = ticket.request.workload_id
        left = self._running[workload_id] - 1
        if left:
            self._running[workload_id] = left
        else:
            del self._running[workload_id]
        self._quietly("capacity.on_release", ticket, self.capacity.on_release, ticket._sampled)
        if self.pool is not None and ticket._endpoint is not None:
            self._quietly(
                "pool.on_release", ticket, self.pool.on_release, ticket._endpoint, ticket._sampled
            )
        dispatched_at = ticket.request.enqueued_at + ticket.wait_time
        seconds = self._clock.now() - dispatched_at
        self._quietly("policy.on_done", ticket, self._policy.on_done, ticket.request, seconds)
        self._rekey(ticket.request.workload_id)
        self._dispatch_ready()
        if self._waiters:
            self._notify()

    def _dispatch_ready(self) -> None:
        """Release what the gate allows. It runs inside other requests' completions and
        the gate's, the pool's and the clock's callbacks, so nothing may escape it: a
        queued head whose pool read raises is refused; any other read that raises is
        logged, and releasing resumes at the next completion or wake."""
        try:
            self._release_ready()
        except Exception as error:
            self._log.error(
                "flow-control dispatch failed",
                error=f"{type(error).__name__}: {error}"[:500],
                exc_info=error,
            )

    def _release_ready(self) -> None:
        for workload_id in list(self._unreadable):
            if workload_id in self._criticalities:
                self._rekey(workload_id)
            else:  # nothing of it queued any more
                self._unreadable.discard(workload_id)
        while self._flows and self._has_free_slot():
            started = time.perf_counter()
            try:
                ticket = self._pick() if self.pool is None else self._pick_placeable()
            except _HeadFailed as failed:
                self._leave(failed.ticket)
                self._refuse(failed.ticket, "pool.has_room", failed.error, self._clock.now())
                continue
            if ticket is None:
                return  # every head waits for an endpoint of its own or its workload's cap
            if self.on_pick is not None:
                self.on_pick(time.perf_counter() - started)
            self._remove(ticket)
            self._take_slot(ticket, self._clock.now())
            self._rekey(ticket.request.workload_id)

    def _pick(self) -> Ticket | None:
        if not self._policy.stable_keys:
            heads = (
                next(iter(flow.values()))
                for (workload_id, _), flow in self._flows.items()
                if self._readably_under_cap(workload_id)
            )
            return min(heads, key=lambda head: self._policy.sort_key(head.request), default=None)
        while self._heap:
            _, version, key = self._heap[0]
            if self._versions.get(key[0]) == version:
                return next(iter(self._flows[key].values()))
            heapq.heappop(self._heap)
        return None

    def _pick_placeable(self) -> Ticket | None:
        """The policy's first flow head that some allowed endpoint has room for."""
        assert self.pool is not None
        if not self.pool.has_room(None):
            return None  # no endpoint has room, so no subset has: skip the walk
        if not self._policy.stable_keys:
            heads = [
                next(iter(flow.values()))
                for (workload_id, _), flow in self._flows.items()
                if self._readably_under_cap(workload_id)
            ]
            placeable = [head for head in heads if self._fits(head)]
            if not placeable:
                return None
            return min(placeable, key=lambda head: self._policy.sort_key(head.request))
        skipped: list[tuple[tuple[float, ...], int, FlowKey]] = []
        found: Ticket | None = None
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                workload_id = entry[2][0]
                if self._versions.get(workload_id) != entry[1]:
                    continue  # superseded
                skipped.append(entry)  # live: it goes back whatever happens
                found = self._best_placeable_head(workload_id)
                if found is not None:
                    break
        finally:
            for entry in skipped:
                heapq.heappush(self._heap, entry)
        return found

    def _best_placeable_head(self, workload_id: str) -> Ticket | None:
        """This workload's best flow head that can be placed (usually its only flow)."""
        heads = [
            next(iter(self._flows[(workload_id, criticality)].values()))
            for criticality in self._criticalities[workload_id]
        ]
        placeable = [head for head in heads if self._fits(head)]
        if not placeable:
            return None
        return min(placeable, key=lambda head: self._policy.sort_key(head.request))

    def _fits(self, head: Ticket) -> bool:
        """`_placeable` for a queued head; raises _HeadFailed when the pool raised."""
        try:
            return self._placeable(head)
        except Exception as error:
            raise _HeadFailed(head, error) from error

    def _rekey(self, workload_id: str) -> None:
        """Re-enter this workload in the heap at the key of its best flow head."""
        criticalities = self._criticalities.get(workload_id)
        if not self._policy.stable_keys or not criticalities:
            return
        if not self._readably_under_cap(workload_id):
            self._versions.pop(workload_id, None)  # out of the running until a completion
            return
        best: tuple[tuple[float, ...], FlowKey] | None = None
        for criticality in criticalities:
            flow_key = (workload_id, criticality)
            head = next(iter(self._flows[flow_key].values()))
            sort_key = self._policy.sort_key(head.request)
            if best is None or sort_key < best[0]:
                best = (sort_key, flow_key)
        assert best is not None
        version = self._versions[workload_id] = next(self._version)
        heapq.heappush(self._heap, (best[0], version, best[1]))
        if len(self._heap) > 4 * len(self._versions) + 64:
            self._compact()

    # Re-keying, here and in the queue shares, runs inside enqueue after the request
    # joined, inside completions and inside queue timers, where nothing may escape:
    # a limits read that raises there is logged once and answered as below.

    def _readably_under_cap(self, workload_id: str) -> bool:
        """`_under_cap`; False when the limits raised: the workload waits out of the
        running, and every dispatch round tries it again."""
        try:
            under_cap = self._under_cap(workload_id, self._limits(workload_id))
        except Exception as error:
            self._limits_unreadable(workload_id, error)
            return False
        self._unreadable.discard(workload_id)
        return under_cap

    def _weight_of(self, workload_id: str) -> float:
        """Its weight in the queue shares; the default 1 when the limits raised."""
        try:
            return self._limits(workload_id).weight or 1.0
        except Exception as error:
            self._limits_unreadable(workload_id, error)
            return 1.0

    def _limits_unreadable(self, workload_id: str, error: Exception) -> None:
        if workload_id not in self._unreadable:  # once, not at every dispatch round
            self._unreadable.add(workload_id)
            self._hook_failed("limits", workload_id, error)

    def _compact(self) -> None:
        """Drop superseded entries, so the heap stays proportional to the workloads."""
        self._heap = [e for e in self._heap if self._versions.get(e[2][0]) == e[1]]
        heapq.heapify(self._heap)

    def _leave(self, ticket: Ticket) -> None:
        """Take a queued ticket out, unserved."""
        self._remove(ticket)
        self._quietly("policy.on_done", ticket, self._policy.on_done, ticket.request, None)
        self._rekey(ticket.request.workload_id)

    def _evict(self, ticket: Ticket, outcome: Outcome) -> None:
        if ticket.outcome is None:
            self._leave(ticket)
            ticket._decide(outcome, self._clock.now())
            if self.pool is not None and self._accepting:
                # The flow's next request may be allowed endpoints its old head was not.
                self._dispatch_ready()
            if self._waiters:
                self._notify()
