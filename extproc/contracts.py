"""The contracts the rest of the service depends on.

Implementations live in their own modules (`clock`, `registry`, `datastore`,
`policy`, `queue`); everything here is either a Protocol or a frozen value
that crosses a module boundary. Dependencies point one way: implementations
import this module, never the reverse.

The data path, top to bottom::

    server (one ext_proc stream per HTTP request)
      -> Datastore          the three tracking points and the metric reads
           -> WorkloadRegistry   per-workload counters, returns copies
      -> FlowController     holds the request until there is capacity
           -> Capacity.has_room  may one more request go to the backend now?
           -> Policy.less        which queued request goes next
                -> Datastore.workload_get_metrics
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds and one-shot timers; injected so tests run on virtual time."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


@dataclass(frozen=True, slots=True)
class WorkloadMetrics:
    """A copy of one workload's counters at one moment (the seed's six fields)."""

    workload_id: str
    total_requests: int
    active_requests: int
    average_wait_time: float
    """Seconds; EMA of enqueue-to-dispatch time. 0 until the first dispatch."""
    dispatched_count: int
    request_rate: float
    """Requests per second over the sliding rate window."""


class RegistryFull(Exception):
    """The registry tracks as many workloads as it may; this new one was not added."""


class WorkloadRegistry(Protocol):
    """Per-workload counters. Safe to call from any thread; reads return copies."""

    def increment_active(self, workload_id: str) -> None:
        """Count a new request in; raises RegistryFull for a new workload past the limit."""
        ...

    def decrement_active(self, workload_id: str) -> None: ...

    def record_dispatch(self, workload_id: str, wait_time: float) -> None: ...

    def get_metrics(self, workload_id: str) -> WorkloadMetrics | None: ...

    def get_request_rate(self, workload_id: str) -> float: ...

    def list_metrics(self) -> list[WorkloadMetrics]: ...

    def recent_waits(self) -> dict[str, list[float]]:
        """Queue waits of the most recent dispatches, by workload."""
        ...

    def sweep(self) -> list[str]:
        """Forget idle workloads; returns the ids forgotten."""
        ...


class Datastore(Protocol):
    """The facade the stream handler writes through and the policies read through."""

    def workload_handle_new_request(self, workload_id: str) -> None: ...

    def workload_handle_dispatched_request(self, workload_id: str, wait_time: float) -> None: ...

    def workload_handle_completed_request(self, workload_id: str) -> None: ...

    def workload_get_metrics(self, workload_id: str) -> WorkloadMetrics | None: ...

    def workload_get_request_rate(self, workload_id: str) -> float: ...

    def get_workload_registry(self) -> WorkloadRegistry: ...


MAX_TOKENS = 10_000_000
"""The declared range of a token count from outside (a body's `max_tokens`, a prompt's
estimate, a response's `usage`) is 0..MAX_TOKENS: larger numbers are clamped where they
enter, so a charge stays a few times 1e7 and counters stay finite and exact enough."""


def clamp_tokens(count: int) -> int:
    """`count` within 0..MAX_TOKENS."""
    return min(max(count, 0), MAX_TOKENS)


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A request's tokens: its prompt and its answer."""

    input: int
    output: int


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """What a policy sees of a request waiting in the flow-control queue."""

    workload_id: str
    criticality: int
    enqueued_at: float
    """Clock time at enqueue; the start of the request's queue wait."""
    seq: int
    """Arrival order across all workloads; the FCFS tie-break."""
    tokens: TokenCount | None = None
    """Estimated at enqueue from the request body (prompt length, max_tokens); None
    when the body was not read."""


class Policy(Protocol):
    """Orders queued requests. Consulted at every dispatch, so it sees live metrics.

    The flow controller also reports each admitted request's life to the policy,
    for policies that keep their own accounts (fair-share's virtual counters):
    `on_enqueue` once when a request is admitted (queued or dispatched at once),
    `on_dispatch` when it takes a slot, and `on_done` exactly once at its end,
    with its slot time (None if it never got a slot).

    Hooks are atomic: one that raises must have changed nothing. The controller
    then refuses that request (REJECTED_INTERNAL) and reports its end with
    `on_done(item, None)`, or with `on_undispatch` instead when `on_dispatch` had
    succeeded before a later step of the dispatch raised. `sort_key` must not raise.
    """

    name: str
    stable_keys: bool
    """True when an item's `sort_key` changes only after a hook about its workload;
    the queue can then keep heads in a heap. False: keys move with time, and the
    queue compares every head at every dispatch."""

    def less(self, a: QueuedRequest, b: QueuedRequest) -> bool:
        """True when `a` should be dispatched before `b`: `sort_key(a) < sort_key(b)`."""
        ...

    def sort_key(self, item: QueuedRequest) -> tuple[float, ...]:
        """The item's place in line as of now; lower goes first, ties cannot happen."""
        ...

    def on_enqueue(self, item: QueuedRequest) -> None: ...

    def on_dispatch(self, item: QueuedRequest) -> None: ...

    def on_undispatch(self, item: QueuedRequest) -> None:
        """`on_dispatch` succeeded, then a later step of the dispatch raised: the request
        ends unserved. Undo the dispatch; learn nothing from it (it had no service time)."""
        ...

    def on_done(self, item: QueuedRequest, service_time: float | None) -> None: ...

    def on_usage(self, item: QueuedRequest, usage: TokenCount | None) -> None:
        """A dispatched request's response completed, reporting its token usage (None:
        the response carried none). At most once, before `on_done`."""
        ...

    def forget(self, workload_id: str) -> None:
        """The registry forgot this idle workload; drop any account kept for it."""
        ...


@dataclass(frozen=True, slots=True)
class PickRequest:
    """What the endpoint picker may know of a request, beyond its workload."""

    prompt: str | None = None
    """The prompt text, for prefix-cache affinity; None when unknown."""
    subset: frozenset[str] | None = None
    """The allowed endpoints ("ip:port", the gateway's subset hint); None = the whole pool."""


class EndpointPool(Protocol):
    """The model servers a released request may go to, and which one it goes to.

    With a pool the flow controller releases a request only when one of its
    allowed endpoints has room, then asks `pick` where it goes (late binding).
    Each dispatched request is accounted to one endpoint: `pick` charges the
    primary, `move` re-accounts it to the one that actually served it,
    `on_first_byte` and `on_release` report its life there. A pool whose room
    grows by itself (a scrape) calls `wake`; one whose membership changed
    (discovery, an endpoint died) calls `changed`, so queued requests with no
    eligible endpoint left are answered rather than held.
    """

    def bind(self, wake: Callable[[], None], changed: Callable[[], None]) -> None: ...

    def ineligible(self, pick: PickRequest | None) -> str | None:
        """Why no ready endpoint is allowed for this request, or None when some is."""
        ...

    def has_room(self, pick: PickRequest | None) -> bool:
        """Some ready endpoint allowed for this request can take one more now."""
        ...

    def pick(self, pick: PickRequest | None) -> tuple[str, ...]:
        """Primary ("ip:port", charged one request in flight), then the fallbacks configured.

        Called only after `has_room` said yes for the same request."""
        ...

    def move(self, old: str, new: str, started: bool) -> bool:
        """Re-account one request in flight from `old` to `new`; False if `new` is unknown.

        `started`: its first byte was reported (`on_first_byte`), so it moves as started."""
        ...

    def on_first_byte(self, address: str, seconds: float) -> None: ...

    def on_release(self, address: str, started: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """What the last scrapes of one model server's metrics said."""

    url: str
    waiting: float | None
    """Requests waiting inside the model server at the last good scrape."""
    kv_cache_usage: float | None
    """KV-cache utilisation, 0..1, at the last good scrape; None when not exported."""
    saturation: float | None
    """The endpoint's saturation now (estimated queue / threshold, or KV-cache use /
    threshold); None when stale."""
    age: float | None
    """Seconds since the last good scrape; None before the first."""
    errors: int
    last_error: str
    running: float | None = None
    """Requests running inside the model server at the last good scrape, when exported."""
    slots: float | None = None
    """The gate's estimate of the server's slot count; None before the first scrape."""


@dataclass(frozen=True, slots=True)
class CapacityStatus:
    """A copy of the capacity gate's state, for metrics and the read APIs."""

    mode: str
    limit: int
    """The in-flight limit in force now; 0 means none."""
    saturation: float | None = None
    """metrics: the worst endpoint's saturation (dispatch only below 1)."""
    fallback: bool = False
    """metrics: every endpoint is stale, so the static limit is in force."""
    min_latency: float | None = None
    """adaptive: the no-load dispatch-to-first-byte latency, s."""
    latency: float | None = None
    """adaptive: the latest window's median dispatch-to-first-byte latency, s."""
    endpoints: tuple[EndpointStatus, ...] = ()


class Capacity(Protocol):
    """Whether the backend may take one more request now. Consulted before every dispatch.

    The flow controller reports each dispatched request's life: `on_dispatch`
    when it takes a slot, `on_latency` once with its dispatch-to-first-byte
    time (when known), `on_release` when it gives the slot back (`started`: its
    first byte was reported, so the server had begun it). A gate whose
    room can grow without a release (a new scrape, a raised limit) calls the
    `wake` callback it was bound to, and the controller dispatches at once.
    """

    name: str
    wants_first_byte: bool
    """True when the gate uses each response's first byte (its latency, or the proof that
    the server started the request), so the response headers must be seen."""

    def bind(self, wake: Callable[[], None]) -> None: ...

    def has_room(self, in_flight: int) -> bool: ...

    def on_dispatch(self) -> None: ...

    def on_latency(self, seconds: float, dispatched_at: float) -> None: ...

    def on_release(self, started: bool) -> None: ...

    def status(self) -> CapacityStatus: ...


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """A replica's view of the fleet that shares its registry (`--registry redis://`)."""

    replica: str
    connected: bool
    """The latest sync with Redis succeeded."""
    replicas: int
    """Live replicas at the last good sync."""
    errors: int
    age: float | None
    """Seconds since the last good sync; None before the first."""
