"""Measures of fairness: the max-min fair allocation and Jain's index.

`max_min_fair` is the reference every fairness claim is checked against, so it
is computed independently of any policy (water-filling): capacity is split
in proportion to weight among the tenants still wanting more; a tenant whose
demand is below its split gets its demand, and the rest is split again.
"""

from __future__ import annotations

from collections.abc import Sequence


def max_min_fair(
    demands: Sequence[float], capacity: float, weights: Sequence[float] | None = None
) -> list[float]:
    """The weighted max-min fair allocation of `capacity` among `demands`."""
    weights = weights or [1.0] * len(demands)
    allocation = [0.0] * len(demands)
    wanting = {i for i, demand in enumerate(demands) if demand > 0}
    left = capacity
    while wanting and left > 1e-12:
        total_weight = sum(weights[i] for i in wanting)
        satisfied = {
            i for i in wanting if demands[i] - allocation[i] <= left * weights[i] / total_weight
        }
        if not satisfied:
            for i in wanting:
                allocation[i] += left * weights[i] / total_weight
            break
        for i in satisfied:
            left -= demands[i] - allocation[i]
            allocation[i] = demands[i]
        wanting -= satisfied
    return allocation


def jain_index(values: Sequence[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one takes everything."""
    if not values:
        return 1.0
    square_sum = sum(v * v for v in values)
    return 1.0 if square_sum == 0 else sum(values) ** 2 / (len(values) * square_sum)
