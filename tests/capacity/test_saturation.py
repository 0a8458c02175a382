"""The `metrics` gate's rule, one endpoint at a time (`ServerLoad`), and the gate in front
of the simulated model server on virtual time: work-conserving with the server's queue
at most the threshold, for every slot count, service time and scrape interval."""

from __future__ import annotations

import pytest

from extproc.capacity.saturation import MetricsCapacity, Reading, SaturationOptions, ServerLoad
from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from tests.support.model_server import Harness, Scenario, SimModelServer, run_scenario


def load(threshold: float = 2) -> tuple[ServerLoad, VirtualClock]:
    clock = VirtualClock()
    return ServerLoad(clock, SaturationOptions(waiting_threshold=threshold)), clock


def test_an_idle_server_of_unknown_size_takes_the_threshold_then_what_it_proves_it_runs() -> None:
    server, _ = load()
    assert server.room() == 0  # never read: no room of its own (the gate falls back)
    server.read(Reading(waiting=0, kv_cache_usage=0.0, running=0))
    assert server.room() == 2
    for _ in range(2):
        server.dispatched()
    assert server.room() == 0
    assert server.started() is True  # a first byte: the server runs it, so it has a slot
    assert server.started() is True
    assert (server.slots, server.room()) == (2, 2)
    server.read(Reading(waiting=0, kv_cache_usage=0.1, running=7))  # someone else's load
    assert (server.slots, server.foreign) == (7, 5)
    assert server.room() == 2  # 7 slots + 2 queued - 2 ours - 5 foreign


def test_a_queue_inside_the_server_pulls_the_slot_estimate_half_way_to_running() -> None:
    server, _ = load()
    server.read(Reading(waiting=0, kv_cache_usage=None, running=16))
    for _ in range(18):
        server.dispatched()
    server.read(Reading(waiting=10, kv_cache_usage=None, running=8))  # capacity lost
    assert server.slots == 12
    assert server.room() == 0
    server.read(Reading(waiting=10, kv_cache_usage=None, running=8))
    assert server.slots == 10
    for slots in (9, 8, 8):  # whole requests: the estimate reaches the truth
        server.read(Reading(waiting=10, kv_cache_usage=None, running=8))
        assert server.slots == slots
    for _ in range(9):  # while the server queues, first bytes prove nothing
        assert server.started() is False
    assert server.slots == 8
    server.read(Reading(waiting=1, kv_cache_usage=None, running=12))  # below the truth: up at once
    assert server.slots == 12


def test_only_the_queue_counts_against_the_threshold_and_completions_free_room_at_once() -> None:
    server, _ = load(threshold=2)
    server.read(Reading(waiting=0, kv_cache_usage=None, running=4))
    for _ in range(4):
        server.dispatched()
        server.started()
    server.read(Reading(waiting=0, kv_cache_usage=None, running=4))
    assert (server.queue(), server.room()) == (0, 2)
    server.dispatched()
    server.dispatched()
    assert (server.queue(), server.room(), server.saturation()) == (2, 0, 1.0)
    server.completed()  # no scrape needed
    assert (server.queue(), server.room()) == (1, 1)


def test_the_peak_in_flight_while_a_scrape_is_out_keeps_our_own_load_from_looking_foreign() -> None:
    server, _ = load()
    server.begin_read()
    for _ in range(3):
        server.dispatched()
    server.completed()  # the server may have counted all three when it answered
    server.read(Reading(waiting=0, kv_cache_usage=None, running=3))
    assert server.foreign == 0


def test_without_a_running_series_running_is_taken_to_be_ours_not_waiting() -> None:
    server, _ = load()
    for _ in range(6):
        server.dispatched()
    server.read(Reading(waiting=2, kv_cache_usage=None))
    assert (server.slots, server.foreign, server.room()) == (4, 0, 0)


def test_kv_cache_at_its_threshold_leaves_no_room_and_stale_readings_none() -> None:
    server, clock = load()
    server.read(Reading(waiting=0, kv_cache_usage=0.8, running=1))
    assert (server.room(), server.saturation()) == (0, 1.0)
    server.read(Reading(waiting=0, kv_cache_usage=0.5, running=1))
    assert server.room() == 2  # one slot, held by someone else: the threshold's worth
    clock.advance(1.01)
    assert (server.fresh(), server.room()) == (False, 0)


def test_the_gate_charges_each_endpoint_an_equal_share_and_wakes_on_a_larger_estimate() -> None:
    clock = VirtualClock()
    gate = MetricsCapacity(["a", "b"], clock, StaticCapacity(0), SaturationOptions(2))
    woken: list[None] = []
    gate.bind(lambda: woken.append(None))
    for url in gate.urls:
        gate.end_scrape(url, Reading(waiting=0, kv_cache_usage=None, running=0))
    in_flight = 0
    while gate.has_room(in_flight):
        gate.on_dispatch()
        in_flight += 1
    assert in_flight == 4  # 2 per endpoint
    woken.clear()
    gate.on_latency(0.01, 0.0)
    gate.on_latency(0.01, 0.0)
    assert woken
    assert [s.slots for s in (gate.server("a"), gate.server("b"))] == [1, 1]
    assert gate.has_room(in_flight)
    assert {e.slots for e in gate.status().endpoints} == {1}


def metrics(clock: VirtualClock, scenario: Scenario) -> Capacity:
    stale = max(1.0, 3 * scenario.interval)
    options = SaturationOptions(waiting_threshold=scenario.threshold, stale_after=stale)
    return MetricsCapacity(["sim"], clock, StaticCapacity(0), options)


GRID = [
    Scenario(slots, service, interval, threshold, duration=60)
    for slots, threshold in ((4, 2), (64, 5))
    for service in (0.05, 0.5, 10.0)
    for interval in (0.05, 0.2, 1.0)
]


@pytest.mark.parametrize(
    "scenario", GRID, ids=[f"S{s.slots}-{s.service}s-every{s.interval}s" for s in GRID]
)
def test_work_conserving_with_the_servers_queue_at_most_the_threshold(scenario: Scenario) -> None:
    result = run_scenario(scenario, metrics)
    assert result.utilisation >= 0.95
    assert result.mean_waiting <= scenario.threshold + 1e-9  # float sums of time spans
    assert result.max_waiting <= scenario.threshold  # the estimate never exceeded the truth


@pytest.mark.parametrize("interval", [0.05, 1.0])
def test_without_first_bytes_the_scrapes_alone_learn_the_slots(interval: float) -> None:
    scenario = Scenario(64, 2.0, interval, 5, first_bytes=False, duration=100)
    result = run_scenario(scenario, metrics)
    assert result.utilisation >= 0.95
    assert result.max_waiting <= scenario.threshold


def test_a_server_that_loses_slots_has_its_queue_pulled_back_to_the_threshold() -> None:
    clock = VirtualClock()
    scenario = Scenario(16, 1.0, 0.1, 2)
    server = SimModelServer(clock, 16, ttft=0.05)
    gate = metrics(clock, scenario)
    harness = Harness(clock, server, gate, 1.0)
    harness.arrivals(24.0, 120.0)
    harness.scrape_every(gate, 0.1, 0.01, 120.0)
    harness.sample_every(0.5, 120.0)
    clock.advance(60.0)
    assert gate.status().endpoints[0].slots == 16
    server.slots = 8  # e.g. longer prompts: the KV cache holds half as many
    clock.advance(60.0)
    assert gate.status().endpoints[0].slots == pytest.approx(8, abs=0.01)
    late = harness.trace.backend_waiting[-100:]  # the last 50 s
    assert max(late) <= 2
    assert min(harness.trace.backend_running[-100:]) == 8
