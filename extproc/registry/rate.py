"""Request rate over a sliding window, in constant memory.

Algorithm (the "sliding window counter"): time is cut into buckets of one
window W, aligned to the moment the workload was first seen. Only the current
bucket's count `cur` and the previous one's `prev` are kept. With `e` the time
elapsed in the current bucket, the rate is

    rate = (prev * (1 - e/W) + cur) / W

i.e. the previous bucket's events are assumed spread evenly over it, and the
part of it still inside the window [now - W, now] is counted.

Guarantees:
- Exact for a constant rate: r events/s give r at any age.
- Young workloads: while the workload is younger than W all its events are in
  `cur` and the rate is `cur / max(age, 1 s)`, so a new workload's true rate
  shows within a second instead of ramping up over the whole window.
- Smooth decay: when events stop the estimate falls linearly and continuously
  to exactly 0 at most 2W later; it never jumps (no tumbling-window resets).
  A workload idle that long starts afresh, as a new one.
- O(1) time and memory per workload (no per-event timestamps).
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_AGE = 1.0


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """A window's state as of some moment (another process's, e.g. the fleet's in
    Redis): enough to compute its rate at any later moment on the same clock."""

    window: float
    start: float
    bucket_start: float
    prev: int
    cur: int

    def rate(self, now: float) -> float:
        start, bucket_start, prev, cur = self.start, self.bucket_start, self.prev, self.cur
        elapsed = now - bucket_start
        if elapsed >= 2 * self.window:
            return 0.0  # idle two windows: starts afresh, with nothing counted
        if elapsed >= self.window:
            prev, cur, bucket_start = cur, 0, bucket_start + self.window
        age = now - start
        if age < self.window:
            return cur / max(age, min(_MIN_AGE, self.window))
        return (prev * (1.0 - (now - bucket_start) / self.window) + cur) / self.window


class SlidingWindowRate:
    __slots__ = ("_bucket_start", "_cur", "_prev", "_start", "_window")

    def __init__(self, window: float, now: float) -> None:
        if window <= 0:
            raise ValueError("rate window must be positive")
        self._window = window
        self._start = now
        self._bucket_start = now
        self._prev = 0
        self._cur = 0

    def record(self, now: float) -> None:
        self._roll(now)
        self._cur += 1

    def rate(self, now: float) -> float:
        self._roll(now)
        return self.counts().rate(now)

    def counts(self) -> WindowCounts:
        return WindowCounts(self._window, self._start, self._bucket_start, self._prev, self._cur)

    def _roll(self, now: float) -> None:
        elapsed = now - self._bucket_start
        if elapsed < self._window:
            return
        if elapsed < 2 * self._window:
            self._prev, self._cur = self._cur, 0
            self._bucket_start += self._window
        else:
            self._prev = self._cur = 0
            self._start = self._bucket_start = now
