"""Scenario simulator: the real flow controller, registry and policies on a virtual clock.

A scenario (YAML, see `docs/scenarios/`) names tenants -- arrival process and
rate, service-time distribution, criticality, start/stop, on/off schedule --
the backend's slots C, the queue limits and a duration. Every request is
tracked exactly as the ext_proc server tracks it (new, enqueue, dispatched,
completed after its service time), each step at an exact virtual instant, so a
seed reproduces a run to the last digit. The simulated backend is C slots: a
dispatched request holds one for its service time.

Reported per tenant: requests dispatched, rejected and timed out, occupancy
(slot-seconds), queue wait p50/p99/max (dispatched and timed-out requests).
Overall: Jain's index of windowed, demand-capped service -- in each window,
each tenant's service over its weighted max-min fair allocation given what it
asked for, averaged over windows where two or more tenants asked.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from extproc.clock import VirtualClock
from extproc.contracts import Clock, Datastore, Policy
from extproc.flowcontrol.fair_share import DEFAULT_WEIGHTS, Cost
from extproc.flowcontrol.policies import PolicyOptions, make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from extproc.stats import percentile
from extproc.tools.fairness import jain_index, max_min_fair

PolicyMaker = Callable[[Datastore, Clock], Policy]


class ServiceTime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    distribution: Literal["constant", "exponential", "uniform", "lognormal"] = "constant"
    mean: float = Field(1.0, gt=0)
    sigma: float = Field(0.5, ge=0, description="lognormal: sigma of the underlying normal")

    def sample(self, rng: random.Random) -> float:
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean)
        if self.distribution == "uniform":
            return rng.uniform(0.0, 2.0 * self.mean)
        if self.distribution == "lognormal":
            mu = math.log(self.mean) - self.sigma**2 / 2
            return rng.lognormvariate(mu, self.sigma)
        return self.mean


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    rate: float = Field(gt=0, description="requests per second while on")
    arrival: Literal["poisson", "uniform"] = "poisson"
    service: ServiceTime = ServiceTime()
    criticality: int = Field(3, ge=1, le=5)
    start: float = Field(0.0, ge=0)
    stop: float | None = Field(None, gt=0)
    on_for: float | None = Field(None, gt=0, description="seconds on, then `off_for` off, repeated")
    off_for: float | None = Field(None, gt=0)
    replicas: int = Field(1, ge=1, description="this many tenants alike, named NAME-1..NAME-N")

    def names(self) -> list[str]:
        if self.replicas == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, self.replicas + 1)]

    def is_on(self, t: float) -> bool:
        if self.on_for is None or self.off_for is None:
            return True
        return (t - self.start) % (self.on_for + self.off_for) < self.on_for


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "scenario"
    description: str = ""
    seed: int = 1
    duration: float = Field(gt=0, description="simulated seconds of arrivals")
    capacity: int = Field(ge=1, description="backend slots C")
    max_queue: int = Field(100_000, ge=0)
    queue_timeout: float | None = Field(60.0, gt=0)
    window: float = Field(10.0, gt=0, description="seconds per fairness window")
    cost: Cost = "occupancy"
    criticality_weights: tuple[float, ...] = DEFAULT_WEIGHTS
    tenants: list[TenantSpec] = Field(min_length=1)

    @classmethod
    def from_yaml(cls, path: Path) -> Scenario:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def requests(self) -> list[Request]:
        requests: list[Request] = []
        for spec in self.tenants:
            for name in spec.names():
                requests.extend(self._arrivals(spec, name))
        requests.sort(key=lambda r: r.arrival)
        return requests

    def _arrivals(self, spec: TenantSpec, name: str) -> Iterable[Request]:
        rng = random.Random(f"{self.seed}:{name}")
        stop = min(spec.stop or self.duration, self.duration)
        t = spec.start
        while True:
            t += rng.expovariate(spec.rate) if spec.arrival == "poisson" else 1.0 / spec.rate
            if t >= stop:
                return
            if spec.is_on(t):
                yield Request(name, spec.criticality, t, spec.service.sample(rng))


@dataclass(frozen=True, slots=True)
class Request:
    tenant: str
    criticality: int
    arrival: float
    service: float


@dataclass(slots=True)
class Record:
    request: Request
    outcome: Outcome | None = None
    wait: float = 0.0

    @property
    def dispatched_at(self) -> float | None:
        return self.request.arrival + self.wait if self.outcome is Outcome.DISPATCHED else None

    @property
    def left_queue_at(self) -> float | None:
        return None if self.outcome is None else self.request.arrival + self.wait


@dataclass
class Replay:
    records: list[Record]
    flow: FlowController
    registry: InMemoryWorkloadRegistry
    clock: VirtualClock

    def of(self, tenant: str) -> list[Record]:
        return [r for r in self.records if r.request.tenant == tenant]


def replay(
    requests: Iterable[Request],
    policy: PolicyMaker,
    *,
    capacity: int,
    until: float,
    max_queue: int = 100_000,
    queue_timeout: float | None = None,
) -> Replay:
    """Run the requests through the real components until virtual time `until`."""
    clock = VirtualClock()
    registry = InMemoryWorkloadRegistry(clock)
    datastore = RegistryDatastore(registry)
    records: list[Record] = []
    by_ticket: dict[Ticket, Record] = {}

    def decided(ticket: Ticket) -> None:
        record = by_ticket.get(ticket) or records[-1]  # decided inside `enqueue`: the newest
        record.outcome, record.wait = ticket.outcome, ticket.wait_time
        tenant = record.request.tenant
        if ticket.outcome is Outcome.DISPATCHED:
            datastore.workload_handle_dispatched_request(tenant, ticket.wait_time)
            clock.call_later(record.request.service, lambda: complete(ticket, tenant))
        else:
            datastore.workload_handle_completed_request(tenant)

    def complete(ticket: Ticket, tenant: str) -> None:
        ticket.close()
        datastore.workload_handle_completed_request(tenant)

    flow = FlowController(
        policy(datastore, clock),
        clock,
        max_concurrency=capacity,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        on_decided=decided,
    )

    def arrive(request: Request) -> None:
        records.append(Record(request))
        datastore.workload_handle_new_request(request.tenant)
        ticket = flow.enqueue(FlowRequest(request.tenant, request.criticality))
        if ticket.outcome is None:
            by_ticket[ticket] = records[-1]

    for request in requests:
        clock.call_later(request.arrival, lambda r=request: arrive(r))  # type: ignore[misc]
    clock.advance(until)
    return Replay(records, flow, registry, clock)


@dataclass(frozen=True)
class TenantStats:
    name: str
    criticality: int
    arrived: int
    dispatched: int
    rejected: int
    timed_out: int
    occupancy: float
    """Slot-seconds of service received within the scenario's duration."""
    wait_p50: float
    wait_p99: float
    wait_max: float


@dataclass(frozen=True)
class Window:
    start: float
    served: dict[str, float]
    """Slot-seconds each tenant received in the window."""
    fair: dict[str, float]
    """Each tenant's max-min fair share of what was served, given its demand."""


@dataclass
class SimResult:
    scenario: Scenario
    policy: str
    tenants: list[TenantStats]
    windows: list[Window]
    jain: float
    records: list[Record] = field(repr=False)

    @property
    def dispatched(self) -> int:
        return sum(t.dispatched for t in self.tenants)

    @property
    def occupancy(self) -> float:
        return sum(t.occupancy for t in self.tenants)

    def tenant(self, name: str) -> TenantStats:
        return next(t for t in self.tenants if t.name == name)

    def waits(self, tenant: str) -> list[float]:
        return [r.wait for r in self.records if r.request.tenant == tenant and _queued(r)]


def run(scenario: Scenario, policy: str | PolicyMaker) -> SimResult:
    options = PolicyOptions(cost=scenario.cost, criticality_weights=scenario.criticality_weights)
    maker: PolicyMaker = (
        (lambda d, c: make_policy(policy, d, c, options)) if isinstance(policy, str) else policy
    )
    result = replay(
        scenario.requests(),
        maker,
        capacity=scenario.capacity,
        until=scenario.duration,
        max_queue=scenario.max_queue,
        queue_timeout=scenario.queue_timeout,
    )
    name = policy if isinstance(policy, str) else getattr(policy, "name", "custom")
    windows = _windows(scenario, result.records)
    return SimResult(
        scenario=scenario,
        policy=name,
        tenants=_tenant_stats(scenario, result.records),
        windows=windows,
        jain=_mean_jain(windows),
        records=result.records,
    )


def _queued(record: Record) -> bool:
    return record.outcome in (Outcome.DISPATCHED, Outcome.EVICTED_QUEUE_TIMEOUT)


def _served_between(record: Record, start: float, end: float) -> float:
    dispatched = record.dispatched_at
    if dispatched is None:
        return 0.0
    return max(0.0, min(end, dispatched + record.request.service) - max(start, dispatched))


def _tenant_stats(scenario: Scenario, records: list[Record]) -> list[TenantStats]:
    criticality = {name: s.criticality for s in scenario.tenants for name in s.names()}
    by_tenant: dict[str, list[Record]] = {name: [] for name in criticality}
    for record in records:
        by_tenant[record.request.tenant].append(record)
    stats = []
    for name, mine in by_tenant.items():
        waits = [r.wait for r in mine if _queued(r)]
        stats.append(
            TenantStats(
                name=name,
                criticality=criticality[name],
                arrived=len(mine),
                dispatched=sum(r.outcome is Outcome.DISPATCHED for r in mine),
                rejected=sum(r.outcome is Outcome.REJECTED_QUEUE_FULL for r in mine),
                timed_out=sum(r.outcome is Outcome.EVICTED_QUEUE_TIMEOUT for r in mine),
                occupancy=sum(_served_between(r, 0.0, scenario.duration) for r in mine),
                wait_p50=percentile(waits, 50),
                wait_p99=percentile(waits, 99),
                wait_max=max(waits, default=0.0),
            )
        )
    return stats


def _windows(scenario: Scenario, records: list[Record]) -> list[Window]:
    tenants = {name: s for s in scenario.tenants for name in s.names()}
    names = list(tenants)
    size, count = scenario.window, math.ceil(scenario.duration / scenario.window - 1e-9)
    ends = [min((k + 1) * size, scenario.duration) for k in range(count)]
    served = [dict.fromkeys(names, 0.0) for _ in range(count)]
    demand = [dict.fromkeys(names, 0.0) for _ in range(count)]
    for record in records:
        tenant, request = record.request.tenant, record.request
        dispatched = record.dispatched_at
        if dispatched is not None:
            for k in range(
                int(dispatched // size), min(count, int((dispatched + request.service) // size) + 1)
            ):
                here = _served_between(record, k * size, ends[k])
                served[k][tenant] += here
                demand[k][tenant] += here
        # Work still waiting at a window's end was asked of that window too.
        left = record.left_queue_at
        last = count - 1 if left is None else min(count - 1, int(left // size) - 1)
        for k in range(int(request.arrival // size), last + 1):
            demand[k][tenant] += request.service
    weights = [scenario.criticality_weights[tenants[n].criticality - 1] for n in names]
    windows = []
    for k in range(count):
        cap = scenario.capacity * (ends[k] - k * size)
        asked = [min(demand[k][n], cap) for n in names]
        fair = max_min_fair(asked, sum(served[k].values()), weights)
        windows.append(Window(k * size, served[k], dict(zip(names, fair, strict=True))))
    return windows


def _mean_jain(windows: list[Window]) -> float:
    indices = []
    for window in windows:
        ratios = [window.served[n] / f for n, f in window.fair.items() if f > 1e-9]
        if len(ratios) >= 2:
            indices.append(jain_index(ratios))
    return sum(indices) / len(indices) if indices else 1.0
