"""Fairness, measured by the simulator on the real queue and policies (virtual clock).

Each claim is checked against an allocation computed independently of any policy
(`max_min_fair`), and each test that says a policy is fair has a control that
shows the same check failing for a policy that is not.
"""

from pathlib import Path

import pytest

from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.outcomes import Outcome
from extproc.stats import percentile
from extproc.tools.fairness import jain_index, max_min_fair
from extproc.tools.simulate import Scenario, SimResult, TenantSpec, run

SCENARIOS = Path(__file__).resolve().parents[2] / "docs" / "scenarios"


def scenario(name: str, **changes: object) -> Scenario:
    return Scenario.from_yaml(SCENARIOS / f"{name}.yaml").model_copy(update=changes)


def worst_deviation(result: SimResult) -> float:
    """Largest relative gap between a tenant's slot-seconds and its max-min fair share of
    what was served, given the work it offered over the run."""
    offered = {t.name: 0.0 for t in result.tenants}
    for record in result.records:
        offered[record.request.tenant] += record.request.service
    names = [t.name for t in result.tenants]
    weights = [result.scenario.criticality_weights[t.criticality - 1] for t in result.tenants]
    fair = max_min_fair([offered[n] for n in names], result.occupancy, weights)
    return max(abs(t.occupancy - f) / f for t, f in zip(result.tenants, fair, strict=True))


# -- the reference measures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("demands", "capacity", "weights", "expected"),
    [
        ([10, 10, 10], 12, None, [4, 4, 4]),
        ([1, 10, 10], 12, None, [1, 5.5, 5.5]),
        ([1, 2, 3], 100, None, [1, 2, 3]),
        ([10, 10], 12, [1, 2], [4, 8]),
        ([3, 10], 12, [1, 2], [3, 9]),
        ([0, 5], 4, None, [0, 4]),
        ([], 4, None, []),
    ],
)
def test_max_min_fair_allocation(
    demands: list[float], capacity: float, weights: list[float] | None, expected: list[float]
) -> None:
    assert max_min_fair(demands, capacity, weights) == pytest.approx(expected)


def test_jain_index_and_percentile() -> None:
    assert jain_index([3, 3, 3, 3]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 50) == 5.0


# -- the scenarios ------------------------------------------------------------------------


@pytest.mark.parametrize("tenants", range(2, 9))
def test_uniform_backlogged_tenants_get_the_max_min_share_within_1_percent(tenants: int) -> None:
    spec = TenantSpec(name="tenant", replicas=tenants, rate=32 / tenants)
    result = run(scenario("uniform", tenants=[spec]), "fair-share")
    assert worst_deviation(result) <= 0.01


def test_unequal_demands_fair_share_is_fair_and_fcfs_is_not() -> None:
    assert worst_deviation(run(scenario("unequal"), "fair-share")) <= 0.01
    # The control: FCFS serves in proportion to arrival rate, so it must fail the same check.
    assert worst_deviation(run(scenario("unequal"), "fcfs")) >= 0.25


def test_noisy_neighbour_cannot_make_light_tenants_wait() -> None:
    fair, fcfs = (
        run(scenario("noisy-neighbour"), "fair-share"),
        run(scenario("noisy-neighbour"), "fcfs"),
    )
    lights = [t.name for t in fair.tenants if t.name.startswith("light")]
    for light in lights:
        assert fair.tenant(light).wait_p99 <= fcfs.tenant(light).wait_p99 / 10
        assert fair.tenant(light).timed_out == 0
    assert fair.jain >= 0.99
    assert fcfs.jain < 0.5
    # Work-conserving: fairness costs no throughput.
    assert fair.occupancy == pytest.approx(fcfs.occupancy, rel=0.01)


def test_occupancy_cost_shares_slot_seconds_between_short_and_long_requests() -> None:
    fair = run(scenario("short-long", cost="occupancy"), "fair-share")
    short, long = fair.tenant("short").occupancy, fair.tenant("long").occupancy
    assert abs(short - long) / max(short, long) <= 0.05
    # The control: counting requests instead hands the long tenant nearly everything.
    by_request = run(scenario("short-long", cost="requests"), "fair-share")
    assert by_request.tenant("long").occupancy > 5 * by_request.tenant("short").occupancy


def dispatched_after_returns(result: SimResult, tenant: str, within: float) -> list[int]:
    spec = next(s for s in result.scenario.tenants if s.name == tenant)
    assert spec.on_for is not None
    assert spec.off_for is not None
    period = spec.on_for + spec.off_for
    returns = [spec.start + k * period for k in range(1, int(result.scenario.duration // period))]
    counts = []
    for back in returns:
        first = min(r.request.arrival for r in result.records if r.request.tenant == tenant
                    and r.request.arrival >= back)  # fmt: skip
        counts.append(sum(
            1 for r in result.records
            if r.request.tenant == tenant and r.outcome is Outcome.DISPATCHED
            and first <= r.request.arrival + r.wait < first + within
        ))  # fmt: skip
    return counts


class BankingFairShare(FairSharePolicy):
    """fair-share without the lift: idle time becomes credit spent in a burst on return."""

    def _floor(self) -> float:
        return 0.0


def test_a_tenant_back_from_idle_gets_its_share_not_a_burst() -> None:
    on_off = scenario("on-off")
    window, slots = 10.0, on_off.capacity
    fair_share_of_window = slots * window / 2  # two backlogged tenants, 1 s requests
    counts = dispatched_after_returns(run(on_off, "fair-share"), "bursty", window)
    assert len(counts) == 4
    assert max(counts) <= fair_share_of_window + slots
    # The control: with idle credit banked, the returning tenant takes every slot.
    banked = dispatched_after_returns(
        run(on_off, lambda d, c: BankingFairShare()), "bursty", window
    )
    assert max(banked) > fair_share_of_window + slots


def test_criticality_weights_set_the_shares() -> None:
    result = run(scenario("criticality"), "fair-share")
    ratio = result.tenant("critical").occupancy / result.tenant("sheddable").occupancy
    assert ratio == pytest.approx(5.0, rel=0.02)
    assert worst_deviation(result) <= 0.02


def test_simulation_is_reproducible_from_its_seed() -> None:
    first, again = (
        run(scenario("twenty-tenants"), "fair-share"),
        run(scenario("twenty-tenants"), "fair-share"),
    )
    assert first.tenants == again.tenants
    other = run(scenario("twenty-tenants", seed=99), "fair-share")
    assert other.tenants != first.tenants


@pytest.mark.parametrize("policy", ["fcfs", "workload-aware", "fair-share"])
def test_every_simulated_request_is_accounted_for(policy: str) -> None:
    result = run(scenario("twenty-tenants"), policy)
    assert len(result.tenants) == 20
    for tenant in result.tenants:
        pending = sum(
            1 for r in result.records if r.request.tenant == tenant.name and r.outcome is None
        )
        assert tenant.arrived == tenant.dispatched + tenant.rejected + tenant.timed_out + pending
