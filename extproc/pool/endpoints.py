"""One model server of the pool: what its metrics said, and what we sent it since.

Algorithm: the metrics gate's per-server rule (`capacity.saturation.ServerLoad`,
work-conserving), one per endpoint and charged whole requests, because here
the service knows where each request went:
- a scrape gives waiting W, running R and KV-cache use; the service counts its
  own requests there live (in flight I, started B); the server's slot count S
  is learnt from scrapes and first bytes, foreign load F from scrapes;
- the estimated queue is I + F - S; room while it is below the waiting
  threshold and KV-cache use below its threshold, and in flight below the
  per-endpoint ceiling (`--endpoint-max-in-flight`) when set. The queue the
  pickers rank by takes S as at least 1 unless the last scrape showed a
  queue: a server not yet seen running a request still runs one. Without
  that floor the first request sent to a cold server read as queued, so
  every newcomer went elsewhere until a scrape or first byte showed it
  running (measured: 6 of 7 tenants on one of two vLLMs).
- Stale (no good scrape for `stale_after`): the readings are unknown, not
  alarming. The endpoint's queue is its in-flight requests beyond its last
  learnt slots (at least 1), foreign load unknown, and it has room below
  the ceiling (always, without one): stale never halts.
- Dead: scrapes that cannot even connect for `stale_after` take the endpoint
  out of the ready set until a scrape connects again; discovery (a Pod's
  readiness) can take it out as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from extproc.capacity.saturation import Reading, SaturationOptions, ServerLoad
from extproc.contracts import Clock
from extproc.pool.prefix import PrefixCache

SLOTS_PRIOR = 1.0
"""The slots assumed of a server that has shown none yet (`_compute_load`)."""


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    saturation: SaturationOptions = field(default_factory=SaturationOptions)
    max_in_flight: int = 0
    """Per-endpoint ceiling on requests in flight; 0 = none."""
    prefix_capacity: int = 31_250
    """Prefix blocks remembered per endpoint (GIE's per-pod LRU is ~31k entries)."""


class Load(NamedTuple):
    """One endpoint's state at one instant, as the pickers read it."""

    queue_depth: float
    kv_cache_usage: float | None
    room: bool


@dataclass(frozen=True, slots=True)
class EndpointSnapshot:
    """A copy of one endpoint's state, for the read API, metrics and `top`."""

    address: str
    ready: bool
    in_flight: int
    waiting: float | None
    running: float | None
    kv_cache_usage: float | None
    queue_depth: float
    """The estimated queue: in flight + foreign (fresh only) - slots (at least 1)."""
    saturation: float | None
    """None when stale."""
    scrape_age: float | None
    picked: int
    prefix_hits: int
    """Picks that went here because (in part) of a matched prompt prefix."""
    scrape_errors: int
    last_error: str


class Endpoint:
    __slots__ = (
        "_load",
        "_load_until",
        "address",
        "discovered_ready",
        "failing",
        "host",
        "options",
        "picked",
        "prefix",
        "prefix_hits",
        "server",
        "unreachable_since",
    )

    def __init__(self, address: str, options: EndpointOptions, clock: Clock) -> None:
        self.address = address
        self.host = address.rpartition(":")[0]
        """The address without its port ("[v6]" bracketed): a bare IP in a subset hint
        names the endpoint on any port."""
        self.options = options
        self.server = ServerLoad(clock, options.saturation)
        self.discovered_ready = True
        """What discovery says (a Pod's Ready condition); static endpoints are always ready."""
        self.unreachable_since: float | None = None
        """When scrapes began failing to connect; None while they connect."""
        self.failing = False
        self.picked = 0
        self.prefix_hits = 0
        self.prefix = PrefixCache(options.prefix_capacity)
        self._load: Load | None = None
        """`load` as last computed; valid until `_load_until` or the next change of state."""
        self._load_until = 0.0

    @property
    def in_flight(self) -> int:
        return round(self.server.in_flight)

    def ready(self, now: float) -> bool:
        since = self.unreachable_since
        dead = since is not None and now - since >= self.options.saturation.stale_after
        return self.discovered_ready and not dead

    def load(self, now: float) -> Load:
        """Queue depth, KV-cache use and room in one pass (the pick's hot path)."""
        if self._load is not None and now <= self._load_until:
            return self._load
        load = self._load = self._compute_load()
        read_at = self.server.read_at
        stale_after = self.options.saturation.stale_after
        fresh_until = read_at + stale_after if read_at is not None else 0.0
        # Readings go stale at one instant; until then only a change of state moves the load.
        self._load_until = fresh_until if now <= fresh_until else float("inf")
        return load

    def _compute_load(self) -> Load:
        server, ceiling = self.server, self.options.max_in_flight
        full = bool(ceiling) and self.in_flight >= ceiling
        reading = server.reading
        # A server runs at least one request: before any scrape or first byte has shown
        # it running one (learnt slots 0), its one request in flight is not a queue --
        # unless its last scrape showed it queueing.
        queueing = reading is not None and reading.waiting > 0
        slots = server.slots if queueing else max(server.slots, SLOTS_PRIOR)
        if not server.fresh():
            return Load(max(0.0, server.in_flight - slots), None, not full)
        kv = reading.kv_cache_usage if reading is not None else None
        queue = max(0.0, server.in_flight + server.foreign - slots)
        return Load(queue, kv, not full and server.room() > 0)

    def queue_depth(self, now: float) -> float:
        """The requests waiting inside the server, as best known now."""
        return self.load(now).queue_depth

    def has_room(self, now: float) -> bool:
        return self.load(now).room

    def saturation(self) -> float | None:
        return self.server.saturation() if self.server.fresh() else None

    def on_dispatch(self) -> None:
        self._load = None
        self.server.dispatched()

    def on_first_byte(self) -> bool:
        """The server started one of our requests; True when that showed it has more slots."""
        self._load = None
        return self.server.started()

    def on_release(self, started: bool = True) -> None:
        """`started`: its first byte was reported (`on_first_byte`)."""
        self._load = None
        self.server.completed(started=started)

    def begin_scrape(self) -> None:
        self.server.begin_read()

    def end_scrape(self, reading: Reading) -> bool:
        """Record a good scrape; True when it ends a run of failures."""
        recovered, self.failing = self.failing, False
        self._load = None
        self.unreachable_since = None
        self.server.read(reading)
        return recovered

    def fail_scrape(self, now: float, error: str, *, unreachable: bool) -> bool:
        """Record a failed scrape; True when it begins a run of failures."""
        began, self.failing = not self.failing, True
        self.server.fail(error)
        if not unreachable:
            self.unreachable_since = None
        elif self.unreachable_since is None:
            self.unreachable_since = now
        return began

    def snapshot(self, now: float) -> EndpointSnapshot:
        server = self.server
        reading, read_at = server.reading, server.read_at
        return EndpointSnapshot(
            address=self.address,
            ready=self.ready(now),
            in_flight=self.in_flight,
            waiting=reading.waiting if reading else None,
            running=reading.running if reading else None,
            kv_cache_usage=reading.kv_cache_usage if reading else None,
            queue_depth=self.queue_depth(now),
            saturation=self.saturation(),
            scrape_age=None if read_at is None else now - read_at,
            picked=self.picked,
            prefix_hits=self.prefix_hits,
            scrape_errors=server.errors,
            last_error=server.last_error,
        )
