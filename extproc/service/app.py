"""Wiring: build the registry, datastore, policy, queue and servers from Settings, and run them.

Lifecycle: `start` binds the gRPC port (ext_proc stream, read API, health,
reflection; TLS as `tls.py` says), the plaintext health port if asked, and the
HTTP admin port, then reports ready. Health services: `liveness` is SERVING
while the process runs; `readiness` (and `/readyz`) once started and, in pool
mode, once every endpoint source has synced at least once (the pool is known);
"" and the ext_proc service name once started. `stop` (on SIGTERM or
SIGINT) drains:
1. readiness and the health services turn NOT_SERVING, so probes and Envoy's
   health check route new traffic elsewhere; requests that still arrive are
   answered 503 `shutdown`;
2. queued requests keep being dispatched as capacity frees, for at most
   `--drain-timeout` seconds; whatever is still queued then gets 503 `shutdown`;
3. responses in flight get `--shutdown-grace` seconds to finish;
4. the server closes; streams still open are cancelled, and each cancellation
   still runs its stream's completion bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
from collections.abc import Coroutine
from typing import Protocol

import grpc
import structlog
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from extproc.addresses import parse_address, redact_url
from extproc.api.v1 import registry_pb2, registry_pb2_grpc
from extproc.capacity.adaptive import AdaptiveCapacity
from extproc.capacity.saturation import MetricsCapacity
from extproc.capacity.scraper import Scraper
from extproc.capacity.static import StaticCapacity
from extproc.clock import SystemClock
from extproc.config import Settings
from extproc.context import ContextParser
from extproc.contracts import Capacity, Clock
from extproc.fleet.registry import SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity
from extproc.flowcontrol.policies import make_policy
from extproc.flowcontrol.queue import FlowController
from extproc.log import RequestLog
from extproc.objectives import SHEDDABLE_CRITICALITY, ObjectiveTable
from extproc.pool.discovery import DnsDiscovery, add_static
from extproc.pool.kubernetes import InferenceObjectiveWatch, InferencePoolWatch
from extproc.pool.picker import make_picker
from extproc.pool.pool import EndpointPool
from extproc.pool.scorers import ScorerWeights
from extproc.pool.scraper import EndpointScraper
from extproc.registry.datastore import RegistryDatastore
from extproc.registry.memory import InMemoryWorkloadRegistry
from extproc.service.admin import make_admin_app
from extproc.service.auth import BearerToken
from extproc.service.extproc import ExternalProcessorService
from extproc.service.metrics import Metrics
from extproc.service.readapi import WorkloadReader, WorkloadRegistryService
from extproc.service.tls import server_credentials
from extproc.tasks import cancel_and_wait
from extproc.workloads import Workloads

# Envoy's message timeout is extended by this much beyond the queue timeout, so
# that the queue, not Envoy, decides when a held request has waited too long.
HOLD_MARGIN = 1.0
EXT_PROC_SERVICE = ext_proc_pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["WorkloadRegistry"].full_name
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
# Every HTTP request opens one ext_proc stream, and a burst of arrivals lands
# faster than grpc.aio accepts calls. grpc-core queues unaccepted calls and,
# past 1,000 of them, refuses new streams at random (Envoy answers those 500).
# Measured here: 1,500 simultaneous requests lost ~50 to it. Raised so a burst
# as large as the queue itself is accepted.
_GRPC_OPTIONS = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


class Service:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        clock = clock or SystemClock()
        local = InMemoryWorkloadRegistry(
            clock,
            ema_alpha=settings.wait_ema_alpha,
            rate_window=settings.rate_window,
            max_workloads=settings.max_workloads,
            idle_ttl=settings.workload_idle_ttl,
        )
        shared = settings.registry != "memory"
        self.registry: InMemoryWorkloadRegistry | SharedWorkloadRegistry = (
            SharedWorkloadRegistry(local, clock, stale_after=settings.registry_lease)
            if shared
            else local
        )
        self.datastore = RegistryDatastore(self.registry)
        self.workloads = Workloads(settings.workloads)
        options = dataclasses.replace(
            settings.policy_options(), workload_weight=self.workloads.weight
        )
        policy = make_policy(settings.policy, self.datastore, clock, options)
        self.capacity = make_capacity(settings, clock)
        self._scraper = (
            Scraper(self.capacity, settings.backend_metrics_interval)
            if isinstance(self.capacity, MetricsCapacity)
            else None
        )
        self.pool = make_pool(settings, clock)
        self._pool_tasks = _pool_tasks(settings, self.pool, clock) if self.pool else []
        self.flow = FlowController(
            policy,
            clock,
            capacity=self.capacity,
            max_queue=settings.max_queue,
            queue_timeout=settings.queue_timeout,
            limits=self.workloads.limits,
            shed_below=_shed_below(settings),
            pool=self.pool,
        )
        self.workloads.on_change(self.flow.reconfigure)
        self.fleet = (
            FleetSync(
                self.registry,
                _fleet_options(settings),
                lambda: (self.flow.in_flight, self.flow.queued),
                self.capacity if isinstance(self.capacity, LeasedCapacity) else None,
            )
            if isinstance(self.registry, SharedWorkloadRegistry)
            else None
        )
        fleet_status = self.fleet.status if self.fleet is not None else None
        pool_status = self.pool.status if self.pool is not None else None
        self.reader = WorkloadReader(
            self.datastore, self.flow, fleet_status, self.workloads, pool_status
        )
        self.metrics = Metrics(
            self.reader,
            settings.metrics_top_workloads,
            fleet_status,
            self.workloads,
            pool_status,
        )
        self.flow.on_pick = self.metrics.decision.observe
        self.objectives = self._objective_table()
        parser = ContextParser(
            settings.default_workload if settings.on_missing_context == "default" else None,
            settings.workload_header,
            self.objectives,
        )
        self.ext_proc = ExternalProcessorService(
            self.datastore,
            self.flow,
            parser,
            clock,
            self.metrics,
            hold_timeout=settings.queue_timeout + HOLD_MARGIN,
            overflow_when_full=settings.on_registry_full == "overflow",
            pick_endpoints=settings.endpoints_configured,
            conformance_hooks=settings.conformance_test_hooks,
            max_body_bytes=settings.max_body_bytes,
            count_tokens=settings.policy == "fair-share" and settings.fair_share_cost == "tokens",
            workloads=self.workloads,
            request_log=RequestLog(),
        )
        self.health = HealthServicer()
        self.token = BearerToken(settings.admin_token)
        self.ready = False
        self._pool_synced = [
            task.synced
            for task in self._pool_tasks
            if isinstance(task, DnsDiscovery | InferencePoolWatch)
        ]
        self.grpc_port = 0
        self.admin_port = 0
        self.health_port = 0
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._synced_waiter: asyncio.Task[None] | None = None
        self._admin: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("extproc")

    async def start(self) -> None:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(self.ext_proc, server)
        registry_pb2_grpc.add_WorkloadRegistryServicer_to_server(
            WorkloadRegistryService(self.reader, self.token), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (EXT_PROC_SERVICE, REGISTRY_SERVICE, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
            server,
        )
        settings = self.settings
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.secure_serving
        )
        self.grpc_port = (
            server.add_secure_port(self.settings.listen, credentials)
            if credentials
            else server.add_insecure_port(self.settings.listen)
        )
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await self._set_ready(False)  # alive, not ready, while the rest starts
        await server.start()
        self._server = server
        if settings.health_listen is not None:
            self._health_server = await self._start_health(settings.health_listen)
        self._admin = await self._start_admin()
        self._sweeper = asyncio.create_task(self._sweep_forever())
        if self.settings.workloads is not None:
            self._reloader = asyncio.create_task(self._reload_forever())
        if self._scraper is not None:
            await self._scraper.start()
        for task in self._pool_tasks:
            await task.start()
        if self.fleet is not None:
            await self.fleet.start()
        await self._set_ready(True)
        if not self.pool_known:
            self._synced_waiter = asyncio.create_task(self._ready_when_synced())
        self._log.info(
            "serving",
            grpc=self.settings.listen.rsplit(":", 1)[0] + f":{self.grpc_port}",
            admin=self.settings.admin_listen.rsplit(":", 1)[0] + f":{self.admin_port}",
            policy=self.settings.policy,
            capacity=self.capacity.name,
            registry=redact_url(self.settings.registry),
            tls=_tls_mode(self.settings),
            health=_port_of(self.settings.health_listen, self.health_port),
            max_concurrency=self.settings.max_concurrency,
            max_queue=self.settings.max_queue,
            queue_timeout=self.settings.queue_timeout,
            workloads=str(self.settings.workloads) if self.settings.workloads else None,
            workload_header=self.settings.workload_header,
            shed_below=self.flow.shed_below,
        )

    async def stop(self, drain_timeout: float | None = None, grace: float | None = None) -> None:
        """Drain, then stop: see the module docstring. Every request is counted out."""
        drain = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        grace = self.settings.shutdown_grace if grace is None else grace
        self._log.info("draining", queued=self.flow.queued, in_flight=self.flow.in_flight)
        await self._set_ready(False)
        self.flow.stop_accepting()
        await _within(drain, self.flow.wait_for(lambda: self.flow.queued == 0))
        self.flow.close()
        await _within(grace, self.flow.wait_for(lambda: self.flow.in_flight == 0))
        await cancel_and_wait(self._sweeper, self._reloader, self._synced_waiter)
        self._sweeper = self._reloader = self._synced_waiter = None
        if self._scraper is not None:
            await self._scraper.stop()
        for task in reversed(self._pool_tasks):
            await task.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        for server in (self._server, self._health_server):
            if server is not None:
                await server.stop(0)
        self._server = self._health_server = None
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        self._log.info("stopped")

    def _objective_table(self) -> ObjectiveTable | None:
        """With --inference-pool: the pool's InferenceObjectives, watched like its Pods."""
        name = self.settings.inference_pool
        if name is None:
            return None
        unknown = Counter(
            "extproc_objective_unknown",
            "Requests naming an x-gateway-inference-objective the pool does not define.",
            registry=self.metrics.registry,
        )
        table = ObjectiveTable(on_unknown=unknown.inc)
        # Not waited for long, and not part of readiness: a cluster without the
        # InferenceObjective CRD still serves, every objective unknown.
        self._pool_tasks.append(InferenceObjectiveWatch(table, name, sync_timeout=1.0))
        return table

    @property
    def pool_known(self) -> bool:
        """Every endpoint source synced once (true at once without discovery)."""
        return all(synced.is_set() for synced in self._pool_synced)

    def readiness(self) -> bool:
        return self.ready and self.pool_known

    async def _ready_when_synced(self) -> None:
        await asyncio.gather(*(synced.wait() for synced in self._pool_synced))
        self._log.info("endpoints synced: ready")
        await self._set_ready(self.ready)

    async def _start_health(self, address: str) -> grpc.aio.Server:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        return server

    def sweep(self) -> int:
        """Forget idle workloads in the registry and the policy; returns how many."""
        forgotten = self.registry.sweep()
        for workload_id in forgotten:
            self.flow.forget(workload_id)
        return len(forgotten)

    async def _sweep_forever(self) -> None:
        interval = min(self.settings.workload_idle_ttl / 4, 30.0)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.workloads_reload_interval)
            self.workloads.reload_if_changed()

    async def _start_admin(self) -> web.AppRunner:
        app = make_admin_app(self.reader, self.readiness, self.token, self.metrics.registry)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_address(self.settings.admin_listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        self.admin_port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        return runner

    async def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        states = {name: ready for name in HEALTH_SERVICES}
        # Liveness stays SERVING while the process runs: a pool still syncing, or a
        # drain, is no reason to restart it.
        states["liveness"] = True
        states["readiness"] = self.readiness()
        for name, up in states.items():
            await self.health.set(name, serving if up else not_serving)


def make_capacity(settings: Settings, clock: Clock) -> Capacity:
    shared = settings.registry != "memory"
    if shared and settings.capacity == "static" and settings.max_concurrency > 0:
        return LeasedCapacity(
            settings.max_concurrency,
            clock,
            settings.registry_lease,
            margin=settings.registry_sync_interval,
            replicas=settings.registry_replicas_hint,
        )
    static = StaticCapacity(settings.max_concurrency)
    if settings.capacity == "metrics":
        return MetricsCapacity(
            settings.backend_metrics_url, clock, static, settings.saturation_options()
        )
    if settings.capacity == "adaptive":
        return AdaptiveCapacity(clock, settings.adaptive_options())
    return static


def make_pool(settings: Settings, clock: Clock) -> EndpointPool | None:
    """The endpoint pool, when endpoints are configured; None leaves routing to Envoy."""
    if not settings.endpoints_configured:
        return None
    picker = make_picker(settings.picker, ScorerWeights.parse(settings.scorers))
    pool = EndpointPool(clock, picker, settings.endpoint_options(), fallbacks=settings.fallbacks)
    if settings.endpoints:
        add_static(pool, settings.endpoints)
    return pool


class _Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _pool_tasks(settings: Settings, pool: EndpointPool, clock: Clock) -> list[_Lifecycle]:
    """Discovery first, so the scraper's first round meets the endpoints found."""
    tasks: list[_Lifecycle] = [
        DnsDiscovery(pool, name, settings.endpoints_dns_interval) for name in settings.endpoints_dns
    ]
    if settings.inference_pool:
        tasks.append(InferencePoolWatch(pool, settings.inference_pool))
    tasks.append(
        EndpointScraper(
            pool, clock, settings.endpoint_scrape_interval, settings.endpoint_metrics_path
        )
    )
    return tasks


def _fleet_options(settings: Settings) -> FleetOptions:
    return FleetOptions(
        url=settings.registry,
        interval=settings.registry_sync_interval,
        lease=settings.registry_lease,
        prefix=settings.registry_prefix,
        rate_window=settings.rate_window,
        ema_alpha=settings.wait_ema_alpha,
        idle_ttl=settings.workload_idle_ttl,
    )


def _shed_below(settings: Settings) -> int:
    """With InferenceObjectives, a negative priority is sheddable, as upstream."""
    if settings.inference_pool is None:
        return settings.shed_below
    return max(settings.shed_below, SHEDDABLE_CRITICALITY + 1)


def _tls_mode(settings: Settings) -> str:
    if settings.tls_client_ca is not None:
        return "mutual"
    if settings.tls_cert is not None:
        return "certificate"
    return "self-signed" if settings.secure_serving else "off"


def _port_of(address: str | None, port: int) -> str | None:
    return None if address is None else address.rsplit(":", 1)[0] + f":{port}"


async def _within(seconds: float, waiting: Coroutine[None, None, None]) -> None:
    """Await `waiting`, giving up after `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waiting, seconds)


async def run(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    service = Service(settings)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await service.stop()
