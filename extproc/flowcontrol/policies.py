"""The policies by name, and how to build one from settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from extproc.contracts import Clock, Datastore, Policy
from extproc.flowcontrol.fair_share import DEFAULT_WEIGHTS, Cost, FairSharePolicy
from extproc.flowcontrol.policy import FcfsPolicy, ScoreWeights, WorkloadAwarePolicy


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    score: ScoreWeights = field(default_factory=ScoreWeights)
    """workload-aware's weights."""
    cost: Cost = "occupancy"
    """fair-share's unit of service."""
    criticality_weights: tuple[float, ...] = DEFAULT_WEIGHTS
    """fair-share's weight for criticality 1..5."""
    workload_weight: Callable[[str], float | None] | None = None
    """fair-share's weight for a workload, overriding criticality's (--workloads)."""


PolicyFactory = Callable[[Datastore, Clock, PolicyOptions], Policy]

POLICIES: dict[str, PolicyFactory] = {
    FcfsPolicy.name: lambda _datastore, _clock, _options: FcfsPolicy(),
    WorkloadAwarePolicy.name: lambda datastore, clock, options: WorkloadAwarePolicy(
        datastore, clock, options.score
    ),
    FairSharePolicy.name: lambda _datastore, _clock, options: FairSharePolicy(
        options.cost, options.criticality_weights, options.workload_weight
    ),
}


def make_policy(
    name: str, datastore: Datastore, clock: Clock, options: PolicyOptions | None = None
) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
    return factory(datastore, clock, options or PolicyOptions())
