"""Pickers: rank the ready endpoints a request may use; the pool takes the best with room.

- `round-robin`: the endpoint after the last one picked, in address order;
- `least-loaded`: the shortest estimated queue (or in flight, when stale);
- `scored`: the weighted sum of the scorers (`scorers`), GIE's default profile.
Every picker returns one number per endpoint, higher better; the pool takes
the best endpoint with room as the primary (ties broken at random, by an
injectable RNG) and, when asked for (`--fallbacks`), the next best as fallbacks for
the data plane's retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from extproc.pool.endpoints import Endpoint, Load
from extproc.pool.scorers import ScorerWeights, weighted_scores

PICKERS = ("round-robin", "least-loaded", "scored")


class Picker(Protocol):
    name: str

    def scores(
        self, endpoints: Sequence[Endpoint], loads: Sequence[Load], hashes: tuple[int, ...]
    ) -> list[float]: ...

    def picked(self, endpoint: Endpoint) -> None: ...


class RoundRobinPicker:
    name = "round-robin"

    def __init__(self) -> None:
        self._last = ""

    def scores(
        self, endpoints: Sequence[Endpoint], loads: Sequence[Load], hashes: tuple[int, ...]
    ) -> list[float]:
        # Addresses after the last one picked come first, in order, then the wrap.
        last = self._last
        return [
            -float(i) if e.address > last else -float(i + len(endpoints))
            for i, e in enumerate(endpoints)
        ]

    def picked(self, endpoint: Endpoint) -> None:
        self._last = endpoint.address


class LeastLoadedPicker:
    name = "least-loaded"

    def scores(
        self, endpoints: Sequence[Endpoint], loads: Sequence[Load], hashes: tuple[int, ...]
    ) -> list[float]:
        return [-load.queue_depth for load in loads]

    def picked(self, endpoint: Endpoint) -> None:
        pass


class ScoredPicker:
    name = "scored"

    def __init__(self, weights: ScorerWeights) -> None:
        self.weights = weights

    def scores(
        self, endpoints: Sequence[Endpoint], loads: Sequence[Load], hashes: tuple[int, ...]
    ) -> list[float]:
        return weighted_scores(self.weights, endpoints, loads, hashes)

    def picked(self, endpoint: Endpoint) -> None:
        pass


def make_picker(name: str, weights: ScorerWeights | None = None) -> Picker:
    if name == "round-robin":
        return RoundRobinPicker()
    if name == "least-loaded":
        return LeastLoadedPicker()
    if name == "scored":
        return ScoredPicker(weights or ScorerWeights())
    raise ValueError(f"unknown picker {name!r}; choose from {', '.join(PICKERS)}")
