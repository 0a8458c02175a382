"""The static capacity gate: at most C requests in flight (`--max-concurrency`; 0 = no limit).

It is also the floor the other gates stand on: `saturation` falls back to it
when its metrics go stale, and `adaptive` never exceeds it.
"""

from __future__ import annotations

from collections.abc import Callable

from extproc.contracts import CapacityStatus


class StaticCapacity:
    name = "static"
    wants_first_byte = False

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError("the in-flight limit must be >= 0")
        self.limit = limit

    def bind(self, wake: Callable[[], None]) -> None:
        """A fixed limit never grows by itself: nothing to wake."""

    def has_room(self, in_flight: int) -> bool:
        return self.limit == 0 or in_flight < self.limit

    def on_dispatch(self) -> None:
        pass

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        pass

    def on_release(self) -> None:
        pass

    def status(self) -> CapacityStatus:
        return CapacityStatus(self.name, self.limit)
