"""The `metrics` gate's rule, one endpoint at a time (`ServerLoad`), and the gate in front
of the simulated model server on virtual time: work-conserving with the server's queue
at most the threshold, for every slot count, service time and scrape interval."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.capacity.saturation import MetricsCapacity, Reading, SaturationOptions, ServerLoad
from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
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
    assert server.slots == 16  # one scrape could be a snapshot between two steps
    assert server.room() == 0
    server.read(Reading(waiting=10, kv_cache_usage=None, running=8))  # two: believed
    assert server.slots == 12
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


def test_one_snapshot_between_two_scheduler_steps_leaves_the_slot_count_alone() -> None:
    """vLLM takes its gauges after a step, before admitting the waiting: a real vLLM
    with 2 slots read 1 running and 2 waiting in 12-18% of snapshots, and each such
    scrape took S from 2 to 1 (the gate then held one request fewer)."""
    server, _ = load()
    full = Reading(waiting=2, kv_cache_usage=None, running=2)
    between_steps = Reading(waiting=2, kv_cache_usage=None, running=1)
    for reading in (full, between_steps, full, between_steps, full):
        server.read(reading)
        assert server.slots == 2
    server.read(between_steps)
    server.read(between_steps)  # two in a row: the server did lose a slot
    assert server.slots == 1


def test_a_snapshot_between_steps_right_after_an_unqueued_scrape_lowers_nothing() -> None:
    """As load rises: a scrape with no queue reads 1 of 2 running, the next catches the
    server between two steps (1 running, 2 waiting). That pulled S to 1."""
    server, _ = load()
    server.read(Reading(waiting=2, kv_cache_usage=None, running=2))
    server.read(Reading(waiting=0, kv_cache_usage=None, running=2))
    server.read(Reading(waiting=0, kv_cache_usage=None, running=1))
    server.read(Reading(waiting=2, kv_cache_usage=None, running=1))
    assert server.slots == 2
    server.read(Reading(waiting=2, kv_cache_usage=None, running=1))
    assert server.slots == 1


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
    for _ in range(4):  # round robin may have put them all on one endpoint: no evidence
        gate.on_latency(0.01, 0.0)
    assert not woken
    assert [s.slots for s in (gate.server("a"), gate.server("b"))] == [0, 0]
    gate.end_scrape("a", Reading(waiting=0, kv_cache_usage=None, running=3))
    assert gate.server("a").slots == 3
    assert not gate.has_room(in_flight)  # b has shown no slot yet: its share would queue
    assert {e.slots for e in gate.status().endpoints} == {0, 3}


def test_a_non_integer_threshold_is_never_exceeded_by_a_whole_request() -> None:
    server, _ = load(threshold=2.5)
    for _ in range(4):
        server.dispatched()
    server.read(Reading(waiting=0, kv_cache_usage=None, running=4))
    dispatched = 0
    while server.room() > 0:
        server.dispatched()
        dispatched += 1
    assert (dispatched, server.queue()) == (2, 2)  # not 3
    gate = MetricsCapacity(["a"], VirtualClock(), StaticCapacity(0), SaturationOptions(2.5))
    gate.end_scrape("a", Reading(waiting=0, kv_cache_usage=None, running=0))
    in_flight = 0
    while gate.has_room(in_flight):
        gate.on_dispatch()
        in_flight += 1
    assert in_flight == 2


def test_first_bytes_raise_the_slot_count_at_most_the_threshold_above_what_a_scrape_proved() -> (
    None
):
    server, _ = load(threshold=2)
    server.read(Reading(waiting=0, kv_cache_usage=None, running=4))
    for _ in range(6):
        server.dispatched()
        server.started()
    # Completions still on their way back while their slots' next requests answer.
    for _ in range(3):
        server.dispatched()
        server.started()
    assert server.slots == 6  # not 9: the 3 extra first bytes may be completions in transit
    server.read(Reading(waiting=0, kv_cache_usage=None, running=7))
    assert server.slots == 7
    assert server.started() is True
    assert server.slots == 9


def test_once_a_scrape_caught_the_server_full_first_bytes_add_nothing_to_what_it_proved() -> None:
    server, _ = load(threshold=2)
    for _ in range(6):
        server.dispatched()
    server.read(Reading(waiting=2, kv_cache_usage=None, running=4))  # full: 4 slots
    server.read(Reading(waiting=0, kv_cache_usage=None, running=4))
    for _ in range(6):  # late completions: 6 first bytes counted, 4 running
        server.started()
    assert server.slots == 4
    server.read(Reading(waiting=0, kv_cache_usage=None, running=5))  # it grew: scrapes see it
    assert server.slots == 5


def test_without_a_running_series_dispatches_during_a_scrape_do_not_read_as_running() -> None:
    server, _ = load(threshold=2)
    server.read(Reading(waiting=0, kv_cache_usage=None))
    for _ in range(4):
        server.dispatched()
        server.started()
    server.begin_read()
    server.dispatched()  # sent while the page was being rendered without them
    server.dispatched()
    server.read(Reading(waiting=0, kv_cache_usage=None))
    assert (server.slots, server.room()) == (4, 0)


def test_a_request_ended_before_its_first_byte_leaves_the_started_count_alone() -> None:
    server, _ = load(threshold=2)
    server.read(Reading(waiting=0, kv_cache_usage=None, running=0))
    for _ in range(4):
        server.dispatched()
        server.started()
    for _ in range(3):  # reset before headers
        server.dispatched()
        server.completed(started=False)
    assert server.started_in_flight == 4
    gate = MetricsCapacity(["a"], VirtualClock(), StaticCapacity(0), SaturationOptions(2))
    gate.end_scrape("a", Reading(waiting=0, kv_cache_usage=None, running=0))
    gate.on_dispatch()
    gate.on_latency(0.01, 0.0)
    gate.on_dispatch()
    gate.on_release(started=False)
    assert gate.server("a").started_in_flight == 1


def metrics(clock: VirtualClock, scenario: Scenario) -> Capacity:
    stale = max(1.0, 3 * scenario.interval)
    options = SaturationOptions(waiting_threshold=scenario.threshold, stale_after=stale)
    return MetricsCapacity(["sim"], clock, StaticCapacity(0), options)


def grid_scenario(
    slots: int, service: float, interval: float, threshold: float, **more: Any
) -> Scenario:
    # Long enough for steady state: the learnt slot count climbs at most twice the
    # threshold per scrape from a cold start, so the warm-up spans 8 intervals or more.
    duration = max(60.0, 40 * interval / service)
    return Scenario(slots, service, interval, threshold, duration=duration, warm_up=0.2, **more)


GRID = [
    grid_scenario(slots, service, interval, threshold, transit=transit)
    for slots, threshold in ((4, 2), (64, 5))
    for service in (0.05, 0.5, 10.0)
    for interval in (0.05, 0.2, 1.0)
    for transit in (0.0, 0.005)
]


def grid_id(s: Scenario) -> str:
    transit = f"-transit{s.transit}s" if s.transit else ""
    running = "" if s.running_series else "-no-running"
    return f"S{s.slots}-{s.service}s-every{s.interval}s{transit}{running}"


@pytest.mark.parametrize("scenario", GRID, ids=[grid_id(s) for s in GRID])
def test_work_conserving_with_the_servers_queue_at_most_the_threshold(scenario: Scenario) -> None:
    result = run_scenario(scenario, metrics)
    assert result.utilisation >= 0.95
    assert result.mean_waiting <= scenario.threshold + 1e-9  # float sums of time spans
    assert result.max_waiting <= scenario.threshold  # the estimate never exceeded the truth


NO_RUNNING = [
    grid_scenario(slots, service, interval, threshold, transit=transit, running_series=False)
    for slots, threshold in ((4, 2), (64, 5))
    for service, interval in ((0.05, 0.05), (0.5, 0.2), (2.0, 1.0))
    for transit in (0.0, 0.005)
]


@pytest.mark.parametrize("scenario", NO_RUNNING, ids=[grid_id(s) for s in NO_RUNNING])
def test_without_a_running_series_the_queue_stays_at_most_the_threshold(scenario: Scenario) -> None:
    result = run_scenario(scenario, metrics)
    # Measured, and documented as a limit: without the gauge, requests in transit read as
    # not running, so 64 slots of 50 ms behind 5 ms of transit are kept ~91% busy.
    assert result.utilisation >= (
        0.95 if scenario.transit * scenario.slots < scenario.service else 0.9
    )
    assert result.max_waiting <= scenario.threshold


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


def test_the_flow_controller_tells_the_gate_which_released_requests_had_a_first_byte() -> None:
    clock = VirtualClock()
    gate = MetricsCapacity(["a"], clock, StaticCapacity(0), SaturationOptions(2))
    gate.end_scrape("a", Reading(waiting=0, kv_cache_usage=None, running=0))
    registry = InMemoryWorkloadRegistry(clock)
    policy = make_policy("fcfs", RegistryDatastore(registry), clock)
    flow = FlowController(policy, clock, capacity=gate, max_queue=10, queue_timeout=None)
    answered, reset = flow.enqueue(FlowRequest("t", 3)), flow.enqueue(FlowRequest("t", 3))
    answered.first_byte()
    reset.close()  # before its headers
    assert gate.server("a").started_in_flight == 1
    answered.close()
    assert gate.server("a").started_in_flight == 0
