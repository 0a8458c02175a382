import dataclasses
import random
import threading

import pytest

from extproc.clock import VirtualClock
from extproc.contracts import RegistryFull
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import OVERFLOW_WORKLOAD, RECENT_WAITS, InMemoryWorkloadRegistry


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def registry(clock: VirtualClock) -> InMemoryWorkloadRegistry:
    return InMemoryWorkloadRegistry(clock)


def test_tracking_points_move_the_seed_counters(registry: InMemoryWorkloadRegistry) -> None:
    store = RegistryDatastore(registry)
    store.workload_handle_new_request("a")
    store.workload_handle_new_request("a")
    store.workload_handle_dispatched_request("a", 0.5)
    store.workload_handle_completed_request("a")
    metrics = store.workload_get_metrics("a")
    assert metrics is not None
    assert (metrics.total_requests, metrics.active_requests, metrics.dispatched_count) == (2, 1, 1)
    assert metrics.average_wait_time == 0.5
    assert store.get_workload_registry() is registry
    assert store.workload_get_request_rate("a") == metrics.request_rate == 2.0


def test_wait_ema_is_seeded_by_the_first_dispatch(registry: InMemoryWorkloadRegistry) -> None:
    registry.increment_active("a")
    registry.record_dispatch("a", 10.0)
    assert registry.get_metrics("a").average_wait_time == 10.0  # type: ignore[union-attr]
    registry.record_dispatch("a", 0.0)
    assert registry.get_metrics("a").average_wait_time == pytest.approx(8.0)  # type: ignore[union-attr]
    registry.record_dispatch("a", 18.0)
    assert registry.get_metrics("a").average_wait_time == pytest.approx(10.0)  # type: ignore[union-attr]


def test_ema_alpha_is_configurable(clock: VirtualClock) -> None:
    registry = InMemoryWorkloadRegistry(clock, ema_alpha=0.5)
    registry.increment_active("a")
    registry.record_dispatch("a", 4.0)
    registry.record_dispatch("a", 0.0)
    assert registry.get_metrics("a").average_wait_time == pytest.approx(2.0)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="ema_alpha"):
        InMemoryWorkloadRegistry(clock, ema_alpha=0.0)


def test_metrics_are_immutable_copies(registry: InMemoryWorkloadRegistry) -> None:
    registry.increment_active("a")
    before = registry.get_metrics("a")
    assert before is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.active_requests = 99  # type: ignore[misc]
    registry.increment_active("a")
    assert before.active_requests == 1
    assert registry.get_metrics("a").active_requests == 2  # type: ignore[union-attr]


def test_rate_comes_from_the_registry_clock(
    registry: InMemoryWorkloadRegistry, clock: VirtualClock
) -> None:
    for _ in range(30):
        registry.increment_active("a")
        clock.advance(0.1)
    assert registry.get_request_rate("a") == pytest.approx(10.0)
    clock.advance(200.0)
    assert registry.get_request_rate("a") == 0.0


def test_unknown_workloads_and_stray_decrements(registry: InMemoryWorkloadRegistry) -> None:
    assert registry.get_metrics("nobody") is None
    assert registry.get_request_rate("nobody") == 0.0
    registry.decrement_active("nobody")
    registry.record_dispatch("nobody", 1.0)
    assert registry.get_metrics("nobody") is None
    registry.increment_active("a")
    registry.decrement_active("a")
    registry.decrement_active("a")
    assert registry.get_metrics("a").active_requests == 0  # type: ignore[union-attr]


def test_list_is_sorted_by_id(registry: InMemoryWorkloadRegistry) -> None:
    for workload in ("c", "a", "b"):
        registry.increment_active(workload)
    assert [m.workload_id for m in registry.list_metrics()] == ["a", "b", "c"]
    assert len(registry) == 3


def test_threads_hammering_the_registry_balance_exactly() -> None:
    registry = InMemoryWorkloadRegistry(VirtualClock())
    workloads = [f"w{i}" for i in range(16)]
    threads, per_thread = 8, 5_000
    barrier = threading.Barrier(threads)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(per_thread):
            workload = rng.choice(workloads)
            registry.increment_active(workload)
            registry.record_dispatch(workload, 1.0)
            registry.get_metrics(rng.choice(workloads))
            registry.decrement_active(workload)

    pool = [threading.Thread(target=hammer, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    metrics = registry.list_metrics()
    assert sum(m.total_requests for m in metrics) == threads * per_thread
    assert sum(m.dispatched_count for m in metrics) == threads * per_thread
    assert all(m.active_requests == 0 for m in metrics)
    assert all(m.average_wait_time == pytest.approx(1.0) for m in metrics)


def test_idle_workloads_are_swept_active_ones_never(clock: VirtualClock) -> None:
    registry = InMemoryWorkloadRegistry(clock, idle_ttl=60.0)
    registry.increment_active("busy")
    registry.increment_active("idle")
    registry.decrement_active("idle")
    clock.advance(59.0)
    assert registry.sweep() == []
    clock.advance(1.0)
    assert registry.sweep() == ["idle"]
    clock.advance(3600.0)
    assert registry.sweep() == []  # a workload with a request in flight or queued stays
    assert registry.get_metrics("busy").active_requests == 1  # type: ignore[union-attr]


def test_activity_postpones_the_sweep(clock: VirtualClock) -> None:
    registry = InMemoryWorkloadRegistry(clock, idle_ttl=60.0)
    registry.increment_active("a")
    clock.advance(50.0)
    registry.decrement_active("a")  # completion counts as activity
    clock.advance(50.0)
    assert registry.sweep() == []


def test_full_registry_refuses_new_workloads_but_not_overflow(clock: VirtualClock) -> None:
    registry = InMemoryWorkloadRegistry(clock, max_workloads=2)
    registry.increment_active("a")
    registry.increment_active("b")
    registry.increment_active("a")  # known workloads are always counted
    with pytest.raises(RegistryFull):
        registry.increment_active("c")
    registry.increment_active(OVERFLOW_WORKLOAD)
    assert len(registry) == 3
    assert registry.get_metrics("c") is None


def test_recent_waits_are_bounded_and_grouped(registry: InMemoryWorkloadRegistry) -> None:
    registry.increment_active("a")
    registry.increment_active("b")
    for i in range(RECENT_WAITS + 50):
        registry.record_dispatch("a" if i % 2 else "b", float(i))
    recent = registry.recent_waits()
    assert len(recent["a"]) + len(recent["b"]) == RECENT_WAITS
    assert min(recent["b"]) == 50.0  # the oldest fell out
