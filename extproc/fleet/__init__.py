"""The fleet: several replicas sharing one registry view and one limit via Redis.

Each replica keeps an exact local registry and, every sync interval, runs one
atomic Lua script (`fleet.lua`) that applies its deltas once, renews its lease,
shares the fleet's slots max-min fairly and returns the fleet-wide counters of
the workloads changed since its last sync. Reads
never touch Redis; when Redis is away a replica serves from its local view and
applies what it missed at the next sync.
"""

from extproc.fleet.registry import FleetCounts, SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity

__all__ = ["FleetCounts", "FleetOptions", "FleetSync", "LeasedCapacity", "SharedWorkloadRegistry"]
