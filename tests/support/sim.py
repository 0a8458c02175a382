"""Drive the real flow controller, registry and policy on a virtual clock.

Each arrival is tracked as the stream handler tracks it (new -> enqueue ->
dispatched -> completed after its service time), but every step happens at an
exact virtual instant, so results are deterministic to the last digit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from extproc.clock import VirtualClock
from extproc.contracts import Clock, Datastore, Policy
from extproc.datastore import RegistryDatastore
from extproc.outcomes import Outcome
from extproc.queue import FlowController, FlowRequest, Ticket
from extproc.registry import InMemoryWorkloadRegistry

PolicyMaker = Callable[[Datastore, Clock], Policy]


@dataclass(frozen=True)
class Arrival:
    at: float
    workload: str
    criticality: int = 3
    service: float = 1.0


@dataclass
class Record:
    arrival: Arrival
    outcome: Outcome | None = None
    wait: float = 0.0


@dataclass
class Run:
    records: list[Record]
    flow: FlowController
    registry: InMemoryWorkloadRegistry
    clock: VirtualClock

    def of(self, workload: str) -> list[Record]:
        return [r for r in self.records if r.arrival.workload == workload]


def simulate(
    arrivals: Iterable[Arrival],
    policy: PolicyMaker,
    *,
    max_concurrency: int,
    until: float,
    max_queue: int = 100_000,
    queue_timeout: float | None = None,
) -> Run:
    clock = VirtualClock()
    registry = InMemoryWorkloadRegistry(clock)
    datastore = RegistryDatastore(registry)
    records: list[Record] = []
    by_ticket: dict[Ticket, Record] = {}
    arriving: list[Record] = []

    def decided(ticket: Ticket) -> None:
        record = by_ticket.get(ticket) or arriving[-1]
        record.outcome, record.wait = ticket.outcome, ticket.wait_time
        workload = record.arrival.workload
        if ticket.outcome is Outcome.DISPATCHED:
            datastore.workload_handle_dispatched_request(workload, ticket.wait_time)
            clock.call_later(record.arrival.service, lambda: finish(ticket, workload))
        else:
            datastore.workload_handle_completed_request(workload)

    def finish(ticket: Ticket, workload: str) -> None:
        ticket.close()
        datastore.workload_handle_completed_request(workload)

    flow = FlowController(
        policy(datastore, clock),
        clock,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        on_decided=decided,
    )

    def arrive(arrival: Arrival) -> None:
        record = Record(arrival)
        records.append(record)
        arriving.append(record)
        datastore.workload_handle_new_request(arrival.workload)
        ticket = flow.enqueue(FlowRequest(arrival.workload, arrival.criticality))
        by_ticket[ticket] = record

    for arrival in arrivals:
        clock.call_later(arrival.at, lambda a=arrival: arrive(a))  # type: ignore[misc]
    clock.advance(until)
    return Run(records, flow, registry, clock)


def periodic(workload: str, every: float, start: float, stop: float, **kw: float) -> list[Arrival]:
    count = int((stop - start) / every)
    return [Arrival(start + i * every, workload, **kw) for i in range(count)]  # type: ignore[arg-type]
