"""Microbenchmarks (pytest-benchmark), run by `make bench`, never by `make test`.

Targets (issue: performance): tracking a request through the Datastore >=
200,000/s; one dispatch decision with 10,000 backlogged workloads <= 20 us;
100,000 tracked workloads add <= 50 MB RSS. Issue #14: a pick among 100
endpoints with prefix scoring of a 32 KiB prompt <= 100 us.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
from typing import Any

import pytest

from extproc.capacity.saturation import Reading
from extproc.clock import VirtualClock
from extproc.contracts import PickRequest
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.pool.picker import make_picker
from extproc.pool.pool import EndpointPool
from extproc.pool.scorers import ScorerWeights
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


def test_pick_among_100_endpoints_with_prefix_scoring_of_a_32_kib_prompt(benchmark: Any) -> None:
    """Scored picker, every endpoint fresh and remembering prefixes: the prompt is hashed
    (256 blocks of 64 bytes) and matched on each endpoint, then the best is charged."""
    clock = VirtualClock()
    rng = random.Random(3)
    pool = EndpointPool(clock, make_picker("scored", ScorerWeights()), rng=rng)
    addresses = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(100)]
    pool.update("static", dict.fromkeys(addresses, True))
    system = "".join(rng.choice("abcdefgh ") for _ in range(8 << 10))
    for address in addresses:
        endpoint = pool.endpoint(address)
        assert endpoint is not None
        endpoint.end_scrape(Reading(rng.randrange(3), rng.random() * 0.5, 4.0))
    clock.advance(0.5)  # still fresh
    for i in range(400):  # shared system prompt, per-tenant tails: the prefix LRUs fill
        tail = f"tenant {i}" * 400
        pool.on_release(pool.pick(PickRequest(prompt=system[: rng.randrange(8 << 10)] + tail))[0])
    prompt = system + "".join(rng.choice("xyz ") for _ in range(24 << 10))
    assert len(prompt) == 32 << 10
    request = PickRequest(prompt=prompt)

    def pick() -> None:
        pool.on_release(pool.pick(request)[0])

    benchmark.pedantic(pick, rounds=2_000, iterations=1, warmup_rounds=50)
    median = benchmark.stats["median"]
    benchmark.extra_info["pick_median_us"] = median * 1e6
    print(f"pick among 100 endpoints, 32 KiB prompt: median {median * 1e6:.1f} us")
    assert median <= 100e-6
