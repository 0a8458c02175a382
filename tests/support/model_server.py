"""A model server on a virtual clock, and the harness that puts the real flow
controller and a capacity gate in front of it.

The server has `slots` requests running at once; the rest wait in its own
FIFO, where no fairness applies. A running request sends its first byte
`ttft` seconds after it starts and finishes after its service time. Its
metrics page is vLLM's, as of the instant it is read.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from extproc.capacity.saturation import MetricsCapacity, Reading
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry

Job = tuple[Callable[[], None], Callable[[], None], float]


class SimModelServer:
    def __init__(self, clock: VirtualClock, slots: int, ttft: float) -> None:
        self.clock = clock
        self.slots = slots
        self.ttft = ttft
        self.running = 0
        self.waiting: deque[Job] = deque()
        self.max_waiting = 0

    def submit(
        self, first_byte: Callable[[], None], done: Callable[[], None], service: float
    ) -> None:
        self.waiting.append((first_byte, done, service))
        self.max_waiting = max(self.max_waiting, self._start_next())

    def reading(self) -> Reading:
        return Reading(waiting=len(self.waiting), kv_cache_usage=None)

    def _start_next(self) -> int:
        while self.waiting and self.running < self.slots:
            first_byte, done, service = self.waiting.popleft()
            self.running += 1
            self.clock.call_later(self.ttft, first_byte)
            self.clock.call_later(self.ttft + service, lambda d=done: self._finish(d))  # type: ignore[misc]
        return len(self.waiting)

    def _finish(self, done: Callable[[], None]) -> None:
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
        self, clock: VirtualClock, server: SimModelServer, capacity: Capacity, service: float
    ) -> None:
        self.clock = clock
        self.server = server
        self.service = service
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

    def scrape_every(
        self, gate: MetricsCapacity, interval: float, delay: float, until: float
    ) -> None:
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
            self.server.submit(ticket.first_byte, ticket.close, service)
