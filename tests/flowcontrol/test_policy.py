"""Policy conformance (every policy) and the workload-aware score's behaviour."""

import functools
import random

import pytest

from extproc.clock import VirtualClock
from extproc.contracts import Policy, QueuedRequest, TokenCount
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policies import POLICIES, make_policy
from extproc.flowcontrol.policy import ScoreWeights, WorkloadAwarePolicy
from extproc.outcomes import Outcome
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from extproc.tools.simulate import Request, replay


def random_world(seed: int) -> tuple[VirtualClock, RegistryDatastore, list[QueuedRequest]]:
    rng = random.Random(seed)
    clock = VirtualClock(1000.0)
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    workloads = [f"w{i}" for i in range(6)]
    for workload in workloads:
        for _ in range(rng.randint(1, 50)):
            datastore.workload_handle_new_request(workload)
        for _ in range(rng.randint(0, 5)):
            datastore.workload_handle_dispatched_request(workload, rng.uniform(0, 90))
    items = [
        QueuedRequest(rng.choice(workloads), rng.randint(1, 5), rng.uniform(900, 1000), seq)
        for seq in range(40)
    ]
    return clock, datastore, items


@pytest.fixture(params=sorted(POLICIES))
def policy_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def admitted(policy: Policy, items: list[QueuedRequest], seed: int) -> list[QueuedRequest]:
    """Admit the items as the flow controller would, dispatching and completing some of
    them so that stateful policies hold different accounts; returns those still queued."""
    rng = random.Random(seed)
    for item in items:
        policy.on_enqueue(item)
    queued = []
    for item in items:
        if rng.random() < 0.4:
            policy.on_dispatch(item)
            policy.on_done(item, rng.uniform(0.1, 5.0))
        else:
            queued.append(item)
    return queued


@pytest.mark.parametrize("seed", range(5))
def test_less_is_a_strict_weak_order(policy_name: str, seed: int) -> None:
    clock, datastore, items = random_world(seed)
    policy = make_policy(policy_name, datastore, clock)
    items = admitted(policy, items, seed)
    for a in items:
        assert not policy.less(a, a)
        for b in items:
            if policy.less(a, b):
                assert not policy.less(b, a)
                for c in items:
                    if policy.less(b, c):
                        assert policy.less(a, c)


@pytest.mark.parametrize("seed", range(3))
def test_less_agrees_with_sort_key(policy_name: str, seed: int) -> None:
    clock, datastore, items = random_world(seed)
    policy = make_policy(policy_name, datastore, clock)
    items = admitted(policy, items, seed)
    for a in items:
        for b in items:
            assert policy.less(a, b) == (policy.sort_key(a) < policy.sort_key(b))


def test_equal_requests_go_first_come_first_served(policy_name: str) -> None:
    clock = VirtualClock()
    policy = make_policy(policy_name, RegistryDatastore(InMemoryWorkloadRegistry(clock)), clock)
    items = [QueuedRequest("same", 3, 0.0, seq) for seq in (5, 1, 3)]
    for item in items:
        policy.on_enqueue(item)
    ordered = sorted(items, key=functools.cmp_to_key(lambda a, b: -1 if policy.less(a, b) else 1))
    assert [i.seq for i in ordered] == [1, 3, 5]


def test_every_policy_serves_the_whole_backlog_at_full_capacity(policy_name: str) -> None:
    arrivals = [Request(f"w{i % 5}", 1 + i % 5, 0.0, 1.0) for i in range(100)]
    run = replay(arrivals, lambda d, c: make_policy(policy_name, d, c), capacity=4, until=30)
    assert all(r.outcome is Outcome.DISPATCHED for r in run.records)
    # Work-conserving: 100 one-second requests on 4 slots finish in 25 s, not a second more.
    assert max(r.wait for r in run.records) == pytest.approx(24.0)
    assert all(m.active_requests == 0 for m in run.registry.list_metrics())


def test_unknown_policy_is_refused() -> None:
    clock = VirtualClock()
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery", RegistryDatastore(InMemoryWorkloadRegistry(clock)), clock)


def aware_world() -> tuple[VirtualClock, RegistryDatastore, WorkloadAwarePolicy]:
    clock = VirtualClock(100.0)
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    return clock, datastore, WorkloadAwarePolicy(datastore, clock)


def test_score_is_the_seed_formula() -> None:
    clock, datastore, policy = aware_world()
    for _ in range(50):
        datastore.workload_handle_new_request("a")  # 50 requests at age 0 -> 50 req/s
    datastore.workload_handle_dispatched_request("a", 30.0)
    item = QueuedRequest("a", 4, clock.now(), 0)
    expected = 0.4 * (30 / 60) + 0.4 * 4 / 5 - 0.2 * (50 / 100)
    assert policy.score(item) == pytest.approx(expected)


def test_each_term_moves_the_order_the_right_way() -> None:
    clock, datastore, policy = aware_world()
    now = clock.now()
    for workload in ("waited", "fresh", "busy"):
        datastore.workload_handle_new_request(workload)
    datastore.workload_handle_dispatched_request("waited", 20.0)
    for _ in range(80):
        datastore.workload_handle_new_request("busy")
    assert policy.less(QueuedRequest("fresh", 5, now, 1), QueuedRequest("fresh", 1, now, 0))
    assert policy.less(QueuedRequest("waited", 3, now, 1), QueuedRequest("fresh", 3, now, 0))
    assert policy.less(QueuedRequest("fresh", 3, now, 1), QueuedRequest("busy", 3, now, 0))


def test_weights_are_configurable() -> None:
    clock = VirtualClock()
    datastore = RegistryDatastore(InMemoryWorkloadRegistry(clock))
    only_rate = WorkloadAwarePolicy(datastore, clock, ScoreWeights(wait=0, criticality=0, rate=1))
    datastore.workload_handle_new_request("quiet")
    for _ in range(10):
        datastore.workload_handle_new_request("loud")
    low_but_quiet = QueuedRequest("quiet", 1, 0.0, 1)
    assert only_rate.less(low_but_quiet, QueuedRequest("loud", 5, 0.0, 0))


def test_a_waiting_request_ages_even_when_its_workload_average_is_stale() -> None:
    clock, datastore, policy = aware_world()
    datastore.workload_handle_new_request("stale")
    datastore.workload_handle_dispatched_request("stale", 0.0)
    head = QueuedRequest("stale", 3, clock.now(), 0)
    before = policy.score(head)
    clock.advance(30.0)
    assert policy.score(head) == pytest.approx(before + 0.4 * 30 / 60, abs=0.01)


class SeedWorkloadAware(WorkloadAwarePolicy):
    """The seed's score exactly: the workload's average wait only, never the head's own wait."""

    def score(self, item: QueuedRequest) -> float:
        metrics = self._datastore.workload_get_metrics(item.workload_id)
        assert metrics is not None
        return (
            0.4 * min(metrics.average_wait_time / 60, 1)
            + 0.4 * item.criticality / 5
            - 0.2 * min(metrics.request_rate / 100, 1)
        )


def periodic(tenant: str, every: float, start: float, stop: float) -> list[Request]:
    return [Request(tenant, 3, start + i * every, 1.0) for i in range(int((stop - start) / every))]


def starvation_scenario(policy: type[WorkloadAwarePolicy]) -> list[float | None]:
    """A flood with a steady backlog, and a light workload whose average wait is stale.

    The light workload is served once at once (average 0); the flood keeps ~20
    requests queued on 2 slots, so its average wait is ~10 s. Returns the light
    workload's later waits (None: it timed out).
    """
    light = [Request("light", 3, 0.0, 1.0), *periodic("light", every=20.0, start=100.0, stop=300.0)]
    burst = [Request("flood", 3, 0.0, 1.0) for _ in range(20)]
    flood = burst + periodic("flood", every=0.5, start=0.0, stop=300.0)
    run = replay(light + flood, policy, capacity=2, until=400, queue_timeout=60.0)
    return [r.wait if r.outcome is Outcome.DISPATCHED else None for r in run.of("light")][1:]


def test_no_request_starves_behind_a_flood() -> None:
    waits = starvation_scenario(WorkloadAwarePolicy)
    assert len(waits) == 10
    assert None not in waits, "a light request timed out"
    # It waits about as long as the flood's oldest request (~10 s), not until the timeout.
    assert max(w for w in waits if w is not None) < 20.0


def test_negative_control_the_seed_score_starves_the_light_workload() -> None:
    """Proves the test above can fail: the seed's stale average lets the flood win every time."""
    waits = starvation_scenario(SeedWorkloadAware)
    assert waits.count(None) >= 8


class _CountingReads(dict[str, float]):
    reads = 0

    def __getitem__(self, key: str) -> float:
        _CountingReads.reads += 1
        return super().__getitem__(key)

    def get(self, key: str, default: float | None = None) -> float | None:  # type: ignore[override]
        _CountingReads.reads += 1
        return super().get(key, default)


def test_fair_share_finds_its_floor_without_scanning_the_backlog() -> None:
    """#16.8: a workload enqueued from idle costs O(log W) counter reads, not O(W)."""
    policy = FairSharePolicy(cost="requests")
    policy._counters = _CountingReads()
    workloads = 2000
    for n in range(workloads):  # each from idle, all of them backlogged
        policy.on_enqueue(QueuedRequest(f"w{n}", 1, 0.0, n))
    assert _CountingReads.reads < 20 * workloads


def test_fair_share_tokens_charges_the_estimate_then_the_measured_usage() -> None:
    policy = FairSharePolicy("tokens")
    item = QueuedRequest("a", 1, 0.0, 1, TokenCount(10, 5))
    policy.on_enqueue(item)
    policy.on_dispatch(item)
    assert policy.counter("a") == pytest.approx(10 + 2 * 5)
    policy.on_usage(item, TokenCount(10, 50))
    assert policy.counter("a") == pytest.approx(10 + 2 * 50)
    policy.on_done(item, 1.0)
    assert policy.counter("a") == pytest.approx(110)  # corrected once, not again at the end
    # A body that was not read is charged the workload's last measured cost.
    unread = QueuedRequest("a", 1, 2.0, 2)
    policy.on_enqueue(unread)
    policy.on_dispatch(unread)
    assert policy.counter("a") == pytest.approx(220)


def _dispatched(policy: FairSharePolicy, seq: int, tokens: TokenCount | None) -> QueuedRequest:
    item = QueuedRequest("a", 1, float(seq), seq, tokens)
    policy.on_enqueue(item)
    policy.on_dispatch(item)
    return item


def test_fair_share_tokens_keeps_the_estimate_of_a_response_without_usage() -> None:
    # An error body or a local reply reports no usage: that request stays charged its
    # estimate, and the unit stays tokens.
    policy = FairSharePolicy("tokens", fallback_after=3)
    item = _dispatched(policy, 1, TokenCount(10, 5))
    policy.on_usage(item, None)
    policy.on_done(item, 2.0)
    assert policy.cost == "tokens"
    assert policy.counter("a") == pytest.approx(20)
    # Runs broken by a measured response never add up to the switch.
    for seq in range(2, 12):
        item = _dispatched(policy, seq, TokenCount(1, 0))
        policy.on_usage(item, TokenCount(1, 0) if seq % 2 else None)
        policy.on_done(item, 1.0)
    assert policy.cost == "tokens"


def test_fair_share_tokens_falls_back_to_occupancy_after_a_run_without_usage() -> None:
    policy = FairSharePolicy("tokens", fallback_after=3)
    for seq in (1, 2):
        item = _dispatched(policy, seq, TokenCount(10, 5))
        policy.on_usage(item, None)
        policy.on_done(item, 2.0)
    assert policy.cost == "tokens"
    assert policy.counter("a") == pytest.approx(40)
    item = _dispatched(policy, 3, TokenCount(10, 5))
    policy.on_usage(item, None)
    assert policy.cost == "occupancy"
    policy.on_done(item, 2.0)
    # From now on slot-seconds, priced at the measured 10 tokens per second: the third
    # request's 2 s cost the 20 tokens it was charged -- one unit, no refund.
    assert policy.counter("a") == pytest.approx(60.0)
    item = _dispatched(policy, 4, TokenCount(10, 5))
    assert policy.counter("a") == pytest.approx(80.0)  # its 2 s estimate, priced
