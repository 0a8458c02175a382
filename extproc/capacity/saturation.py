"""The `metrics` capacity gate: keep each model server's slots full and its own queue
at the threshold, learning the slot count from what the server and the responses say.

Per endpoint (`ServerLoad`; the endpoint picker keeps one per endpoint too)
- Signals. A scrape (every interval, see `scraper`) reads the server's waiting
  W, running R (when exported) and KV-cache use. Between scrapes the service
  knows, live and exactly, its own requests to that server: I in flight
  (dispatched, not completed) and B of them started (their first response
  byte came back, so the server is running them).
- Slots S, the server's concurrency, learnt from the data (0 before any):
  a scrape with W = 0 says S >= R, and so, while the latest scrape showed no
  queue, does a first byte: S >= B. S rises to them at once. A scrape with
  W > 0 says the server runs all it can, S = R (fewer when KV-cache bound):
  S falls half-way to R, whole requests at a time (a decaying maximum, so one
  scrape that caught a request between two scheduler steps costs little).
  While the server queues, first bytes are not evidence: one request's last
  byte and the next one's first cross on their way back, and B would count
  both.
- Foreign load F, what the server holds that this service did not send (other
  replicas, direct traffic): at each scrape F = max(0, W + R - I), with I at
  its highest while the scrape was out (so F is never overstated by our own
  dispatches). Without a running series R is taken to be I - W, and F = 0.
- The rule: the server's estimated queue is I + F - S; it may take
  room = ceil(threshold + S - I - F) more (none below 0), and none while its
  KV-cache use is at or above its threshold. A completion frees room at once
  (I drops) and a first byte may raise S at once: scrapes set S and F but do
  not pace dispatch.

Guarantees (one endpoint, requests only through this service, exact counts)
- Bounded queue: with S <= the true slot count, the server's queue
  max(0, I + F - S_true) <= I + F - S <= threshold at every dispatch.
- Work-conserving: while requests wait here the server holds S + threshold
  of them, so every slot is busy once S >= S_true - threshold; below that the
  threshold's extra requests start, their first bytes (or the next scrape's R)
  raise S by up to the threshold, one first-byte time (or one interval) at a
  time, so the gap closes in ceil((S_true - S) / threshold) rounds.

Failure modes
- S above the truth (the server lost capacity, e.g. KV-cache pressure): the
  queue may reach threshold + (S - S_true) until a scrape shows W > 0; then
  the excess halves every scrape.
- First byte only at the end (a non-streaming server behind a buffering
  proxy): B rises only with R at scrapes, so S ramps by up to the threshold
  per interval, as the old gate did at all times; steady state is unaffected.
- A request released without a first byte (reset before headers) leaves B
  one too low until B next reaches 0: S learns more slowly, never too high.
- Foreign load is seen only by scrapes: other replicas dispatching in the
  same interval can each fill the same free slots (replicas x threshold).
- I counts a request from dispatch until Envoy sees its last byte, not only
  while the server holds it: in transit it errs towards fuller.

Pool (`MetricsCapacity`): Envoy spreads requests over the endpoints and the
service does not learn which went where, so every endpoint is charged an
equal share of each event; a request is dispatched while every fresh endpoint
has room (the worst endpoint's saturation, max(estimated queue / threshold,
kv / kv threshold), is below 1), never past `--max-concurrency` when set. An
endpoint whose last good scrape is older than `stale_after` is ignored; when
every endpoint is, the static limit (`--max-concurrency`) rules: old metrics
never halt dispatch, nor open it wide.

Measured on the simulator (docs/capacity_report.py; the same grid, shorter,
in tests/capacity/test_saturation.py): 4 and 64 slots, mean service times
50 ms-10 s, scrapes every 50 ms-1 s, arrivals at 1.5x capacity: every slot
busy and the server's queue at the threshold, never above, in each of the 18
combinations. The previous rule (every dispatch since the scrape counted as
waiting) kept the slots 1-28% busy whenever service times were short against
the interval. End to end (bench/capacity.py, 4 slots, 200 ms): the throughput
of a static limit with 1.9 requests queued in the server instead of 33.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client.parser import text_string_to_metric_families

from extproc.capacity.static import Gate, StaticCapacity
from extproc.contracts import CapacityStatus, Clock, EndpointStatus

WAITING_METRICS = ("vllm:num_requests_waiting",)
RUNNING_METRICS = ("vllm:num_requests_running",)
KV_CACHE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_EPSILON = 1e-9
"""Shares of 1/N summed back up are not exact; room this small is none."""


@dataclass(frozen=True, slots=True)
class SaturationOptions:
    waiting_threshold: float = 5.0
    kv_cache_threshold: float = 0.8
    stale_after: float = 1.0
    """Seconds after which an endpoint's last good scrape no longer counts."""
    waiting_metrics: tuple[str, ...] = WAITING_METRICS
    """Accepted names of the waiting-requests gauge, first found wins (old and new vLLM)."""
    running_metrics: tuple[str, ...] = RUNNING_METRICS
    kv_cache_metrics: tuple[str, ...] = KV_CACHE_METRICS


@dataclass(frozen=True, slots=True)
class Reading:
    waiting: float
    kv_cache_usage: float | None
    running: float | None = None


class MetricsError(ValueError):
    """The scraped text lacks the waiting-requests series, or cannot be parsed."""


def parse_reading(text: str, options: SaturationOptions) -> Reading:
    """Waiting and running (summed over series) and KV-cache use in a Prometheus text page."""
    wanted = (*options.waiting_metrics, *options.running_metrics, *options.kv_cache_metrics)
    # A model server's page is mostly histograms; parse only the lines we read.
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                values.setdefault(sample.name, []).append(sample.value)
    except ValueError as error:
        raise MetricsError(f"unparsable metrics: {error}") from None
    waiting = _first(values, options.waiting_metrics, sum)
    if waiting is None:
        raise MetricsError(f"no {' or '.join(options.waiting_metrics)} in the metrics")
    return Reading(
        waiting,
        _first(values, options.kv_cache_metrics, max),
        _first(values, options.running_metrics, sum),
    )


def _first(
    values: dict[str, list[float]], names: Iterable[str], combine: Callable[[list[float]], float]
) -> float | None:
    for name in names:
        if name in values:
            return combine(values[name])
    return None


class ServerLoad:
    """One model server, as this service sees it: how many more requests it can take now.

    In: `begin_read` when a scrape is sent and `read` with its answer (or `fail`);
    `dispatched`, `started` (first response byte) and `completed` for each
    request sent to it, each with the share of the request charged here (1 when
    the caller knows the request went to this server). Out: `room()`, the
    requests it can take before its queue passes the threshold (0 when stale
    or saturated), `saturation()` and `fresh()`. The rule is the module's.
    """

    __slots__ = (
        "_clock",
        "_options",
        "_peak_in_flight",
        "errors",
        "foreign",
        "in_flight",
        "last_error",
        "read_at",
        "reading",
        "slots",
        "started_in_flight",
    )

    def __init__(self, clock: Clock, options: SaturationOptions) -> None:
        self._clock = clock
        self._options = options
        self.reading: Reading | None = None
        self.read_at: float | None = None
        self.in_flight = 0.0
        self.started_in_flight = 0.0
        self.slots = 0.0
        """The learnt slot count S."""
        self.foreign = 0.0
        self._peak_in_flight: float | None = None
        """The most in flight since the pending scrape was sent; None: no scrape out."""
        self.errors = 0
        self.last_error = ""

    def begin_read(self) -> None:
        self._peak_in_flight = self.in_flight

    def read(self, reading: Reading) -> None:
        ours = self.in_flight if self._peak_in_flight is None else self._peak_in_flight
        self._peak_in_flight = None
        running = reading.running
        if running is None:
            running = max(0.0, ours - reading.waiting)
        if reading.waiting > 0:
            excess = max(0.0, self.slots - running)
            self.slots = running + math.floor(excess / 2)
        else:
            self.slots = max(self.slots, running)
        self.foreign = max(0.0, reading.waiting + running - ours)
        self.reading = reading
        self.read_at = self._clock.now()

    def fail(self, error: str) -> None:
        self._peak_in_flight = None
        self.errors += 1
        self.last_error = error

    def dispatched(self, share: float = 1.0) -> None:
        self.in_flight += share
        if self._peak_in_flight is not None:
            self._peak_in_flight = max(self._peak_in_flight, self.in_flight)

    def started(self, share: float = 1.0) -> bool:
        """Count a first byte; True when it raised the slot estimate (room may have grown)."""
        self.started_in_flight = min(self.started_in_flight + share, self.in_flight)
        queueing = self.reading is not None and self.reading.waiting > 0
        if not queueing and self.started_in_flight > self.slots + _EPSILON:
            self.slots = self.started_in_flight
            return True
        return False

    def completed(self, share: float = 1.0) -> None:
        self.in_flight = max(0.0, self.in_flight - share)
        # Most requests end after their first byte; one that did not makes B low, not high.
        self.started_in_flight = max(0.0, self.started_in_flight - share)

    def fresh(self) -> bool:
        return self.read_at is not None and (
            self.read_at >= self._clock.now() - self._options.stale_after
        )

    def queue(self) -> float:
        """The server's estimated queue: requests held beyond its slots."""
        return max(0.0, self.in_flight + self.foreign - self.slots)

    def headroom(self) -> float:
        """Requests it can take before its queue passes the threshold; <= 0: none."""
        reading = self.reading
        if reading is None:
            return 0.0
        kv = reading.kv_cache_usage
        if kv is not None and kv >= self._options.kv_cache_threshold:
            return 0.0
        return self._options.waiting_threshold + self.slots - self.in_flight - self.foreign

    def room(self) -> int:
        """Whole requests it can take now: 0 when stale or saturated."""
        if not self.fresh():
            return 0
        return max(0, math.ceil(self.headroom() - _EPSILON))

    def saturation(self) -> float:
        """max(queue / threshold, kv / kv threshold): dispatch only below 1."""
        options = self._options
        saturation = self.queue() / options.waiting_threshold
        kv = self.reading.kv_cache_usage if self.reading is not None else None
        if kv is not None:
            saturation = max(saturation, kv / options.kv_cache_threshold)
        return saturation


class MetricsCapacity(Gate):
    name = "metrics"
    wants_first_byte = True

    def __init__(
        self,
        urls: Sequence[str],
        clock: Clock,
        fallback: StaticCapacity,
        options: SaturationOptions | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("the metrics gate needs at least one endpoint")
        self.options = options or SaturationOptions()
        self._servers = {url: ServerLoad(clock, self.options) for url in urls}
        self._share = 1.0 / len(urls)
        self._clock = clock
        self._fallback = fallback
        self._failing: set[str] = set()
        self._was_fallback = False
        self._log = structlog.get_logger("extproc.capacity.static")

    @property
    def urls(self) -> list[str]:
        return list(self._servers)

    def server(self, url: str) -> ServerLoad:
        return self._servers[url]

    def begin_scrape(self, url: str) -> None:
        self._servers[url].begin_read()

    def end_scrape(self, url: str, reading: Reading) -> None:
        self._servers[url].read(reading)
        if url in self._failing:
            self._failing.discard(url)
            self._log.info("backend metrics recovered", endpoint=url)
        self._wake()

    def fail_scrape(self, url: str, error: str) -> None:
        self._servers[url].fail(error)
        if url not in self._failing:
            self._failing.add(url)
            self._log.warning("backend metrics scrape failed", endpoint=url, error=error)
        # Going stale may hand control to the static limit, which may have room.
        self._wake()

    def has_room(self, in_flight: int) -> bool:
        fresh = self._fresh()
        if not fresh:
            return self._fallback.has_room(in_flight)
        ceiling = self._fallback.limit
        if ceiling and in_flight >= ceiling:
            return False
        return all(server.headroom() > _EPSILON for server in fresh)

    def on_dispatch(self) -> None:
        for server in self._servers.values():
            server.dispatched(self._share)

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        grew = False
        for server in self._servers.values():
            grew = server.started(self._share) or grew
        if grew:
            self._wake()

    def on_release(self) -> None:
        for server in self._servers.values():
            server.completed(self._share)

    def status(self) -> CapacityStatus:
        endpoints = tuple(
            EndpointStatus(
                url=url,
                waiting=s.reading.waiting if s.reading else None,
                kv_cache_usage=s.reading.kv_cache_usage if s.reading else None,
                saturation=s.saturation() if s.fresh() else None,
                age=None if s.read_at is None else self._clock.now() - s.read_at,
                errors=s.errors,
                last_error=s.last_error,
                running=s.reading.running if s.reading else None,
                slots=s.slots if s.reading else None,
            )
            for url, s in self._servers.items()
        )
        fresh = self._fresh()
        saturation = max(s.saturation() for s in fresh) if fresh else None
        return CapacityStatus(
            self.name,
            self._fallback.limit,
            saturation=saturation,
            fallback=saturation is None,
            endpoints=endpoints,
        )

    def _fresh(self) -> list[ServerLoad]:
        fresh = [s for s in self._servers.values() if s.fresh()]
        if not fresh and not self._was_fallback:
            self._was_fallback = True
            self._log.warning(
                "no fresh backend metrics: static limit in force", limit=self._fallback.limit
            )
        elif fresh and self._was_fallback:
            self._was_fallback = False
            self._log.info("backend metrics fresh again: saturation gate in force")
        return fresh
