"""Read APIs over the registry and the queue: the gRPC `WorkloadRegistry` service and
the views the HTTP admin listener renders. Both show the same `WorkloadStatus`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from extproc.api.v1 import registry_pb2 as pb
from extproc.api.v1 import registry_pb2_grpc as pb_grpc
from extproc.contracts import CapacityStatus, Datastore, FleetStatus, WorkloadMetrics
from extproc.flowcontrol.queue import FlowController
from extproc.pool.pool import PoolStatus
from extproc.service.auth import BearerToken
from extproc.stats import percentile
from extproc.workloads import Workloads, WorkloadSpec

DEFAULT_WATCH_INTERVAL = 1.0
MIN_WATCH_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A workload's registry metrics, how many of its requests are queued now, and the
    limits in force for it (None without a --workloads table)."""

    metrics: WorkloadMetrics
    queued_requests: int
    recent_p99_wait: float = 0.0
    limits: WorkloadSpec | None = None

    def as_json(self) -> dict[str, object]:
        fields = self._fields()
        if self.limits is not None:
            fields["limits"] = self.limits.model_dump()
        return fields

    def as_proto(self) -> pb.Workload:
        workload = pb.Workload(**self._fields())  # type: ignore[arg-type]
        if self.limits is not None:
            workload.limits.CopyFrom(pb.WorkloadLimits(**self.limits.model_dump()))
        return workload

    def _fields(self) -> dict[str, object]:
        m = self.metrics
        return {
            "workload_id": m.workload_id,
            "total_requests": m.total_requests,
            "active_requests": m.active_requests,
            "queued_requests": self.queued_requests,
            "dispatched_count": m.dispatched_count,
            "average_wait_time_seconds": m.average_wait_time,
            "request_rate": m.request_rate,
            "recent_p99_wait_seconds": self.recent_p99_wait,
        }


class WorkloadReader:
    def __init__(
        self,
        datastore: Datastore,
        flow: FlowController,
        fleet: Callable[[], FleetStatus] | None = None,
        workloads: Workloads | None = None,
        pool: Callable[[], PoolStatus] | None = None,
    ) -> None:
        self._registry = datastore.get_workload_registry()
        self.flow = flow
        self.fleet = fleet
        """This replica's view of its fleet, when the registry is shared."""
        self.workloads = workloads
        self.pool = pool
        """The endpoints and their state, when endpoint picking is on."""

    def get(self, workload_id: str) -> WorkloadStatus | None:
        metrics = self._registry.get_metrics(workload_id)
        if metrics is None:
            return None
        waits = self._registry.recent_waits().get(workload_id, [])
        return self._status(metrics, waits)

    def list(self) -> list[WorkloadStatus]:
        waits = self._registry.recent_waits()
        return [
            self._status(m, waits.get(m.workload_id, [])) for m in self._registry.list_metrics()
        ]

    def _status(self, metrics: WorkloadMetrics, waits: Sequence[float]) -> WorkloadStatus:
        workload_id = metrics.workload_id
        table = self.workloads.table if self.workloads and self.workloads.path else None
        return WorkloadStatus(
            metrics,
            self.flow.queued_for(workload_id),
            percentile(waits, 99),
            table.spec(workload_id) if table is not None else None,
        )

    def snapshot(self) -> pb.WorkloadSnapshot:
        time = timestamp_pb2.Timestamp()
        time.GetCurrentTime()
        return pb.WorkloadSnapshot(
            time=time,
            workloads=[status.as_proto() for status in self.list()],
            in_flight=self.flow.in_flight,
            queued=self.flow.queued,
            max_concurrency=self.flow.max_concurrency,
            capacity=capacity_proto(self.flow.capacity.status()),
            fleet=fleet_proto(self.fleet()) if self.fleet is not None else None,
            pool=pool_proto(self.pool()) if self.pool is not None else None,
        )


def fleet_proto(status: FleetStatus) -> pb.Fleet:
    return pb.Fleet(
        replica=status.replica,
        connected=status.connected,
        replicas=status.replicas,
        sync_errors=status.errors,
        sync_age_seconds=status.age,
    )


def pool_proto(status: PoolStatus) -> pb.Pool:
    return pb.Pool(
        picker=status.picker,
        endpoints=[
            pb.PoolEndpoint(
                address=e.address,
                ready=e.ready,
                in_flight=e.in_flight,
                waiting=e.waiting,
                running=e.running,
                kv_cache_usage=e.kv_cache_usage,
                queue_depth=e.queue_depth,
                saturation=e.saturation,
                scrape_age_seconds=e.scrape_age,
                picked=e.picked,
                prefix_hits=e.prefix_hits,
                scrape_errors=e.scrape_errors,
            )
            for e in status.endpoints
        ],
    )


def capacity_proto(status: CapacityStatus) -> pb.Capacity:
    return pb.Capacity(
        mode=status.mode,
        limit=status.limit,
        saturation=status.saturation,
        fallback=status.fallback,
        min_latency_seconds=status.min_latency,
        latency_seconds=status.latency,
        endpoints=[
            pb.BackendEndpoint(
                url=e.url,
                waiting=e.waiting,
                kv_cache_usage=e.kv_cache_usage,
                saturation=e.saturation,
                scrape_age_seconds=e.age,
                scrape_errors=e.errors,
                last_error=e.last_error,
                running=e.running,
                slots=e.slots,
            )
            for e in status.endpoints
        ],
    )


Context = grpc.aio.ServicerContext[object, object]


class WorkloadRegistryService(pb_grpc.WorkloadRegistryServicer):
    def __init__(self, reader: WorkloadReader, token: BearerToken) -> None:
        self._reader = reader
        self._token = token

    async def _authorize(self, context: Context) -> None:
        if self._token.required:
            metadata = dict(context.invocation_metadata() or ())
            if not self._token.allows(str(metadata.get("authorization", ""))):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token required")

    async def GetMetrics(  # gRPC method names
        self, request: pb.GetMetricsRequest, context: Context
    ) -> pb.Workload:
        await self._authorize(context)
        status = self._reader.get(request.workload_id)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"workload {request.workload_id!r} is not tracked"
            )
        assert status is not None
        return status.as_proto()

    async def ListWorkloads(
        self, request: pb.ListWorkloadsRequest, context: Context
    ) -> pb.ListWorkloadsResponse:
        await self._authorize(context)
        return pb.ListWorkloadsResponse(workloads=[s.as_proto() for s in self._reader.list()])

    async def WatchWorkloads(
        self, request: pb.WatchWorkloadsRequest, context: Context
    ) -> AsyncIterator[pb.WorkloadSnapshot]:
        await self._authorize(context)
        interval = request.interval.ToTimedelta().total_seconds() or DEFAULT_WATCH_INTERVAL
        interval = max(interval, MIN_WATCH_INTERVAL)
        while True:
            yield self._reader.snapshot()
            await asyncio.sleep(interval)
