"""The capacity gates in front of the simulated model server (tests/support/model_server.py)
on virtual time: slots 4 and 64, exponential service times of mean 50 ms, 500 ms and
10 s (first byte after a tenth, at most 50 ms), scrapes every 50 ms, 200 ms and 1 s,
arrivals at 1.5x the server's capacity for 300 mean service times, the first 10% left
out. Prints, per server and service time, each gate's slot utilisation and mean queue
inside the server (worst over the scrape intervals). Deterministic:
`.venv/bin/python docs/capacity_report.py`; `--before 5d5c4a2` adds a column for the
metrics gate as it was at that commit (its module read from git, run on today's
simulator), the README's "metrics, before"; `--transit` prints instead the metrics
gate with up to 0-20 ms of transit each way (requests, first and last bytes crossing),
with and without the running gauge: slots busy / mean / peak waiting in the server."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.capacity.adaptive import AdaptiveCapacity, AdaptiveOptions
from extproc.capacity.saturation import MetricsCapacity, SaturationOptions
from extproc.capacity.static import StaticCapacity
from extproc.clock import VirtualClock
from extproc.contracts import Capacity
from extproc.log import configure_logging
from tests.support.model_server import GateFactory, Result, Scenario, run_scenario

ROOT = Path(__file__).resolve().parents[1]
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


GATES: dict[str, GateFactory] = {
    "static, limit 2 x slots": static,
    "metrics": metrics,
    "adaptive": adaptive,
}


def metrics_at(commit: str) -> GateFactory:
    """The metrics gate of `commit` (extproc/capacity/saturation.py read from git)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:extproc/capacity/saturation.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"saturation_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:saturation.py", "exec"), module.__dict__)
    old: Any = module

    class Before(old.MetricsCapacity):  # type: ignore[misc]
        def on_release(self, started: bool) -> None:
            super().on_release()  # the contract of that day: no `started`

    def make(clock: VirtualClock, scenario: Scenario) -> Capacity:
        stale = max(1.0, 3 * scenario.interval)
        options = old.SaturationOptions(waiting_threshold=scenario.threshold, stale_after=stale)
        gate: Capacity = Before(["sim"], clock, StaticCapacity(0), options)
        return gate

    return make


def worst(results: list[Result]) -> str:
    low = min(r.utilisation for r in results)
    high = max(r.mean_waiting for r in results)
    return f"{low:.0%} / {high:.1f}"


TRANSITS = (0.0, 0.005, 0.02)


def transit_cell(slots: int, threshold: float, service: float, **more: Any) -> str:
    results = []
    for interval in INTERVALS:
        scenario = Scenario(slots, service, interval, threshold, **more)
        results.append(run_scenario(scenario, metrics))
    return f"{worst(results)} / {max(r.max_waiting for r in results)}"


def transit_table() -> None:
    header = "| slots, threshold | mean service | running gauge | "
    print(header + " | ".join(f"transit {t * 1000:g} ms" for t in TRANSITS) + " |")
    print("|" + " --- |" * (3 + len(TRANSITS)))
    for slots, threshold in SERVERS:
        for service in SERVICE_TIMES:
            for running in (True, False):
                cells = [
                    transit_cell(slots, threshold, service, transit=t, running_series=running)
                    for t in TRANSITS
                ]
                gauge = "yes" if running else "no"
                row = f"| {slots}, {threshold:g} | {service * 1000:g} ms | {gauge} | "
                print(row + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="COMMIT", help="add that commit's metrics gate")
    parser.add_argument("--transit", action="store_true", help="the metrics gate under transit")
    args = parser.parse_args()
    configure_logging("console", "error")
    if args.transit:
        transit_table()
        return 0
    gates = dict(GATES)
    if args.before:
        gates = {
            "static, limit 2 x slots": static,
            "metrics, before": metrics_at(args.before),
            "metrics": metrics,
            "adaptive": adaptive,
        }
    header = "| slots, threshold | mean service | " + " | ".join(gates) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(gates)))
    for slots, threshold in SERVERS:
        for service in SERVICE_TIMES:
            cells = []
            for make_gate in gates.values():
                results = [
                    run_scenario(Scenario(slots, service, interval, threshold), make_gate)
                    for interval in INTERVALS
                ]
                cells.append(worst(results))
            print(f"| {slots}, {threshold:g} | {service * 1000:g} ms | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
