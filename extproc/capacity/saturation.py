"""The `metrics` capacity gate: keep each model server's slots full and its own queue
at the threshold, learning the slot count from what the server and the responses say.

Per endpoint (`ServerLoad`; the endpoint picker keeps one per endpoint too)
- Signals. A scrape (every interval, see `scraper`) reads the server's waiting
  W, running R (when exported) and KV-cache use. Between scrapes the service
  knows, live and exactly, its own requests to that server: I in flight
  (dispatched, not completed) and B of them started (their first response
  byte came back from the server -- `extproc.service` ignores replies Envoy
  makes itself, such as a 503 on a refused connection -- so the server ran
  them; a request that ends without one never counted in B, so it is not
  taken out of it).
- Slots S, the server's concurrency, learnt from the data (0 before any):
  a scrape with W = 0 says S >= R, and proves P = max(P, R). While the latest
  scrape showed no queue a first byte says S >= B, but only up to P + the
  threshold, and only up to P once a scrape with the running gauge has
  caught the server queueing (R was then its true slot count): a completion
  still on its way back and the first byte of the request that took its
  slot cross, and B counts both. S rises to these at once. A scrape with
  W > 0 says the server runs all it can, S = R = P (fewer when KV-cache
  bound) -- unless it caught the server between two scheduler steps: vLLM
  takes its gauges after each step, once finished requests have left and
  before waiting ones are admitted, so a snapshot may read fewer running
  than the next step runs (1 of 2 with 2 waiting, in 12-18% of snapshots
  against a real vLLM). So one such scrape lowers nothing; at the second in
  a row S falls half-way to the larger running of the two (a real loss
  shows in both), whole requests at a time. While the server queues, first
  bytes are not evidence.
- Without a running series R is estimated as min(I throughout the scrape,
  B once first bytes arrive) - W: only what was surely there when the page
  was rendered (dispatches during the scrape may not have arrived).
- Foreign load F, what the server holds that this service did not send (other
  replicas, direct traffic): at each scrape F = max(0, W + R - I), with I at
  its highest while the scrape was out (so F is never overstated by our own
  dispatches).
- The rule: the server's estimated queue is I + F - S; it may take
  room = floor(threshold + S - I - F) more whole requests (a threshold of 2.5
  lets 2 queue, never 3), and none while its KV-cache use is at or above its
  threshold. A completion frees room at once and a first byte may raise S at
  once: scrapes set S, P and F but do not pace dispatch.

Guarantees (one endpoint, requests only through this service, exact counts)
- Bounded queue: while S <= the true slot count, the server's queue
  max(0, I + F - S_true) <= I + F - S <= threshold at every dispatch. Late
  completions can lift S above the truth only through first bytes, by at
  most the threshold above a scrape-proven R (<= S_true), and not at all
  once a scrape with the running gauge has seen the server queue: the queue
  may reach twice the threshold during the cold start, or without the
  gauge, until the next scrape shows it; in steady state with the gauge it
  stays at most the threshold, whatever the transit (as long as the server
  does not lose capacity, below). On the simulator (up to 5 ms of transit
  each way, with and without the gauge) the queue never passed the
  threshold; completions delayed by up to 200 ms kept it within it too.
- Work-conserving: while requests wait here the server holds S + threshold
  of them, so every slot is busy once S >= S_true - threshold. Below that
  the threshold's extra requests start and their first bytes raise S by up
  to the threshold per round trip, capped at P + threshold; each scrape
  lifts P to what runs, so from a cold start S reaches the truth in about
  S_true / (2 x threshold) intervals (the grid's warm-up spans 8). A server
  that gains capacity after it was caught full is followed by scrapes alone,
  by up to the threshold per interval.

Failure modes
- Transit: I counts a request from dispatch until its last byte is back, so
  a request on its way to or from the server holds a slot here while the
  server's slot is free. When throughput x transit time approaches the
  threshold, slots go idle: 64 slots of 50 ms behind 20 ms of transit each
  way are ~40% busy (docs/capacity_report.py --transit). Raise the threshold
  by the requests in transit (throughput x round trip) on such paths.
- S above the truth (the server lost capacity, e.g. KV-cache pressure; or
  late completions): the queue may reach threshold + (S - S_true) until two
  scrapes in a row show W > 0; then the excess halves every scrape.
- First byte only at the end (a non-streaming server behind a buffering
  proxy): B rises only with R at scrapes, so S ramps by up to the threshold
  per interval, as the old gate did at all times; steady state is unaffected.
- Foreign load is seen only by scrapes: other replicas dispatching in the
  same interval can each fill the same free slots (replicas x threshold).

Pool (`MetricsCapacity`): Envoy spreads requests over the endpoints and the
service does not learn which went where, so every endpoint is charged an
equal share of each event; a request is dispatched while every fresh endpoint
has room for its share (headroom >= 1/N), never past `--max-concurrency`
when set. A first byte may come from any endpoint, so with several only the
scrapes set S (S ramps by up to the threshold per interval, as without first
bytes), and the bounds above hold per endpoint only as far as the balancer
spreads evenly: round robin over unequal servers, or requests of unequal
length, can put more than its share on one and queue there beyond the
threshold until its scrape shows it. An endpoint whose last good scrape is
older than `stale_after` is ignored; when every endpoint is, the static limit
(`--max-concurrency`) rules: old metrics never halt dispatch, nor open it
wide.

Measured on the simulator (docs/capacity_report.py; the same grid, longer
warm-up, in tests/capacity/test_saturation.py, with up to 5 ms of transit and
without the running gauge too): 4 and 64 slots, mean service times 50 ms-10 s,
scrapes every 50 ms-1 s, arrivals at 1.5x capacity: every slot busy and the
server's queue at the threshold, never above -- except where the cold-start
ramp (paced by scrapes) is long against the 300-request run: 64 slots of
50 ms scraped every second, 96% busy (82% without the running gauge).
The previous rule (every dispatch since the scrape counted as
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


MAX_METRIC_VALUE = 1e9


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
    reading = Reading(
        waiting,
        _first(values, options.kv_cache_metrics, max),
        _first(values, options.running_metrics, sum),
    )
    # NaN, infinity or sums that overflow would poison every comparison downstream
    # (room, scores, ties): no server runs or queues more than a billion requests.
    values_read = (reading.waiting, reading.kv_cache_usage, reading.running)
    if not all(0 <= v <= MAX_METRIC_VALUE for v in values_read if v is not None):
        raise MetricsError(f"a value out of range in the metrics: {reading}")
    return reading


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
        "_learns_from_first_bytes",
        "_low_in_flight",
        "_options",
        "_peak_in_flight",
        "_proven",
        "_queued_running",
        "_seen_first_byte",
        "_seen_queue",
        "errors",
        "foreign",
        "in_flight",
        "last_error",
        "read_at",
        "reading",
        "slots",
        "started_in_flight",
    )

    def __init__(
        self, clock: Clock, options: SaturationOptions, *, learns_from_first_bytes: bool = True
    ) -> None:
        self._clock = clock
        self._options = options
        self._learns_from_first_bytes = learns_from_first_bytes
        """False when the caller only guesses which requests went here (shares): then a
        first byte may belong to another server and only scrapes set S."""
        self.reading: Reading | None = None
        self.read_at: float | None = None
        self.in_flight = 0.0
        self.started_in_flight = 0.0
        self.slots = 0.0
        """The learnt slot count S."""
        self._proven = 0.0
        """The most running a scrape confirmed the server can hold; first bytes raise S
        at most the threshold above it."""
        self._queued_running: float | None = None
        """What the latest scrape read as running if it also read a queue, else None."""
        self._seen_first_byte = False
        self._seen_queue = False
        """A scrape has caught the server queueing with its running gauge, which was then
        its true slot count: from then on first bytes may not take S past what scrapes
        proved."""
        self.foreign = 0.0
        self._peak_in_flight: float | None = None
        """The most in flight since the pending scrape was sent; None: no scrape out."""
        self._low_in_flight: float | None = None
        """The fewest in flight since the pending scrape was sent."""
        self.errors = 0
        self.last_error = ""

    def begin_read(self) -> None:
        self._peak_in_flight = self._low_in_flight = self.in_flight

    def read(self, reading: Reading) -> None:
        peak = self.in_flight if self._peak_in_flight is None else self._peak_in_flight
        low = self.in_flight if self._low_in_flight is None else self._low_in_flight
        self._peak_in_flight = self._low_in_flight = None
        running = reading.running
        if running is None:
            # Only what was surely there when the page was rendered, and, once first
            # bytes are seen to arrive, only what they prove started.
            running = max(0.0, low - reading.waiting)
            if self._seen_first_byte:
                running = min(running, self.started_in_flight)
        if reading.waiting > 0:
            # One snapshot between two scheduler steps must not pull S down: a loss
            # of slots is believed once two scrapes in a row read a queue.
            before = self._queued_running
            held = max(running, self.slots if before is None else before)
            excess = max(0.0, self.slots - held)
            self.slots = held + math.floor(excess / 2)
            self._proven = max(running, before or 0.0)
            self._queued_running = running
            # An estimated R (no gauge) may be short by requests in transit: no pin.
            self._seen_queue = reading.running is not None
        else:
            self._queued_running = None
            self.slots = max(self.slots, running)
            self._proven = max(self._proven, running)
        self.foreign = max(0.0, reading.waiting + running - peak)
        self.reading = reading
        self.read_at = self._clock.now()

    def fail(self, error: str) -> None:
        self._peak_in_flight = self._low_in_flight = None
        self.errors += 1
        self.last_error = error

    def dispatched(self, share: float = 1.0) -> None:
        self.in_flight += share
        if self._peak_in_flight is not None:
            self._peak_in_flight = max(self._peak_in_flight, self.in_flight)

    def started(self, share: float = 1.0) -> bool:
        """Count a first byte; True when it raised the slot estimate (room may have grown)."""
        self._seen_first_byte = True
        self.started_in_flight = min(self.started_in_flight + share, self.in_flight)
        queueing = self.reading is not None and self.reading.waiting > 0
        if queueing or not self._learns_from_first_bytes:
            return False
        # A completion still on its way back leaves B one too high per request in
        # transit: first bytes never take S past what a scrape proved, plus the
        # threshold while the server has never been seen full (the cold start).
        margin = 0.0 if self._seen_queue else self._options.waiting_threshold
        raised = min(self.started_in_flight, self._proven + margin)
        if raised > self.slots + _EPSILON:
            self.slots = raised
            return True
        return False

    def completed(self, share: float = 1.0, *, started: bool = True) -> None:
        """Count a request's end; `started`: its first byte was counted (`started`)."""
        self.in_flight = max(0.0, self.in_flight - share)
        if self._low_in_flight is not None:
            self._low_in_flight = min(self._low_in_flight, self.in_flight)
        if started:
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
        """Whole requests it can take now without its queue passing the threshold: 0 when
        stale or saturated (a threshold of 2.5 lets the queue reach 2, never 3)."""
        if not self.fresh():
            return 0
        return max(0, math.floor(self.headroom() + _EPSILON))

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
        learns = len(urls) == 1  # behind round robin a first byte may be another's
        self._servers = {
            url: ServerLoad(clock, self.options, learns_from_first_bytes=learns) for url in urls
        }
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
        # Each endpoint may be charged this dispatch's share: it must fit whole.
        return all(server.headroom() >= self._share - _EPSILON for server in fresh)

    def on_dispatch(self) -> None:
        for server in self._servers.values():
            server.dispatched(self._share)

    def on_latency(self, seconds: float, dispatched_at: float) -> None:
        grew = False
        for server in self._servers.values():
            grew = server.started(self._share) or grew
        if grew:
            self._wake()

    def on_release(self, started: bool) -> None:
        for server in self._servers.values():
            server.completed(self._share, started=started)

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
