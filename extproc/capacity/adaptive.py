"""The `adaptive` capacity gate: find the backend's concurrency knee from latency.

Algorithm (a latency-gradient limit, after Envoy's adaptive-concurrency
filter, but shrinking by the backlog it infers rather than by a fixed ratio)
- Signal: each dispatched request's dispatch-to-first-byte latency. Below the
  backend's knee C it is flat at the no-load latency m; past C, requests wait
  inside the backend and it climbs.
- m is measured at low concurrency: at start and every `probe_interval`, the
  limit drops to `min_limit`; once fewer than that are in flight, the next
  `probe_samples` requests dispatched answer at no load, and m is their
  median. Between probes, a window whose median is below m lowers m.
- Every `window` seconds (and at least `min_samples` samples, taken only from
  requests dispatched under the current limit), with l the window's median:
  - latency holds (l <= m * (1 + tolerance) + slack) and the limit was what
    held requests back: limit += max(1, growth * limit);
  - latency climbs: by Little's law the backend holds X * (l - m) requests
    beyond its knee, X the dispatch rate; limit -= that backlog, at most half.
  Always within [min_limit, max_limit] (`--max-concurrency`).

Behaviour, for a backend of C slots and steady demand above C: between
probes the limit oscillates around C -- it grows only while no request waits
inside the backend, and a window past C removes about the backlog it created
-- so the backend's own queue stays near growth * C, not unbounded. Measured
in the simulator (tests/test_capacity.py, C = 20, exponential service times):
the limit averages 18.9 over 200 s, probes included, with 0.8 requests
waiting inside the backend on average and the backend 93% busy.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import structlog

from extproc.capacity.static import Gate
from extproc.contracts import CapacityStatus, Clock


@dataclass(frozen=True, slots=True)
class AdaptiveOptions:
    max_limit: int
    min_limit: int = 3
    window: float = 0.5
    min_samples: int = 5
    growth: float = 0.1
    tolerance: float = 0.1
    slack: float = 0.005
    """Seconds of latency noise ignored (a few ms of proxy jitter is not a backlog)."""
    probe_interval: float = 60.0
    probe_samples: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")


class AdaptiveCapacity(Gate):
    name = "adaptive"
    wants_first_byte = True

    def __init__(self, clock: Clock, options: AdaptiveOptions) -> None:
        super().__init__()
        self._clock = clock
        self.options = options
        self._limit = float(options.min_limit)
        self._min_latency: float | None = None
        self._latency: float | None = None
        self._log = structlog.get_logger("extproc.capacity.static")
        now = clock.now()
        self._probing = True
        self._probe_started = now
        self._next_probe = now
        self._changed_at = now
        self._window: list[float] = []
        self._window_start = now
        self._dispatches = 0
        self._held_back = False

    @property
    def limit(self) -> int:
        return self.options.min_limit if self._probing else int(self._limit)

    def has_room(self, in_flight: int) -> bool:
        if in_flight < self.limit:
            return True
        self._held_back = True
        return False

    def on_dispatch(self) -> None:
        self._dispatches += 1

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        if self._probing:
            if dispatched_at >= self._probe_started:
                self._window.append(seconds)
                if len(self._window) >= self.options.probe_samples:
                    self._end_probe()
            return
        if dispatched_at < self._changed_at:
            return  # dispatched under another limit: says nothing about this one
        self._window.append(seconds)
        now = self._clock.now()
        if now - self._window_start >= self.options.window and (
            len(self._window) >= self.options.min_samples
        ):
            self._update(now)

    def status(self) -> CapacityStatus:
        return CapacityStatus(
            self.name, self.limit, min_latency=self._min_latency, latency=self._latency
        )

    def _update(self, now: float) -> None:
        latency = self._latency = statistics.median(self._window)
        assert self._min_latency is not None
        self._min_latency = min(self._min_latency, latency)
        options = self.options
        before = self._limit
        if latency <= self._min_latency * (1 + options.tolerance) + options.slack:
            if self._held_back:
                self._limit += max(1.0, options.growth * self._limit)
        else:
            rate = self._dispatches / (now - self._window_start)
            backlog = rate * (latency - self._min_latency)
            self._limit = max(self._limit - backlog, self._limit / 2)
        self._limit = min(max(self._limit, options.min_limit), options.max_limit)
        self._new_window(now, changed=int(self._limit) != int(before))
        if now >= self._next_probe:
            self._start_probe(now)
        elif self._limit > before:
            self._wake()

    def _new_window(self, now: float, *, changed: bool) -> None:
        if changed:
            self._changed_at = now
        self._window = []
        self._window_start = now
        self._dispatches = 0
        self._held_back = False

    def _start_probe(self, now: float) -> None:
        self._probing = True
        self._probe_started = now
        self._new_window(now, changed=True)

    def _end_probe(self) -> None:
        now = self._clock.now()
        measured = statistics.median(self._window)
        self._log.info(
            "adaptive limit: no-load latency measured",
            min_latency_ms=round(measured * 1000, 3),
            previous_ms=None if self._min_latency is None else round(self._min_latency * 1000, 3),
            limit=math.floor(self._limit),
        )
        self._min_latency = measured
        self._probing = False
        self._next_probe = now + self.options.probe_interval
        self._new_window(now, changed=True)
        self._wake()
