"""The capacity gates in front of a model server whose knee the service does not know,
on a virtual clock: `adaptive` finds it, `metrics` keeps the server full and its own
queue at its threshold, and stale metrics fall back to the static limit."""

from __future__ import annotations

import statistics

import pytest

from extproc.capacity.adaptive import AdaptiveCapacity, AdaptiveOptions
from extproc.capacity.saturation import MetricsCapacity, Reading, SaturationOptions
from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from tests.support.model_server import Harness, SimModelServer

KNEE = 20
SERVICE = 2.0  # seconds per request once running: the server does KNEE / SERVICE = 10 req/s
TTFT = 0.05


def flood(
    capacity: Capacity, clock: VirtualClock, *, rate: float = 15.0, until: float = 300.0
) -> Harness:
    server = SimModelServer(clock, slots=KNEE, ttft=TTFT)
    harness = Harness(clock, server, capacity, SERVICE)
    harness.arrivals(rate, until)
    harness.sample_every(1.0, until)
    return harness


def settled(values: list[int], after: int = 100) -> list[int]:
    return values[after:]


def test_adaptive_settles_near_the_knee_and_keeps_the_backends_queue_short() -> None:
    clock = VirtualClock()
    gate = AdaptiveCapacity(clock, AdaptiveOptions(max_limit=200))
    harness = flood(gate, clock)
    clock.advance(300.0)
    trace = harness.trace
    limit = statistics.mean(settled(trace.limit))
    assert KNEE * 0.85 <= limit <= KNEE * 1.15, limit
    assert statistics.mean(settled(trace.backend_waiting)) <= 0.15 * KNEE
    # Not bought by starving the server: it stays busy while requests wait in our queue.
    assert statistics.mean(settled(trace.backend_running)) >= 0.85 * KNEE
    assert min(settled(trace.queued)) > 0  # the flood never let up: the gate was tested


def test_a_static_limit_above_the_knee_fills_the_backends_own_queue() -> None:
    # The control: the same flood behind a limit three times the knee.
    clock = VirtualClock()
    harness = flood(StaticCapacity(3 * KNEE), clock)
    clock.advance(300.0)
    assert statistics.mean(settled(harness.trace.backend_waiting)) >= 1.5 * KNEE


def test_adaptive_re_measures_the_no_load_latency_and_recovers_after_each_probe() -> None:
    clock = VirtualClock()
    gate = AdaptiveCapacity(clock, AdaptiveOptions(max_limit=200, probe_interval=30.0))
    harness = flood(gate, clock)
    clock.advance(300.0)
    status = gate.status()
    assert status.min_latency == pytest.approx(TTFT)
    limits = settled(harness.trace.limit)
    assert min(limits) == gate.options.min_limit  # it probed...
    assert statistics.median(limits) >= 0.85 * KNEE  # ...and came back each time


def test_adaptive_never_exceeds_its_ceiling() -> None:
    clock = VirtualClock()
    gate = AdaptiveCapacity(clock, AdaptiveOptions(max_limit=8))
    harness = flood(gate, clock, until=120.0)
    clock.advance(120.0)
    assert max(harness.trace.limit) == 8
    assert max(harness.trace.backend_running) <= 8


def metrics_gate(clock: VirtualClock, *, fallback: int = 0) -> MetricsCapacity:
    options = SaturationOptions(waiting_threshold=4, stale_after=0.5)
    return MetricsCapacity(["sim"], clock, StaticCapacity(fallback), options)


def test_metrics_keeps_the_server_full_and_its_queue_at_the_threshold_through_bursts() -> None:
    clock = VirtualClock()
    gate = metrics_gate(clock)
    harness = flood(gate, clock, until=120.0)
    for at in range(10, 120, 20):
        harness.burst(60, at=float(at))  # bursts land between two scrapes
    harness.scrape_every(gate, interval=0.1, delay=0.04, until=120.0)
    clock.advance(120.0)
    assert harness.server.max_waiting <= 4
    assert min(settled(harness.trace.backend_running, 20)) == KNEE
    assert gate.status().endpoints[0].slots == KNEE


def test_stale_metrics_fall_back_to_the_static_limit_instead_of_halting() -> None:
    clock = VirtualClock()
    gate = metrics_gate(clock, fallback=6)
    harness = flood(gate, clock, until=60.0)
    harness.scrape_every(gate, interval=0.1, delay=0.04, until=20.0)  # then the scrapes stop
    clock.advance(20.0)
    assert gate.status().fallback is False
    dispatched_before = harness.trace.dispatched
    clock.advance(40.0)
    status = gate.status()
    assert status.fallback is True
    assert status.saturation is None
    assert harness.trace.dispatched - dispatched_before >= 0.9 * 40 * 6 / SERVICE
    assert max(settled(harness.trace.backend_running, 25)) <= 6


def test_saturation_is_the_worst_of_waiting_and_kv_cache_over_fresh_endpoints() -> None:
    clock = VirtualClock()
    gate = MetricsCapacity(["a", "b"], clock, StaticCapacity(0), SaturationOptions(stale_after=1))
    gate.end_scrape("a", Reading(waiting=1, kv_cache_usage=0.72))
    gate.end_scrape("b", Reading(waiting=0, kv_cache_usage=None))
    assert gate.status().saturation == pytest.approx(0.72 / 0.8)
    clock.advance(0.8)
    gate.end_scrape("b", Reading(waiting=3, kv_cache_usage=None))
    clock.advance(0.4)  # a is stale now: only b counts
    assert gate.status().saturation == pytest.approx(3 / 5)
    [a, b] = gate.status().endpoints
    assert a.saturation is None
    assert a.age == pytest.approx(1.2)
    assert b.saturation == pytest.approx(3 / 5)


def test_a_metrics_gate_respects_the_ceiling_while_metrics_are_fresh() -> None:
    clock = VirtualClock()
    gate = MetricsCapacity(["a"], clock, StaticCapacity(2), SaturationOptions())
    gate.end_scrape("a", Reading(waiting=0, kv_cache_usage=0.0))
    assert gate.has_room(1) is True
    assert gate.has_room(2) is False
