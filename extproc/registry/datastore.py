"""The Datastore facade: the one door through which requests are tracked and read.

The stream handler calls the three tracking points (new, dispatched,
completed); policies call the two reads. Every call delegates to the
Workload Registry, so swapping the registry (say, for a shared one) changes
nothing above this line.
"""

from __future__ import annotations

from extproc.contracts import WorkloadMetrics, WorkloadRegistry


class RegistryDatastore:
    def __init__(self, registry: WorkloadRegistry) -> None:
        self._registry = registry

    def workload_handle_new_request(self, workload_id: str) -> None:
        self._registry.increment_active(workload_id)

    def workload_handle_dispatched_request(self, workload_id: str, wait_time: float) -> None:
        self._registry.record_dispatch(workload_id, wait_time)

    def workload_handle_completed_request(self, workload_id: str) -> None:
        self._registry.decrement_active(workload_id)

    def workload_get_metrics(self, workload_id: str) -> WorkloadMetrics | None:
        return self._registry.get_metrics(workload_id)

    def workload_get_request_rate(self, workload_id: str) -> float:
        return self._registry.get_request_rate(workload_id)

    def get_workload_registry(self) -> WorkloadRegistry:
        return self._registry
