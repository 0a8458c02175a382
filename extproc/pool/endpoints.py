"""One model server of the pool: what its metrics said, and what we sent it since.

Algorithm (per endpoint; the metrics gate's saturation rule, applied to one server)
- A scrape gives `waiting`, `running` and, when exported, KV-cache use.
- Credit: requests dispatched here since the scrape will join its queue
  unless a running one finished, so the estimated queue depth is
  waiting + dispatched - completed since the scrape, floored at 0. Every
  uncertainty is settled towards "fuller": dispatches count from `transit`
  before the scrape was sent, completions only from `transit` after it landed.
- saturation = `capacity.saturation.saturation_of(queue depth, KV use)`; room
  while saturation < 1 and in flight < the per-endpoint ceiling (when set).
- Stale (no good scrape for `stale_after`): the readings are unknown, not
  alarming. The endpoint counts as its in-flight requests (queue depth) and
  has room below the ceiling (always, without one): stale never halts.
- Dead: scrapes that cannot even connect for `stale_after` take the endpoint
  out of the ready set until a scrape connects again; discovery (a Pod's
  readiness) can take it out as well.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from extproc.capacity.saturation import Reading, SaturationOptions, saturation_of
from extproc.pool.prefix import PrefixCache


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
    """waiting + credit when fresh, in flight when stale."""
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
        "_completed",
        "_completed_mark",
        "_dispatched",
        "_dispatched_mark",
        "_load",
        "_load_until",
        "_pending_mark",
        "_recent",
        "address",
        "discovered_ready",
        "errors",
        "failing",
        "in_flight",
        "last_error",
        "options",
        "picked",
        "prefix",
        "prefix_hits",
        "read_at",
        "reading",
        "unreachable_since",
    )

    def __init__(self, address: str, options: EndpointOptions) -> None:
        self.address = address
        self.options = options
        self.discovered_ready = True
        """What discovery says (a Pod's Ready condition); static endpoints are always ready."""
        self.unreachable_since: float | None = None
        """When scrapes began failing to connect; None while they connect."""
        self.in_flight = 0
        self.picked = 0
        self.prefix_hits = 0
        self.reading: Reading | None = None
        self.read_at: float | None = None
        self.errors = 0
        self.last_error = ""
        self.failing = False
        self.prefix = PrefixCache(options.prefix_capacity)
        self._dispatched = 0
        self._completed = 0
        self._pending_mark = 0
        self._dispatched_mark = 0
        self._completed_mark = 0
        self._recent: deque[float] = deque()
        """Times of this endpoint's dispatches of the last `transit` seconds."""
        self._load: Load | None = None
        """`load` as last computed; valid until `_load_until` or the next change of state."""
        self._load_until = 0.0

    def ready(self, now: float) -> bool:
        since = self.unreachable_since
        dead = since is not None and now - since >= self.options.saturation.stale_after
        return self.discovered_ready and not dead

    def fresh(self, now: float) -> bool:
        read_at = self.read_at
        return read_at is not None and now - read_at <= self.options.saturation.stale_after

    def load(self, now: float) -> Load:
        """Queue depth, KV-cache use and room in one pass (the pick's hot path)."""
        if self._load is not None and now <= self._load_until:
            return self._load
        load = self._load = self._compute_load(now)
        read_at = self.read_at
        stale_after = self.options.saturation.stale_after
        fresh_until = read_at + stale_after if read_at is not None else 0.0
        # Readings go stale at one instant; until then only a change of state moves the load.
        self._load_until = fresh_until if now <= fresh_until else float("inf")
        return load

    def _compute_load(self, now: float) -> Load:
        reading, read_at = self.reading, self.read_at
        ceiling = self.options.max_in_flight
        full = bool(ceiling) and self.in_flight >= ceiling
        saturation = self.options.saturation
        if reading is None or read_at is None or now - read_at > saturation.stale_after:
            return Load(float(self.in_flight), None, not full)
        credit = (self._dispatched - self._dispatched_mark) - (
            self._completed - self._completed_mark
        )
        depth = max(0.0, reading.waiting + credit)
        kv = reading.kv_cache_usage
        room = not full and saturation_of(depth, kv, saturation) < 1.0
        return Load(depth, kv, room)

    def queue_depth(self, now: float) -> float:
        """The requests waiting inside the server, as best known now."""
        reading = self.reading
        if reading is None or not self.fresh(now):
            return float(self.in_flight)
        credit = (self._dispatched - self._dispatched_mark) - (
            self._completed - self._completed_mark
        )
        return max(0.0, reading.waiting + credit)

    def saturation(self, now: float) -> float | None:
        reading = self.reading
        if reading is None or not self.fresh(now):
            return None
        return saturation_of(self.queue_depth(now), reading.kv_cache_usage, self.options.saturation)

    def has_room(self, now: float) -> bool:
        return self.load(now).room

    def on_dispatch(self, now: float) -> None:
        self._load = None
        self.in_flight += 1
        self._dispatched += 1
        self._recent.append(now)
        self._forget_before(now - self.options.saturation.transit)

    def on_release(self, now: float) -> None:
        self._load = None
        self.in_flight -= 1
        self._completed += 1
        read_at = self.read_at
        if read_at is not None and read_at > now - self.options.saturation.transit:
            self._completed_mark += 1  # maybe in its reading already: not credited

    def begin_scrape(self, now: float) -> None:
        self._forget_before(now - self.options.saturation.transit)
        self._pending_mark = self._dispatched - len(self._recent)

    def end_scrape(self, now: float, reading: Reading) -> bool:
        """Record a good scrape; True when it ends a run of failures."""
        recovered, self.failing = self.failing, False
        self._load = None
        self.reading = reading
        self.read_at = now
        self.unreachable_since = None
        self._dispatched_mark = self._pending_mark
        self._completed_mark = self._completed
        return recovered

    def fail_scrape(self, now: float, error: str, *, unreachable: bool) -> bool:
        """Record a failed scrape; True when it begins a run of failures."""
        began, self.failing = not self.failing, True
        self.errors += 1
        self.last_error = error
        if not unreachable:
            self.unreachable_since = None
        elif self.unreachable_since is None:
            self.unreachable_since = now
        return began

    def _forget_before(self, horizon: float) -> None:
        recent = self._recent
        while recent and recent[0] < horizon:
            recent.popleft()

    def snapshot(self, now: float) -> EndpointSnapshot:
        reading = self.reading
        return EndpointSnapshot(
            address=self.address,
            ready=self.ready(now),
            in_flight=self.in_flight,
            waiting=reading.waiting if reading else None,
            running=reading.running if reading else None,
            kv_cache_usage=reading.kv_cache_usage if reading else None,
            queue_depth=self.queue_depth(now),
            saturation=self.saturation(now),
            scrape_age=None if self.read_at is None else now - self.read_at,
            picked=self.picked,
            prefix_hits=self.prefix_hits,
            scrape_errors=self.errors,
            last_error=self.last_error,
        )
