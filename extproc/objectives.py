"""InferenceObjectives: the request header `x-gateway-inference-objective` names one, and
its priority decides the request's criticality.

An InferenceObjective (inference.networking.x-k8s.io/v1alpha2, read with
`--inference-pool`) has a `spec.priority`: any integer, higher served first,
unset meaning 0; negative means sheddable (upstream rejects it while the pool
is saturated instead of queueing it). Criticality here is 1..5 (3 the default,
higher first), so the mapping is monotone and keeps upstream's three marks:

    priority < 0          -> 1  sheddable (with --inference-pool, --shed-below is
                                 at least 2, so criticality 1 is refused 429 while
                                 saturated rather than queued)
    priority 0 or unset   -> 3  standard, as a request naming no objective
    priority 1..9         -> 4
    priority >= 10        -> 5

Priorities that map to the same criticality share it (upstream orders every
distinct priority strictly). A name the table does not hold -- no such
objective, one of another pool, or the watch not synced yet -- gets the
default criticality and is counted (`extproc_objective_unknown_total`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

OBJECTIVE_HEADER = "x-gateway-inference-objective"
SHEDDABLE_CRITICALITY = 1
STANDARD_CRITICALITY = 3
HIGH_PRIORITY = 10


def criticality_of(priority: int | None) -> int:
    if priority is None or priority == 0:
        return STANDARD_CRITICALITY
    if priority < 0:
        return SHEDDABLE_CRITICALITY
    return 5 if priority >= HIGH_PRIORITY else 4


class ObjectiveTable:
    """Objective name -> priority, replaced whole by the watch that reads them."""

    def __init__(self, on_unknown: Callable[[], None] = lambda: None) -> None:
        self._priorities: dict[str, int | None] = {}
        self._on_unknown = on_unknown

    def replace(self, priorities: Mapping[str, int | None]) -> None:
        self._priorities = dict(priorities)

    @property
    def priorities(self) -> dict[str, int | None]:
        return dict(self._priorities)

    def criticality(self, name: str) -> int | None:
        """The criticality `name` stands for; None (and counted) when unknown."""
        if name not in self._priorities:
            self._on_unknown()
            return None
        return criticality_of(self._priorities[name])
