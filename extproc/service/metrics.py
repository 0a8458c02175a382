"""Prometheus metrics, on the admin listener's `/metrics`.

Per request (updated where the stream handler records each outcome):
  extproc_requests_total{outcome}             every request, by how it left
  extproc_rejections_total{reason}            requests answered without the backend
  extproc_queue_wait_seconds{outcome}         enqueue to decision
  extproc_dispatch_decision_seconds           time to pick the next request
  extproc_criticality_clamped_total           claims above a workload's max_criticality
  extproc_objective_unknown_total             x-gateway-inference-objective naming no
                                              objective of the pool (registered by app.py
                                              with --inference-pool)
  extproc_usage_tokens_total{kind}            prompt and completion tokens the responses'
                                              `usage` reported (--fair-share-cost tokens)
At scrape time (read from the queue and the registry, no request-path cost):
  extproc_queue_size, extproc_in_flight_requests, extproc_max_concurrency (the
  limit in force, whichever `--capacity` set it), extproc_tracked_workloads;
  the capacity gate's extproc_capacity_saturation and _fallback (metrics),
  extproc_capacity_latency_seconds and _min_latency_seconds (adaptive), and per
  model-server endpoint extproc_backend_waiting_requests, _running_requests,
  extproc_backend_slots (the gate's estimate), extproc_backend_kv_cache_usage,
  extproc_backend_scrape_age_seconds, extproc_backend_scrape_errors_total; with the Redis registry
  extproc_fleet_connected, _replicas, _sync_errors_total, _sync_age_seconds;
  with --workloads extproc_workloads_config_errors_total (edits rejected, the
  last good table kept) and extproc_workloads_config_reloads_total;
  with endpoint picking, per endpoint{endpoint="ip:port"} extproc_endpoint_ready,
  _in_flight_requests, _waiting_requests, _running_requests, _queue_depth,
  _kv_cache_usage, _saturation, _scrape_age_seconds, _picked_total,
  _prefix_hits_total, _scrape_errors_total (endpoints are bounded by discovery);
  and per workload -- the N busiest by request rate,
  the rest summed as workload="other", so cardinality stays bounded whatever
  ids clients send --
  extproc_workload_request_rate, extproc_workload_active_requests,
  extproc_workload_queued_requests, extproc_workload_average_wait_seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.context import OTHER_WORKLOADS
from extproc.contracts import CapacityStatus, FleetStatus, TokenCount
from extproc.pool.pool import PoolStatus
from extproc.service.readapi import WorkloadReader, WorkloadStatus
from extproc.workloads import Workloads

OTHER = OTHER_WORKLOADS  # a client cannot send this id (context refuses reserved ids)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)


class Metrics:
    def __init__(
        self,
        reader: WorkloadReader,
        top_workloads: int = 50,
        fleet: Callable[[], FleetStatus] | None = None,
        workloads: Workloads | None = None,
        pool: Callable[[], PoolStatus] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "extproc_requests",
            "Requests seen by the processor, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "extproc_rejections",
            "Requests answered without reaching the backend, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "extproc_queue_wait_seconds",
            "Time from enqueue until the queue decided, by outcome.",
            ["outcome"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.decision = Histogram(
            "extproc_dispatch_decision_seconds",
            "Time the policy took to choose the next request to dispatch.",
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self.clamped = Counter(
            "extproc_criticality_clamped",
            "Requests claiming a criticality above their workload's max_criticality.",
            registry=self.registry,
        )
        usage_tokens = Counter(
            "extproc_usage_tokens",
            "Tokens the responses' usage reported (--fair-share-cost tokens), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self._prompt_tokens = usage_tokens.labels("prompt")
        self._completion_tokens = usage_tokens.labels("completion")
        self.registry.register(_StateCollector(reader, top_workloads))
        if workloads is not None and workloads.path is not None:
            self.registry.register(_WorkloadsCollector(workloads))
        if fleet is not None:
            self.registry.register(_FleetCollector(fleet))
        if pool is not None:
            self.registry.register(_PoolCollector(pool))
        self._children: dict[str, tuple[Any, Any, Any]] = {}

    def record(self, outcome: str, queue_wait: float | None, rejected: bool) -> None:
        # Labelled children are looked up once per outcome, not once per request.
        children = self._children.get(outcome)
        if children is None:
            children = self._children[outcome] = (
                self.requests.labels(outcome),
                self.rejections.labels(outcome) if rejected else None,
                self.queue_wait.labels(outcome),
            )
        requests, rejections, queue_wait_histogram = children
        requests.inc()
        if rejections is not None:
            rejections.inc()
        if queue_wait is not None:
            queue_wait_histogram.observe(queue_wait)

    def count_usage(self, usage: TokenCount | None) -> None:
        if usage is not None:
            self._prompt_tokens.inc(usage.input)
            self._completion_tokens.inc(usage.output)


class _StateCollector(Collector):
    def __init__(self, reader: WorkloadReader, top: int) -> None:
        self._reader = reader
        self._top = top

    def collect(self) -> Iterable[Metric]:
        flow = self._reader.flow
        yield _gauge("extproc_queue_size", "Requests waiting in the queue.", flow.queued)
        yield _gauge(
            "extproc_in_flight_requests", "Requests dispatched, not completed.", flow.in_flight
        )
        capacity = flow.capacity.status()
        yield _gauge(
            "extproc_max_concurrency", "The in-flight limit in force; 0: none.", capacity.limit
        )
        yield from _capacity(capacity)
        statuses = self._reader.list()
        yield _gauge("extproc_tracked_workloads", "Workloads in the registry.", len(statuses))
        yield from self._per_workload(statuses)

    def _per_workload(self, statuses: list[WorkloadStatus]) -> Iterable[Metric]:
        ranked = sorted(statuses, key=lambda s: s.metrics.request_rate, reverse=True)
        families = _WorkloadFamilies()
        for status in ranked[: self._top]:
            families.add(status.metrics.workload_id, [status])
        if len(ranked) > self._top:
            families.add(OTHER, ranked[self._top :])
        return families.all()


class _FleetCollector(Collector):
    def __init__(self, status: Callable[[], FleetStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        yield _gauge("extproc_fleet_connected", "1 while syncs succeed.", status.connected)
        yield _gauge("extproc_fleet_replicas", "Live replicas at the last sync.", status.replicas)
        yield CounterMetricFamily(
            "extproc_fleet_sync_errors", "Syncs with Redis that failed.", value=status.errors
        )
        if status.age is not None:
            yield _gauge(
                "extproc_fleet_sync_age_seconds", "Time since the last good sync.", status.age
            )


class _WorkloadsCollector(Collector):
    def __init__(self, workloads: Workloads) -> None:
        self._workloads = workloads

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "extproc_workloads_config_errors",
            "Edits of the --workloads file rejected; the last good table stayed in force.",
            value=self._workloads.errors,
        )
        yield CounterMetricFamily(
            "extproc_workloads_config_reloads",
            "Edits of the --workloads file put in force.",
            value=self._workloads.reloads,
        )


class _PoolCollector(Collector):
    _GAUGES = (
        ("in_flight_requests", "in_flight", "Requests picked for the endpoint, not completed."),
        ("waiting_requests", "waiting", "Requests waiting in the server at the last scrape."),
        ("running_requests", "running", "Requests running in the server at the last scrape."),
        ("queue_depth", "queue_depth", "Estimated queue in the server; in flight if stale."),
        ("kv_cache_usage", "kv_cache_usage", "KV-cache use, 0..1, at the last scrape."),
        ("saturation", "saturation", "Saturation now, credit included; absent when stale."),
        ("scrape_age_seconds", "scrape_age", "Seconds since the last good scrape."),
    )
    _COUNTERS = (
        ("picked", "picked", "Requests picked for the endpoint as primary."),
        ("prefix_hits", "prefix_hits", "Picks whose prompt prefix the endpoint had seen."),
        ("scrape_errors", "scrape_errors", "Failed scrapes of the endpoint's metrics."),
    )

    def __init__(self, status: Callable[[], PoolStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        endpoints = self._status().endpoints
        labels = ["endpoint"]
        ready = GaugeMetricFamily("extproc_endpoint_ready", "1: picks may go here.", labels=labels)
        for e in endpoints:
            ready.add_metric([e.address], float(e.ready))
        yield ready
        for name, field, documentation in self._GAUGES:
            family = GaugeMetricFamily(f"extproc_endpoint_{name}", documentation, labels=labels)
            for e in endpoints:
                value = getattr(e, field)
                if value is not None:
                    family.add_metric([e.address], float(value))
            yield family
        for name, field, documentation in self._COUNTERS:
            counter = CounterMetricFamily(f"extproc_endpoint_{name}", documentation, labels=labels)
            for e in endpoints:
                counter.add_metric([e.address], float(getattr(e, field)))
            yield counter


class _WorkloadFamilies:
    def __init__(self) -> None:
        def family(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=["workload"])

        self.rate = family("extproc_workload_request_rate", "Requests per second.")
        self.active = family("extproc_workload_active_requests", "Queued plus in flight.")
        self.queued = family("extproc_workload_queued_requests", "Waiting in the queue.")
        self.wait = family("extproc_workload_average_wait_seconds", "EMA of the queue wait.")

    def add(self, label: str, group: list[WorkloadStatus]) -> None:
        dispatched = sum(s.metrics.dispatched_count for s in group)
        weighted = sum(s.metrics.average_wait_time * s.metrics.dispatched_count for s in group)
        self.rate.add_metric([label], sum(s.metrics.request_rate for s in group))
        self.active.add_metric([label], sum(s.metrics.active_requests for s in group))
        self.queued.add_metric([label], sum(s.queued_requests for s in group))
        self.wait.add_metric([label], weighted / dispatched if dispatched else 0.0)

    def all(self) -> list[Metric]:
        return [self.rate, self.active, self.queued, self.wait]


def _capacity(status: CapacityStatus) -> Iterable[Metric]:
    if status.mode == "metrics":
        if status.saturation is not None:
            yield _gauge(
                "extproc_capacity_saturation",
                "The worst model server's saturation, credit included; dispatch below 1.",
                status.saturation,
            )
        yield _gauge(
            "extproc_capacity_fallback",
            "1 while every model server's metrics are stale and the static limit rules.",
            float(status.fallback),
        )
        yield from _endpoints(status)
    if status.mode == "adaptive":
        for name, value, meaning in (
            ("latency", status.latency, "The latest window's median dispatch-to-first-byte time."),
            ("min_latency", status.min_latency, "The no-load dispatch-to-first-byte time."),
        ):
            if value is not None:
                yield _gauge(f"extproc_capacity_{name}_seconds", meaning, value)


def _endpoints(status: CapacityStatus) -> Iterable[Metric]:
    def family(name: str, documentation: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=["endpoint"])

    waiting = family("extproc_backend_waiting_requests", "Waiting in the server, last scrape.")
    running = family("extproc_backend_running_requests", "Running in the server, last scrape.")
    slots = family("extproc_backend_slots", "The gate's estimate of the server's slot count.")
    kv = family("extproc_backend_kv_cache_usage", "KV-cache utilisation, last scrape.")
    age = family("extproc_backend_scrape_age_seconds", "Time since the last good scrape.")
    errors = CounterMetricFamily(
        "extproc_backend_scrape_errors", "Failed scrapes.", labels=["endpoint"]
    )
    for endpoint in status.endpoints:
        label = [endpoint.url]
        errors.add_metric(label, endpoint.errors)
        for target, value in ((waiting, endpoint.waiting), (running, endpoint.running),
                              (slots, endpoint.slots), (kv, endpoint.kv_cache_usage),
                              (age, endpoint.age)):  # fmt: skip
            if value is not None:
                target.add_metric(label, value)
    return [waiting, running, slots, kv, age, errors]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
