"""The capacity gates in front of the simulated model server (tests/support/model_server.py)
on virtual time: slots 4 and 64, exponential service times of mean 50 ms, 500 ms and
10 s (first byte after a tenth, at most 50 ms), scrapes every 50 ms, 200 ms and 1 s,
arrivals at 1.5x the server's capacity for 300 mean service times, the first 10% left
out. Prints, per server and service time, each gate's slot utilisation and mean queue
inside the server (worst over the scrape intervals). Deterministic:
`.venv/bin/python docs/capacity_report.py`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.capacity.adaptive import AdaptiveCapacity, AdaptiveOptions
from extproc.capacity.saturation import MetricsCapacity, SaturationOptions
from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from extproc.log import configure_logging
from tests.support.model_server import Result, Scenario, run_scenario

SERVERS = ((4, 2), (64, 5))
"""(slots, --waiting-threshold)."""
SERVICE_TIMES = (0.05, 0.5, 10.0)
INTERVALS = (0.05, 0.2, 1.0)


def static(clock: VirtualClock, scenario: Scenario) -> Capacity:
    return StaticCapacity(2 * scenario.slots)


def metrics(clock: VirtualClock, scenario: Scenario) -> Capacity:
    stale = max(1.0, 3 * scenario.interval)
    options = SaturationOptions(waiting_threshold=scenario.threshold, stale_after=stale)
    return MetricsCapacity(["sim"], clock, StaticCapacity(0), options)


def adaptive(clock: VirtualClock, scenario: Scenario) -> Capacity:
    return AdaptiveCapacity(clock, AdaptiveOptions(max_limit=4 * scenario.slots))


GATES = {"static, limit 2 x slots": static, "metrics": metrics, "adaptive": adaptive}


def worst(results: list[Result]) -> str:
    low = min(r.utilisation for r in results)
    high = max(r.mean_waiting for r in results)
    return f"{low:.0%} / {high:.1f}"


def main() -> int:
    configure_logging("console", "error")
    header = "| slots, threshold | mean service | " + " | ".join(GATES) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(GATES)))
    for slots, threshold in SERVERS:
        for service in SERVICE_TIMES:
            cells = []
            for make_gate in GATES.values():
                results = [
                    run_scenario(Scenario(slots, service, interval, threshold), make_gate)
                    for interval in INTERVALS
                ]
                cells.append(worst(results))
            print(f"| {slots}, {threshold:g} | {service * 1000:g} ms | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
