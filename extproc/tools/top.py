"""`extproc top`: a live terminal view of every workload, fed by `WatchWorkloads`.

One row per workload -- request rate, active, queued, in flight, dispatched,
average and recent p99 queue wait, share of capacity, and with a --workloads
table the limits in force (weight, in-flight and queued caps, criticality
bound) -- sorted by `--sort`,
under a header with the totals, a sparkline of the queue's depth, the
capacity gate (its limit, and its saturation and each model server's last
scrape, or its latencies), with a shared registry the fleet, and with endpoint
picking a panel of the endpoints (ready, in flight, load, picks, prefix hits).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from extproc.api.v1 import registry_pb2 as pb
from extproc.api.v1 import registry_pb2_grpc as pb_grpc

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 60


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[pb.Workload, pb.WorkloadSnapshot], float]
    text: Callable[[float], str]


def _in_flight(w: pb.Workload, _: pb.WorkloadSnapshot) -> float:
    return float(w.active_requests - w.queued_requests)


def _share(w: pb.Workload, snapshot: pb.WorkloadSnapshot) -> float:
    capacity = snapshot.max_concurrency or snapshot.in_flight
    return _in_flight(w, snapshot) / capacity if capacity else 0.0


COLUMNS: dict[str, Column] = {
    "rate": Column("req/s", lambda w, _: w.request_rate, lambda v: f"{v:.2f}"),
    "active": Column("active", lambda w, _: w.active_requests, lambda v: f"{v:.0f}"),
    "queued": Column("queued", lambda w, _: w.queued_requests, lambda v: f"{v:.0f}"),
    "in-flight": Column("in flight", _in_flight, lambda v: f"{v:.0f}"),
    "dispatched": Column("dispatched", lambda w, _: w.dispatched_count, lambda v: f"{v:.0f}"),
    "wait": Column("avg wait", lambda w, _: w.average_wait_time_seconds, lambda v: f"{v:.3f}s"),
    "p99": Column("p99 wait", lambda w, _: w.recent_p99_wait_seconds, lambda v: f"{v:.3f}s"),
    "share": Column("capacity", _share, lambda v: f"{v:.0%}"),
}


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in values)


def render(snapshot: pb.WorkloadSnapshot, depths: list[int], sort: str, limit: int) -> Group:
    limit_text = snapshot.max_concurrency or "unlimited"
    header = Text.assemble(
        ("workload-extproc  ", "bold"),
        f"in flight {snapshot.in_flight}/{limit_text}   queued {snapshot.queued}   "
        f"workloads {len(snapshot.workloads)}   queue ",
        (sparkline(depths), "cyan"),
    )
    table = Table(expand=True)
    table.add_column("workload", overflow="ellipsis", max_width=32)
    for key, column in COLUMNS.items():
        table.add_column(column.title + (" ▼" if key == sort else ""), justify="right")
    with_limits = any(w.HasField("limits") for w in snapshot.workloads)
    if with_limits:
        table.add_column("limits")
    rows = sorted(snapshot.workloads, key=lambda w: COLUMNS[sort].value(w, snapshot), reverse=True)
    for workload in rows[:limit]:
        cells = [c.text(c.value(workload, snapshot)) for c in COLUMNS.values()]
        if with_limits:
            cells.append(limits_text(workload.limits) if workload.HasField("limits") else "")
        table.add_row(workload.workload_id, *cells)
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more workloads not shown (--limit)"
    fleet = [fleet_line(snapshot.fleet)] if snapshot.HasField("fleet") else []
    pool = [pool_table(snapshot.pool)] if snapshot.HasField("pool") else []
    return Group(header, *capacity_lines(snapshot.capacity), *fleet, *pool, table)


def pool_table(pool: pb.Pool) -> Table:
    """The endpoints panel: one row per model server the picker chooses among."""
    table = Table(title=f"endpoints (picker {pool.picker})", expand=True)
    for title in ("endpoint", "ready", "in flight", "waiting", "running", "queue", "kv",
                  "scraped", "picked", "prefix hits"):  # fmt: skip
        table.add_column(title, justify="left" if title == "endpoint" else "right")
    for e in pool.endpoints:
        table.add_row(
            e.address,
            Text("yes", "green") if e.ready else Text("no", "red"),
            str(e.in_flight),
            f"{e.waiting:.0f}" if e.HasField("waiting") else "-",
            f"{e.running:.0f}" if e.HasField("running") else "-",
            f"{e.queue_depth:.0f}",
            f"{e.kv_cache_usage:.0%}" if e.HasField("kv_cache_usage") else "-",
            f"{e.scrape_age_seconds:.2f}s ago" if e.HasField("scrape_age_seconds") else "never",
            str(e.picked),
            str(e.prefix_hits),
        )
    return table


def limits_text(limits: pb.WorkloadLimits) -> str:
    """The limits in force, briefly: `weight 4  in flight ≤8  queued ≤50  crit ≤3`."""
    if not limits.allow:
        return "not allowed"
    parts = []
    if limits.HasField("weight"):
        parts.append(f"weight {limits.weight:g}")
    if limits.HasField("max_in_flight"):
        parts.append(f"in flight ≤{limits.max_in_flight}")
    if limits.HasField("max_queued"):
        parts.append(f"queued ≤{limits.max_queued}")
    if limits.HasField("max_criticality"):
        parts.append(f"crit ≤{limits.max_criticality}")
    return "  ".join(parts) or "-"


def fleet_line(fleet: pb.Fleet) -> Text:
    state = ("synced", "green") if fleet.connected else ("Redis unreachable: local view", "red")
    age = f"{fleet.sync_age_seconds:.2f}s ago" if fleet.HasField("sync_age_seconds") else "never"
    return Text.assemble(
        f"fleet {fleet.replicas} replicas   ", state,
        f" (last {age}, {fleet.sync_errors} errors)   this replica {fleet.replica}",
    )  # fmt: skip


def capacity_lines(capacity: pb.Capacity) -> list[Text]:
    limit = capacity.limit or "unlimited"
    parts = [f"capacity {capacity.mode or 'static'}   limit {limit}"]
    if capacity.HasField("saturation"):
        parts.append(f"saturation {capacity.saturation:.2f}")
    if capacity.fallback:
        parts.append("metrics stale: static limit in force")
    if capacity.HasField("latency_seconds"):
        parts.append(f"first byte {capacity.latency_seconds * 1000:.1f} ms")
    if capacity.HasField("min_latency_seconds"):
        parts.append(f"no-load {capacity.min_latency_seconds * 1000:.1f} ms")
    lines = [Text("   ".join(parts))]
    for endpoint in capacity.endpoints:
        waiting = f"{endpoint.waiting:.0f}" if endpoint.HasField("waiting") else "-"
        kv = f"{endpoint.kv_cache_usage:.0%}" if endpoint.HasField("kv_cache_usage") else "-"
        running = f"{endpoint.running:.0f}" if endpoint.HasField("running") else "-"
        slots = f"{endpoint.slots:.0f}" if endpoint.HasField("slots") else "-"
        age = (
            f"{endpoint.scrape_age_seconds:.2f}s ago"
            if endpoint.HasField("scrape_age_seconds")
            else "never scraped"
        )
        errors = f"   errors {endpoint.scrape_errors}" if endpoint.scrape_errors else ""
        lines.append(
            Text(
                f"  {endpoint.url}   waiting {waiting}   running {running} of ~{slots} slots"
                f"   kv {kv}   {age}{errors}",
                style="dim",
            )
        )
    return lines


async def watch(
    address: str, *, sort: str, limit: int, interval: float, once: bool, token: str | None
) -> None:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    request = pb.WatchWorkloadsRequest(
        interval=duration_pb2.Duration(seconds=int(interval), nanos=int(interval % 1 * 1e9))
    )
    depths: deque[int] = deque(maxlen=HISTORY)
    console = Console()
    async with grpc.aio.insecure_channel(address) as channel:
        stream = pb_grpc.WorkloadRegistryStub(channel).WatchWorkloads(request, metadata=metadata)
        if once:
            snapshot = await stream.read()
            assert isinstance(snapshot, pb.WorkloadSnapshot)
            depths.append(snapshot.queued)
            console.print(render(snapshot, list(depths), sort, limit))
            stream.cancel()
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            async for snapshot in stream:
                depths.append(snapshot.queued)
                live.update(render(snapshot, list(depths), sort, limit), refresh=True)


def run(address: str, **options: object) -> int:
    try:
        asyncio.run(watch(address, **options))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 0
    except grpc.aio.AioRpcError as error:
        Console(stderr=True).print(f"extproc top: {address}: {error.details()}")
        return 1
    return 0
