"""Pool simulator: the real flow controller, policy and endpoint pool, on a virtual clock.

Model
- Endpoints: model servers with a speed factor, `slots` requests running at
  once (more wait inside the server), a KV cache of `kv_tokens` and a prefix
  cache: an LRU of `cache_blocks` prompt blocks (the same chained 64-byte
  blocks the picker hashes, none of the picker's 256-block cap). A request's
  prefill costs `prefill_per_token` seconds per prompt token NOT in the cache,
  then it decodes `output_tokens` at `decode_per_token` each; both / speed.
- Tenants: Poisson arrivals; each tenant's prompts start with its context (a
  long text it shares with the tenants of its group) and end with a unique
  question. 4 characters make a token.
- The service's side is the real code: every arrival is enqueued in a
  `FlowController` with the policy and an `EndpointPool` of the chosen picker;
  each endpoint is scraped every `scrape_interval` (waiting, running, KV use),
  and a released request goes to the primary the pool named.

Reported per picker: TTFT (arrival to first token, queue wait included)
p50/p90, throughput (completions per second of the arrival period), prefix
hit rate (prompt blocks found in the server's cache / blocks prefilled), and
fairness: the mean Jain index over windows of each tenant's slot-seconds
against its demand-capped max-min fair share (`simulate`'s measure).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.capacity.saturation import Reading, SaturationOptions
from extproc.clock import VirtualClock
from extproc.contracts import PickRequest
from extproc.flowcontrol.policies import PolicyOptions, make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.pool.endpoints import EndpointOptions
from extproc.pool.picker import PICKERS, make_picker
from extproc.pool.pool import EndpointPool
from extproc.pool.prefix import BLOCK_BYTES, BlockHasher, PrefixCache
from extproc.pool.scorers import ScorerWeights
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from extproc.stats import percentile
from extproc.tools.simulate import Record, Request, Scenario, TenantSpec, _mean_jain, _windows

CHARS_PER_TOKEN = 4
ALL_BLOCKS = 1 << 20


@dataclass(frozen=True, slots=True)
class ServerSpec:
    speed: float = 1.0
    slots: int = 8
    kv_tokens: int = 64_000
    cache_blocks: int = 1_000


@dataclass(frozen=True, slots=True)
class TenantGroup:
    """`tenants` tenants sharing one context of `context_tokens` tokens."""

    name: str
    tenants: int
    rate: float
    """Requests per second, per tenant."""
    context_tokens: int = 4_000


@dataclass(frozen=True, slots=True)
class PoolScenario:
    name: str = "shared-prefix"
    seed: int = 1
    duration: float = 120.0
    servers: tuple[ServerSpec, ...] = (
        ServerSpec(1.0),
        ServerSpec(1.0),
        ServerSpec(0.75),
        ServerSpec(0.5),
    )
    groups: tuple[TenantGroup, ...] = (
        *(TenantGroup(f"team-{team}", 2, 2.0) for team in "abcde"),
        TenantGroup("flood", 1, 20.0),
    )
    """Ten tenants in five pairs sharing a context, and one that floods with its own."""
    question_tokens: int = 100
    output_tokens: int = 50
    prefill_per_token: float = 0.0002
    decode_per_token: float = 0.01
    scrape_interval: float = 0.1
    window: float = 10.0
    policy: str = "fair-share"
    scorers: str = "queue=2,kv-cache=2,prefix=3"


@dataclass(slots=True)
class _Job:
    tenant: str
    arrival: float
    prompt: str
    hashes: tuple[int, ...]
    ticket: Ticket | None = None
    first_token: float | None = None
    started: float | None = None
    done: float | None = None
    cached_blocks: int = 0


class _Server:
    def __init__(self, spec: ServerSpec, scenario: PoolScenario, clock: VirtualClock) -> None:
        self.spec = spec
        self._scenario = scenario
        self._clock = clock
        self.waiting: deque[_Job] = deque()
        self.running: set[int] = set()
        self._kv_used = 0
        self.cache = PrefixCache(spec.cache_blocks)

    def reading(self) -> Reading:
        return Reading(len(self.waiting), self._kv_used / self.spec.kv_tokens, len(self.running))

    def submit(self, job: _Job) -> None:
        self.waiting.append(job)
        self._start()

    def _start(self) -> None:
        while self.waiting and len(self.running) < self.spec.slots:
            job = self.waiting.popleft()
            job.started = self._clock.now()
            job.cached_blocks = self.cache.matched(job.hashes)
            self.cache.record(job.hashes)
            tokens = len(job.prompt) // CHARS_PER_TOKEN
            uncached = tokens - job.cached_blocks * BLOCK_BYTES // CHARS_PER_TOKEN
            speed = self.spec.speed
            prefill = uncached * self._scenario.prefill_per_token / speed
            decode = self._scenario.output_tokens * self._scenario.decode_per_token / speed
            self.running.add(id(job))
            self._kv_used += tokens + self._scenario.output_tokens
            self._clock.call_later(prefill, lambda j=job: self._first_token(j))  # type: ignore[misc]
            self._clock.call_later(prefill + decode, lambda j=job: self._finish(j))  # type: ignore[misc]

    def _first_token(self, job: _Job) -> None:
        job.first_token = self._clock.now()
        assert job.ticket is not None
        job.ticket.first_byte()

    def _finish(self, job: _Job) -> None:
        job.done = self._clock.now()
        self.running.discard(id(job))
        self._kv_used -= len(job.prompt) // CHARS_PER_TOKEN + self._scenario.output_tokens
        assert job.ticket is not None
        job.ticket.close()
        self._start()


@dataclass(frozen=True)
class PickerResult:
    picker: str
    ttft_p50: float
    ttft_p90: float
    throughput: float
    """Completions per second of the arrival period."""
    prefix_hit_rate: float
    jain: float
    completed: int
    arrived: int
    per_tenant_ttft_p90: dict[str, float] = field(repr=False)


def _arrivals(scenario: PoolScenario) -> list[_Job]:
    rng = random.Random(scenario.seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    jobs: list[_Job] = []
    hasher = BlockHasher(max_blocks=ALL_BLOCKS)
    for group in scenario.groups:
        context = "".join(
            rng.choice(letters) for _ in range(group.context_tokens * CHARS_PER_TOKEN)
        )
        for k in range(1, group.tenants + 1):
            tenant = f"{group.name}-{k}"
            t = 0.0
            while (t := t + rng.expovariate(group.rate)) < scenario.duration:
                question = "".join(
                    rng.choice(letters) for _ in range(scenario.question_tokens * CHARS_PER_TOKEN)
                )
                prompt = context + question
                jobs.append(_Job(tenant, t, prompt, hasher(prompt)))
    jobs.sort(key=lambda job: job.arrival)
    return jobs


def run(scenario: PoolScenario, picker: str, jobs: Sequence[_Job] | None = None) -> PickerResult:
    """One run of `scenario` with `picker`; every request drains before the numbers are taken."""
    jobs = [_Job(j.tenant, j.arrival, j.prompt, j.hashes) for j in jobs or _arrivals(scenario)]
    clock = VirtualClock()
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    servers = {
        f"10.0.0.{i + 1}:8000": _Server(s, scenario, clock) for i, s in enumerate(scenario.servers)
    }
    pool = EndpointPool(
        clock,
        make_picker(picker, ScorerWeights.parse(scenario.scorers)),
        EndpointOptions(SaturationOptions()),
        rng=random.Random(scenario.seed),
    )
    pool.update("sim", dict.fromkeys(servers, True))
    by_ticket: dict[Ticket, _Job] = {}
    current: list[_Job] = []

    def decided(ticket: Ticket) -> None:
        job = by_ticket.get(ticket) or current[-1]
        job.ticket = ticket
        if ticket.outcome is Outcome.DISPATCHED:
            datastore.workload_handle_dispatched_request(job.tenant, ticket.wait_time)
            servers[ticket.endpoints[0]].submit(job)

    flow = FlowController(
        make_policy(scenario.policy, datastore, clock, PolicyOptions()),
        clock,
        pool=pool,
        max_queue=100_000,
        queue_timeout=None,
        on_decided=decided,
    )

    def arrive(job: _Job) -> None:
        current.append(job)
        datastore.workload_handle_new_request(job.tenant)
        ticket = flow.enqueue(FlowRequest(job.tenant, 3, PickRequest(prompt=job.prompt)))
        if ticket.outcome is None:
            by_ticket[ticket] = job

    def scrape() -> None:
        now = clock.now()
        for address, server in servers.items():
            endpoint = pool.endpoint(address)
            assert endpoint is not None
            endpoint.begin_scrape()
            endpoint.end_scrape(server.reading())
            pool.scraped(endpoint)
        if now < scenario.duration or flow.queued or flow.in_flight:
            clock.call_later(scenario.scrape_interval, scrape)

    for job in jobs:
        clock.call_later(job.arrival, lambda j=job: arrive(j))  # type: ignore[misc]
    clock.call_later(0.0, scrape)
    clock.advance(scenario.duration * 20)
    return _result(scenario, picker, jobs, servers)


def _result(
    scenario: PoolScenario, picker: str, jobs: list[_Job], servers: dict[str, _Server]
) -> PickerResult:
    done = [j for j in jobs if j.done is not None and j.first_token is not None]
    ttfts = [j.first_token - j.arrival for j in done if j.first_token is not None]
    blocks = sum(len(j.hashes) for j in done)
    tenants = sorted({j.tenant for j in jobs})
    per_tenant = {
        t: percentile(
            [j.first_token - j.arrival for j in done if j.tenant == t and j.first_token], 90
        )
        for t in tenants
    }
    return PickerResult(
        picker=picker,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        throughput=sum((j.done or 0.0) <= scenario.duration for j in done) / scenario.duration,
        prefix_hit_rate=sum(j.cached_blocks for j in done) / blocks if blocks else 0.0,
        jain=_jain(scenario, jobs, servers, tenants),
        completed=len(done),
        arrived=len(jobs),
        per_tenant_ttft_p90=per_tenant,
    )


def _jain(
    scenario: PoolScenario, jobs: list[_Job], servers: dict[str, _Server], tenants: list[str]
) -> float:
    """`simulate`'s windowed, demand-capped Jain index, over the slots of the whole pool."""
    slots = sum(server.spec.slots for server in servers.values())
    shape = Scenario(
        duration=scenario.duration,
        capacity=slots,
        window=scenario.window,
        tenants=[TenantSpec(name=t, rate=1.0) for t in tenants],
    )
    records = []
    for job in jobs:
        service = (job.done or 0.0) - (job.started or job.arrival)
        record = Record(Request(job.tenant, 3, job.arrival, max(service, 0.0)))
        if job.started is not None:
            # The server's slot is what the tenants share: count from when the job got one.
            record.outcome, record.wait = Outcome.DISPATCHED, job.started - job.arrival
        records.append(record)
    return _mean_jain(_windows(shape, records))


def compare(scenario: PoolScenario, pickers: Sequence[str] = PICKERS) -> list[PickerResult]:
    jobs = _arrivals(scenario)
    return [run(scenario, picker, jobs) for picker in pickers]


def table(results: Sequence[PickerResult]) -> str:
    lines = [
        "| Picker | TTFT p50 (s) | TTFT p90 (s) | Throughput (req/s) | Prefix hit rate | Jain |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.picker}` | {r.ttft_p50:.2f} | {r.ttft_p90:.2f} | {r.throughput:.1f} "
            f"| {r.prefix_hit_rate:.0%} | {r.jain:.3f} |"
        )
    return "\n".join(lines) + "\n"
