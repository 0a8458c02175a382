"""The `metrics` capacity gate: dispatch while the model servers say they are not saturated.

Algorithm
- Each endpoint (a model server's Prometheus `/metrics`) is scraped every
  interval (see `scraper`). A scrape gives `waiting` (requests queued inside
  the server) and, when exported, `kv` (KV-cache utilisation, 0..1).
- Credit: a scrape is old news the moment it lands. Requests dispatched since
  that scrape began will join the server's queue unless a running request
  finished; so the gate counts `waiting + dispatched - completed` since the
  scrape, shared evenly over the fresh endpoints, as Envoy spreads requests
  over them. Requests take a moment (`transit`) to travel between this
  service and the server, so every uncertainty is settled towards "fuller":
  dispatches are counted from `transit` before the scrape was sent (they may
  not have arrived when the server answered), completions only from
  `transit` after it landed (the server may have counted them already).
- saturation(endpoint) = max(estimated waiting / waiting threshold,
  kv / kv threshold); the pool's saturation is its worst fresh endpoint's.
  A request is dispatched only while the pool's saturation is below 1, and
  never past `--max-concurrency` when that is set.
- Staleness: an endpoint whose last good scrape is older than `stale_after`
  is ignored. When every endpoint is stale the gate is the static limit
  (`--max-concurrency`): old metrics never halt dispatch, nor open it wide.

Guarantee (one endpoint, its counts exact, every request through this gate):
the server's true waiting count never exceeds the threshold. With R running of
S slots at the scrape, the true count after d dispatches and c completions is
max(0, W + R + d - c - S) <= W + d - c, the estimate; a dispatch happens only
while the estimate is below the threshold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client.parser import text_string_to_metric_families

from extproc.capacity.static import Gate, StaticCapacity
from extproc.contracts import CapacityStatus, Clock, EndpointStatus

WAITING_METRICS = ("vllm:num_requests_waiting",)
KV_CACHE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING_METRICS = ("vllm:num_requests_running",)


@dataclass(frozen=True, slots=True)
class SaturationOptions:
    waiting_threshold: float = 5.0
    kv_cache_threshold: float = 0.8
    stale_after: float = 1.0
    """Seconds after which an endpoint's last good scrape no longer counts."""
    waiting_metrics: tuple[str, ...] = WAITING_METRICS
    """Accepted names of the waiting-requests gauge, first found wins (old and new vLLM)."""
    kv_cache_metrics: tuple[str, ...] = KV_CACHE_METRICS
    running_metrics: tuple[str, ...] = RUNNING_METRICS
    """Requests running in the server: shown per endpoint, not part of saturation."""
    credit: bool = True
    """Count dispatches since the last scrape. Off only to show what it prevents."""
    transit: float = 0.1
    """Seconds a request or a completion may take between this service and the server."""


@dataclass(frozen=True, slots=True)
class Reading:
    waiting: float
    kv_cache_usage: float | None
    running: float | None = None


class MetricsError(ValueError):
    """The scraped text lacks the waiting-requests series, or cannot be parsed."""


def parse_reading(text: str, options: SaturationOptions) -> Reading:
    """The waiting count and KV-cache use in a Prometheus text page, summed over series."""
    wanted = (*options.waiting_metrics, *options.kv_cache_metrics, *options.running_metrics)
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


class _Endpoint:
    __slots__ = (
        "completed_mark",
        "dispatched_mark",
        "errors",
        "failing",
        "last_error",
        "pending_mark",
        "read_at",
        "reading",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.reading: Reading | None = None
        self.read_at: float | None = None
        self.pending_mark = 0
        self.dispatched_mark = 0
        self.completed_mark = 0
        self.errors = 0
        self.last_error = ""
        self.failing = False


class MetricsCapacity(Gate):
    name = "metrics"

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
        self._endpoints = {url: _Endpoint(url) for url in urls}
        self._clock = clock
        self._fallback = fallback
        self.options = options or SaturationOptions()
        self._dispatched = 0
        self._completed = 0
        self._recent_dispatches: deque[float] = deque()
        """Times of the dispatches of the last `transit` seconds."""
        self._was_fallback = False
        self._log = structlog.get_logger("extproc.capacity.static")

    @property
    def urls(self) -> list[str]:
        return list(self._endpoints)

    def begin_scrape(self, url: str) -> None:
        self._forget_dispatches_before(self._clock.now() - self.options.transit)
        self._endpoints[url].pending_mark = self._dispatched - len(self._recent_dispatches)

    def end_scrape(self, url: str, reading: Reading) -> None:
        endpoint = self._endpoints[url]
        endpoint.reading = reading
        endpoint.read_at = self._clock.now()
        endpoint.dispatched_mark = endpoint.pending_mark
        endpoint.completed_mark = self._completed
        if endpoint.failing:
            endpoint.failing = False
            self._log.info("backend metrics recovered", endpoint=url)
        self._wake()

    def fail_scrape(self, url: str, error: str) -> None:
        endpoint = self._endpoints[url]
        endpoint.errors += 1
        endpoint.last_error = error
        if not endpoint.failing:
            endpoint.failing = True
            self._log.warning("backend metrics scrape failed", endpoint=url, error=error)
        # Going stale may hand control to the static limit, which may have room.
        self._wake()

    def has_room(self, in_flight: int) -> bool:
        saturation = self._saturation()
        if saturation is None:
            return self._fallback.has_room(in_flight)
        ceiling = self._fallback.limit
        return saturation < 1.0 and (ceiling == 0 or in_flight < ceiling)

    def on_dispatch(self) -> None:
        self._dispatched += 1
        now = self._clock.now()
        self._recent_dispatches.append(now)
        self._forget_dispatches_before(now - self.options.transit)

    def on_release(self) -> None:
        self._completed += 1
        landed_after = self._clock.now() - self.options.transit
        for endpoint in self._endpoints.values():
            if endpoint.read_at is not None and endpoint.read_at > landed_after:
                endpoint.completed_mark += 1  # maybe in its reading already: not credited

    def _forget_dispatches_before(self, horizon: float) -> None:
        recent = self._recent_dispatches
        while recent and recent[0] < horizon:
            recent.popleft()

    def status(self) -> CapacityStatus:
        now = self._clock.now()
        fresh = self._fresh(now)
        endpoints = tuple(
            EndpointStatus(
                url=e.url,
                waiting=e.reading.waiting if e.reading else None,
                kv_cache_usage=e.reading.kv_cache_usage if e.reading else None,
                saturation=self._endpoint_saturation(e, len(fresh)) if e in fresh else None,
                age=None if e.read_at is None else now - e.read_at,
                errors=e.errors,
                last_error=e.last_error,
            )
            for e in self._endpoints.values()
        )
        saturation = self._saturation()
        return CapacityStatus(
            self.name,
            self._fallback.limit,
            saturation=saturation,
            fallback=saturation is None,
            endpoints=endpoints,
        )

    def _fresh(self, now: float) -> list[_Endpoint]:
        horizon = now - self.options.stale_after
        return [
            e for e in self._endpoints.values() if e.read_at is not None and e.read_at >= horizon
        ]

    def _saturation(self) -> float | None:
        fresh = self._fresh(self._clock.now())
        if not fresh:
            if not self._was_fallback:
                self._was_fallback = True
                self._log.warning(
                    "no fresh backend metrics: static limit in force", limit=self._fallback.limit
                )
            return None
        if self._was_fallback:
            self._was_fallback = False
            self._log.info("backend metrics fresh again: saturation gate in force")
        return max(self._endpoint_saturation(e, len(fresh)) for e in fresh)

    def _endpoint_saturation(self, endpoint: _Endpoint, sharing: int) -> float:
        reading = endpoint.reading
        assert reading is not None
        waiting = reading.waiting
        if self.options.credit:
            credit = (self._dispatched - endpoint.dispatched_mark) - (
                self._completed - endpoint.completed_mark
            )
            waiting = max(0.0, waiting + credit / sharing)
        return saturation_of(waiting, reading.kv_cache_usage, self.options)


def saturation_of(
    waiting: float, kv_cache_usage: float | None, options: SaturationOptions
) -> float:
    """One endpoint's saturation: max(waiting / threshold, KV-cache use / threshold)."""
    saturation = waiting / options.waiting_threshold
    if kv_cache_usage is not None:
        saturation = max(saturation, kv_cache_usage / options.kv_cache_threshold)
    return saturation
