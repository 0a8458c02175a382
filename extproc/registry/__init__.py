"""The Workload Registry: per-workload counters behind the Datastore facade.

The process's one piece of global mutable state. It is told of every
request's three tracking points (new, dispatched, completed) and answers with
copies, never live objects, so a caller cannot change the counts it reads.
Guarantees: every request counted in is counted out exactly once; the request
rate is a sliding window in constant memory; the registry is bounded
(`--max-workloads`, idle TTL).
"""

from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import OVERFLOW_WORKLOAD, InMemoryWorkloadRegistry
from extproc.registry.rate import SlidingWindowRate

__all__ = [
    "OVERFLOW_WORKLOAD",
    "InMemoryWorkloadRegistry",
    "RegistryDatastore",
    "SlidingWindowRate",
]
