"""Microbenchmarks (pytest-benchmark), run by `make bench`, never by `make test`.

Targets (issue: performance): tracking a request through the Datastore >=
200,000/s; one dispatch decision with 10,000 backlogged workloads <= 20 us;
100,000 tracked workloads add <= 50 MB RSS.
"""

from __future__ import annotations

import gc
import os
import statistics
from typing import Any

import pytest

from extproc.clock import VirtualClock
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry

WORKLOADS = 10_000


def test_track_new_dispatch_complete(benchmark: Any) -> None:
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(VirtualClock()))
    ids = [f"w{i}" for i in range(100)]

    def track() -> None:
        for workload in ids:
            datastore.workload_handle_new_request(workload)
            datastore.workload_handle_dispatched_request(workload, 0.01)
            datastore.workload_handle_completed_request(workload)

    benchmark(track)
    per_second = len(ids) / benchmark.stats["mean"]
    benchmark.extra_info["requests_per_second"] = per_second
    assert per_second >= 200_000


@pytest.mark.parametrize("policy", ["fair-share", "fcfs", "workload-aware"])
def test_dispatch_decision_with_10000_backlogged_workloads(benchmark: Any, policy: str) -> None:
    """Each round completes one request, which dispatches the next. pytest-benchmark times
    the whole cycle; the decision itself is what the queue times for its metric."""
    clock = VirtualClock()
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    running: list[Ticket] = []
    decisions: list[float] = []
    flow = FlowController(
        make_policy(policy, datastore, clock),
        clock,
        max_concurrency=1,
        max_queue=10**7,
        queue_timeout=None,
        on_decided=running.append,
        on_pick=decisions.append,
    )
    for round_ in range(5):
        for i in range(WORKLOADS):
            workload = f"w{i}"
            datastore.workload_handle_new_request(workload)
            flow.enqueue(FlowRequest(workload, 1 + (i + round_) % 5))
    assert flow.queued == 5 * WORKLOADS - 1

    def complete_one() -> None:
        clock.advance(0.001)
        running[-1].close()

    rounds = 2_000 if policy != "workload-aware" else 20
    benchmark.pedantic(complete_one, rounds=rounds, iterations=1)
    decision = statistics.median(decisions)
    benchmark.extra_info["flows"] = len(flow._flows)
    benchmark.extra_info["decision_median_us"] = decision * 1e6
    print(f"{policy}: decision median {decision * 1e6:.1f} us over {len(flow._flows)} flows")
    if policy != "workload-aware":  # its keys move with time: an exact scan, O(F)
        assert decision <= 20e-6


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_of_100000_tracked_workloads() -> None:
    gc.collect()
    before = rss_mb()
    registry = InMemoryWorkloadRegistry(VirtualClock())
    for i in range(100_000):
        workload = f"tenant-{i:06d}"
        registry.increment_active(workload)
        registry.record_dispatch(workload, 0.01)
        registry.decrement_active(workload)
    gc.collect()
    added = rss_mb() - before
    print(f"100,000 workloads: {added:.1f} MB")
    assert len(registry) == 100_000
    assert added <= 50
