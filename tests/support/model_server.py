"""A model server on a virtual clock, and the harness that puts the real flow
controller and a capacity gate in front of it.

The server has `slots` requests running at once; the rest wait in its own
FIFO, where no fairness applies. A running request sends its first byte
`ttft` seconds after it starts and finishes after its service time. Its
metrics page is vLLM's (waiting and running), as of the instant it is read.
It integrates its running and waiting counts over time, exactly, for
utilisation and mean-queue figures.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from extproc.capacity.saturation import Reading
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry

Job = tuple[Callable[[], None], Callable[[], None], float]


@runtime_checkable
class Scraped(Protocol):
    """A gate fed by scrapes (`MetricsCapacity`, or an older version of it to compare)."""

    def begin_scrape(self, url: str) -> None: ...

    def end_scrape(self, url: str, reading: Reading) -> None: ...


class SimModelServer:
    def __init__(self, clock: VirtualClock, slots: int, ttft: float) -> None:
        self.clock = clock
        self.slots = slots
        self.ttft = ttft
        self.running = 0
        self.waiting: deque[Job] = deque()
        self.max_waiting = 0
        self.busy_area = 0.0
        """Integral of `running` over time, since `reset_areas`."""
        self.waiting_area = 0.0
        self._area_since = clock.now()
        self._areas_from = clock.now()

    def reset_areas(self) -> None:
        """Start the integrals afresh (after a warm-up)."""
        self._integrate()
        self.busy_area = self.waiting_area = 0.0
        self._areas_from = self.clock.now()

    def utilisation(self) -> float:
        """Mean fraction of slots busy since `reset_areas`."""
        self._integrate()
        return self.busy_area / (self.slots * (self.clock.now() - self._areas_from))

    def mean_waiting(self) -> float:
        self._integrate()
        return self.waiting_area / (self.clock.now() - self._areas_from)

    def _integrate(self) -> None:
        now = self.clock.now()
        self.busy_area += self.running * (now - self._area_since)
        self.waiting_area += len(self.waiting) * (now - self._area_since)
        self._area_since = now

    def submit(
        self, first_byte: Callable[[], None], done: Callable[[], None], service: float
    ) -> None:
        self._integrate()
        self.waiting.append((first_byte, done, service))
        self.max_waiting = max(self.max_waiting, self._start_next())

    def reading(self) -> Reading:
        return Reading(waiting=len(self.waiting), kv_cache_usage=None, running=self.running)

    def _start_next(self) -> int:
        while self.waiting and self.running < self.slots:
            first_byte, done, service = self.waiting.popleft()
            self.running += 1
            self.clock.call_later(self.ttft, first_byte)
            self.clock.call_later(self.ttft + service, lambda d=done: self._finish(d))  # type: ignore[misc]
        return len(self.waiting)

    def _finish(self, done: Callable[[], None]) -> None:
        self._integrate()
        self.running -= 1
        done()
        self._start_next()


@dataclass
class Trace:
    """What the harness sampled once per virtual second."""

    limit: list[int] = field(default_factory=list)
    backend_waiting: list[int] = field(default_factory=list)
    backend_running: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    dispatched: int = 0


class Harness:
    """Poisson arrivals -> the real FlowController (fcfs) with `capacity` -> the model server."""

    def __init__(
        self,
        clock: VirtualClock,
        server: SimModelServer,
        capacity: Capacity,
        service: float,
        *,
        first_bytes: bool = True,
    ) -> None:
        self.clock = clock
        self.server = server
        self.service = service
        self.first_bytes = first_bytes
        """False: the service never sees a first byte before the end (a buffered answer)."""
        self.rng = random.Random(7)
        self.trace = Trace()
        registry = InMemoryWorkloadRegistry(clock)
        policy = make_policy("fcfs", RegistryDatastore(registry), clock)
        self.flow = FlowController(
            policy, clock, capacity=capacity, max_queue=1_000_000, queue_timeout=None,
            on_decided=self._decided,
        )  # fmt: skip

    def arrivals(self, rate: float, until: float) -> None:
        t = self.clock.now()
        while True:
            t += self.rng.expovariate(rate)
            if t >= until:
                return
            self.clock.call_later(t - self.clock.now(), self._arrive)

    def burst(self, count: int, at: float) -> None:
        for _ in range(count):
            self.clock.call_later(at - self.clock.now(), self._arrive)

    def sample_every(self, seconds: float, until: float) -> None:
        def sample() -> None:
            self.trace.limit.append(self.flow.max_concurrency)
            self.trace.backend_waiting.append(len(self.server.waiting))
            self.trace.backend_running.append(self.server.running)
            self.trace.queued.append(self.flow.queued)
            if self.clock.now() + seconds < until:
                self.clock.call_later(seconds, sample)

        self.clock.call_later(seconds, sample)

    def scrape_every(self, gate: Scraped, interval: float, delay: float, until: float) -> None:
        """Scrape the server as `scraper.Scraper` does: the reading is taken half-way
        through a scrape that takes `delay` seconds."""

        def scrape() -> None:
            gate.begin_scrape("sim")
            reading: list[Reading] = []
            self.clock.call_later(delay / 2, lambda: reading.append(self.server.reading()))
            self.clock.call_later(delay, lambda: gate.end_scrape("sim", reading[0]))
            if self.clock.now() + interval < until:
                self.clock.call_later(interval, scrape)

        self.clock.call_later(0.0, scrape)

    def _arrive(self) -> None:
        self.flow.enqueue(FlowRequest("tenant", 3))

    def _decided(self, ticket: Ticket) -> None:
        if ticket.outcome is Outcome.DISPATCHED:
            self.trace.dispatched += 1
            service = self.rng.expovariate(1.0 / self.service)
            first_byte = ticket.first_byte if self.first_bytes else lambda: None
            self.server.submit(first_byte, ticket.close, service)


@dataclass(frozen=True)
class Scenario:
    """A server of `slots` flooded at `overload` x its capacity for `duration` service times."""

    slots: int
    service: float
    """Mean service time, s (exponential); the first byte comes after a tenth of it."""
    interval: float
    """Seconds between scrapes."""
    threshold: float
    overload: float = 1.5
    first_bytes: bool = True
    """False: no first byte reaches the gate (a non-streaming server)."""
    duration: float = 300.0
    warm_up: float = 0.1
    """The fraction of the run left out of the figures."""


@dataclass(frozen=True)
class Result:
    utilisation: float
    mean_waiting: float
    """Mean requests waiting inside the server, over time."""
    max_waiting: int
    dispatched: int


GateFactory = Callable[[VirtualClock, Scenario], Capacity]


def run_scenario(scenario: Scenario, make_gate: GateFactory) -> Result:
    """Flood the simulated server through `make_gate`'s gate; scrape it if the gate scrapes."""
    clock = VirtualClock()
    until = scenario.duration * scenario.service
    server = SimModelServer(clock, scenario.slots, ttft=min(0.05, scenario.service / 10))
    gate = make_gate(clock, scenario)
    harness = Harness(clock, server, gate, scenario.service, first_bytes=scenario.first_bytes)
    harness.arrivals(scenario.overload * scenario.slots / scenario.service, until)
    if isinstance(gate, Scraped):
        delay = min(0.01, scenario.interval / 5)
        harness.scrape_every(gate, scenario.interval, delay, until)
    clock.advance(scenario.warm_up * until)
    server.reset_areas()
    server.max_waiting = 0
    clock.advance((1 - scenario.warm_up) * until)
    return Result(
        server.utilisation(), server.mean_waiting(), server.max_waiting, harness.trace.dispatched
    )
