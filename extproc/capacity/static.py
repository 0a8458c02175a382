"""Capacity gates: the shared base, and the static gate -- at most C requests in flight
(`--max-concurrency`; 0 = no limit).

The static gate is also the floor the others stand on: `saturation` falls
back to it when its metrics go stale, and `adaptive` never exceeds it.
"""

from __future__ import annotations

from collections.abc import Callable

from extproc.contracts import CapacityStatus


class Gate:
    """What every gate shares: the wake callback, and request hooks that do nothing
    until a gate needs them."""

    name = "gate"
    wants_first_byte = False

    def __init__(self) -> None:
        self._wake: Callable[[], None] = lambda: None

    def bind(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def on_dispatch(self) -> None:
        pass

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        pass

    def on_release(self, started: bool) -> None:
        pass


class StaticCapacity(Gate):
    name = "static"

    def __init__(self, limit: int = 0) -> None:
        super().__init__()
        if limit < 0:
            raise ValueError("the in-flight limit must be >= 0")
        self.limit = limit

    def has_room(self, in_flight: int) -> bool:
        return self.limit == 0 or in_flight < self.limit

    def status(self) -> CapacityStatus:
        return CapacityStatus(self.name, self.limit)
