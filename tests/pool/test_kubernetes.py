"""The InferencePool watch against an API server of the tests' own, speaking list+watch.

Recorded sequence: a list; a watch in which a Pod goes unready and another
ready, closed cleanly by the server (the client resumes from the last
version); a watch answered 410 Gone (a fresh list, where a Pod has gone and one
has come); a watch whose connection breaks (back off, list again). The pool
must equal the expected set after every step, and keep the last set while the
API server is unreachable.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lightkube import AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from structlog.testing import capture_logs

from extproc.clock import VirtualClock
from extproc.config import Settings
from extproc.objectives import ObjectiveTable
from extproc.pool.discovery import DnsDiscovery
from extproc.pool.kubernetes import (
    BACKOFF_FIRST,
    InferenceObjective,
    InferenceObjectiveWatch,
    InferencePoolWatch,
    objective_priority,
)
from extproc.service.app import Service
from tests.pool.support import make_pool
from tests.support.extproc_client import immediate_headers, request_headers
from tests.support.pool_endpoint import PoolEndpoint

NAMESPACE, POOL = "models", "chat-pool"


def kubeconfig(url: str) -> KubeConfig:
    return KubeConfig.from_dict(kubeconfig_file(url))


def use_kubeconfig(url: str, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the service's own client (KUBECONFIG) at the test's API server."""
    config = directory / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig_file(url)))
    monkeypatch.setenv("KUBECONFIG", str(config))


def kubeconfig_file(url: str) -> dict[str, Any]:
    """What KUBECONFIG would hold: the server and a bearer token."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }  # fmt: skip


def pod(name: str, ip: str, ready: bool, version: str) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "resourceVersion": version,
                     "labels": {"app": "vllm"}},
        "status": {"phase": "Running", "podIP": ip, "conditions": conditions},
    }  # fmt: skip


def pod_list(version: str, *pods: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": version},
            "items": list(pods)}  # fmt: skip


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


GONE = event(
    "ERROR",
    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
     "message": "too old resource version", "code": 410},
)  # fmt: skip
CLOSE, BREAK, HOLD = "close", "break", "hold"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeApiServer:
    """Answers from recorded scripts, in order; records every request's query."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.step = asyncio.Event()
        self.gate = asyncio.Event()
        """Pod lists wait for this."""
        self.gate.set()
        self.target_port = 8000

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(
            f"/apis/inference.networking.k8s.io/v1/namespaces/{NAMESPACE}/inferencepools/{POOL}",
            self.inference_pool,
        )
        app.router.add_get(f"/api/v1/namespaces/{NAMESPACE}/pods", self.pods)
        return app

    async def inference_pool(self, request: web.Request) -> web.Response:
        self.requests.append(("pool", dict(request.query)))
        return web.json_response({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": NAMESPACE, "resourceVersion": "1"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                     "targetPorts": [{"number": self.target_port}],
                     "endpointPickerRef": {"name": "workload-extproc", "port": {"number": 9002}}},
        })  # fmt: skip

    async def pods(self, request: web.Request) -> web.StreamResponse:
        assert request.headers["authorization"] == "Bearer test-token"
        query = dict(request.query)
        if query.get("watch") != "true":
            self.requests.append(("list", query))
            await self.gate.wait()
            return web.json_response(self.lists.pop(0))
        self.requests.append(("watch", query))
        script = self.watches.pop(0) if self.watches else [HOLD]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for item in script:
            if item == HOLD:
                await asyncio.Event().wait()
            if item == BREAK:
                assert request.transport is not None
                request.transport.close()  # mid-stream: the chunked body never ends
                return response
            if item == CLOSE:
                break
            await response.write(json.dumps(item).encode() + b"\n")
        await response.write_eof()
        return response


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[FakeApiServer], Any]]:
    runners: list[web.AppRunner] = []

    async def start(server: FakeApiServer) -> str:
        runner = web.AppRunner(server.app(), shutdown_timeout=0.1)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_watch_follows_readiness_410_gone_and_a_broken_connection(
    serve: Callable[[FakeApiServer], Any],
) -> None:
    a, b, c, d = "10.1.0.1:8000", "10.1.0.2:8000", "10.1.0.3:8000", "10.1.0.4:8000"
    server = FakeApiServer(
        lists=[
            pod_list("100", pod("a", "10.1.0.1", True, "90"), pod("b", "10.1.0.2", True, "91"),
                     pod("c", "10.1.0.3", False, "92")),
            pod_list("200", pod("a", "10.1.0.1", True, "190"), pod("c", "10.1.0.3", True, "191"),
                     pod("d", "10.1.0.4", True, "199")),
            pod_list("300", pod("c", "10.1.0.3", True, "291"), pod("d", "10.1.0.4", True, "299")),
        ],
        watches=[
            [event("MODIFIED", pod("b", "10.1.0.2", False, "101")),
             event("MODIFIED", pod("c", "10.1.0.3", True, "102")), CLOSE],
            [GONE],
            [event("DELETED", pod("a", "10.1.0.1", True, "201")), BREAK],
        ],
    )  # fmt: skip
    url = await serve(server)
    clock = VirtualClock()
    pool = make_pool(clock, [])
    watch = InferencePoolWatch(
        pool, f"{NAMESPACE}/{POOL}", lambda: AsyncClient(config=kubeconfig(url))
    )
    seen: list[dict[str, bool]] = []

    def states() -> dict[str, bool]:
        now = clock.now()
        return {address: pool.endpoint(address).ready(now) for address in pool.addresses}  # type: ignore[union-attr]

    pool.on_update(lambda: seen.append(states()))
    await watch.start()
    try:
        assert seen[0] == {a: True, b: True, c: False}  # the first list
        await until(lambda: {a: True, b: False, c: True} in seen)  # watch 1, both events
        await until(lambda: {a: True, c: True, d: True} in seen)  # 410 -> list 2: b gone, d new
        await until(lambda: states() == {c: True, d: True})  # broken -> backoff -> list 3
        await until(lambda: [kind for kind, _ in server.requests].count("watch") >= 4)
    finally:
        await watch.stop()
    # Every published set is one the sequence implies, in order: nothing emptied the pool.
    assert all(state for state in seen)
    assert watch.relists == 3
    watches = [query for kind, query in server.requests if kind == "watch"]
    assert [w.get("resourceVersion") for w in watches] == ["100", "102", "200", "300"]
    assert all(w["labelSelector"] == "app=vllm" for w in watches)
    assert [kind for kind, _ in server.requests][:3] == ["pool", "list", "watch"]


async def test_an_unreachable_api_server_keeps_the_last_set_and_never_halts(
    serve: Callable[[FakeApiServer], Any],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed once we leave
    clock = VirtualClock()
    pool = make_pool(clock, ["10.9.0.1:8000"])
    watch = InferencePoolWatch(
        pool, f"{NAMESPACE}/{POOL}", lambda: AsyncClient(config=kubeconfig(url)), sync_timeout=0.5
    )
    await watch.start()  # gives up waiting for the first list after a bound, then serves
    try:
        assert not watch.synced.is_set()
        assert pool.addresses == ["10.9.0.1:8000"]  # the static source is untouched
    finally:
        await watch.stop()


async def test_dns_discovery_follows_the_records_and_keeps_them_through_a_failure() -> None:
    answers: list[list[str] | OSError] = [
        ["10.2.0.1", "fd00::1"],
        OSError("temporary failure in name resolution"),
        ["10.2.0.2"],
    ]

    async def resolver(name: str, port: int) -> list[str]:
        assert (name, port) == ("vllm.models.svc", 8000)
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    pool = make_pool(VirtualClock(), [])
    dns = DnsDiscovery(pool, "vllm.models.svc:8000", interval=3600, resolver=resolver)
    await dns.refresh()
    assert pool.addresses == ["10.2.0.1:8000", "[fd00::1]:8000"]
    await dns.refresh()  # the lookup failed: the last set stays
    assert pool.addresses == ["10.2.0.1:8000", "[fd00::1]:8000"]
    await dns.refresh()
    assert pool.addresses == ["10.2.0.2:8000"]


async def test_the_backoff_starts_over_after_a_round_that_listed(
    serve: Callable[[FakeApiServer], Any],
) -> None:
    # Each round lists, then its watch breaks mid-stream: the API server was up each
    # time, so no reconnect may wait longer than the first backoff step.
    rounds = 4
    server = FakeApiServer(
        lists=[pod_list(str(n), pod("a", "10.1.0.1", True, str(n))) for n in range(rounds)],
        watches=[[BREAK] for _ in range(rounds)],
    )
    url = await serve(server)
    delays: list[float] = []
    parked = asyncio.Event()

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) >= rounds:
            parked.set()
            await asyncio.Event().wait()  # stop here; stop() cancels it

    watch = InferencePoolWatch(
        make_pool(VirtualClock(), []),
        f"{NAMESPACE}/{POOL}",
        lambda: AsyncClient(config=kubeconfig(url)),
        sleep=sleep,
    )
    await watch.start()
    try:
        await asyncio.wait_for(parked.wait(), 20.0)
    finally:
        await watch.stop()
    assert watch.relists == rounds
    assert delays == [BACKOFF_FIRST] * rounds


OBJECTIVES_PATH = (
    f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{NAMESPACE}/inferenceobjectives"
)
CUT, GONE_NOW, DUPLICATE, DELAY, END = "cut", "gone", "duplicate", "delay", "end"


class ObjectiveApi:
    """A live API server for InferenceObjectives: the objects, the event log every watch
    replays from its resourceVersion, and faults the test injects into the watch."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.log: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        """A watch from before this version is answered 410 Gone."""
        self.faults: list[str] = []
        """Applied to the next event a watch sends, in order."""
        self.history: list[dict[str, int | None]] = [{}]
        self.requests: list[tuple[str, str | None]] = []
        self.changed = asyncio.Condition()

    def expected(self) -> dict[str, int | None]:
        """What the table must hold: this pool's objectives and their priorities."""
        table = {}
        for name, obj in self.objects.items():
            ref = obj["spec"]["poolRef"]
            if ref["name"] == POOL and ref.get("group", "inference.networking.k8s.io") == (
                "inference.networking.k8s.io"
            ):
                table[name] = obj["spec"].get("priority")
        return table

    async def put(self, name: str, priority: int | None, pool: str = POOL, **ref: str) -> None:
        kind = "MODIFIED" if name in self.objects else "ADDED"
        spec: dict[str, Any] = {"poolRef": {"name": pool, **ref}}
        if priority is not None:
            spec["priority"] = priority
        await self._record(kind, name, spec)

    async def delete(self, name: str) -> None:
        await self._record("DELETED", name, self.objects[name]["spec"])

    async def _record(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.version += 1
        obj = {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "resourceVersion": str(self.version)},
            "spec": spec,
        }  # fmt: skip
        if kind == "DELETED":
            del self.objects[name]
        else:
            self.objects[name] = obj
        self.log.append((self.version, kind, obj))
        self.history.append(self.expected())
        async with self.changed:
            self.changed.notify_all()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(OBJECTIVES_PATH, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            self.requests.append(("list", None))
            return web.json_response({
                "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
                "kind": "InferenceObjectiveList",
                "metadata": {"resourceVersion": str(self.version)},
                "items": list(self.objects.values()),
            })  # fmt: skip
        since = int(request.query["resourceVersion"])
        self.requests.append(("watch", str(since)))
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        if since < self.compacted:
            await response.write(json.dumps(GONE).encode() + b"\n")
            await response.write_eof()
            return response
        while True:
            pending = [entry for entry in self.log if entry[0] > since]
            if not pending:
                async with self.changed:
                    await self.changed.wait()
                continue
            version, kind, obj = pending[0]
            fault = self.faults.pop(0) if self.faults else None
            if fault == CUT:
                assert request.transport is not None
                request.transport.close()
                return response
            if fault in (GONE_NOW, END):
                if fault == GONE_NOW:
                    await response.write(json.dumps(GONE).encode() + b"\n")
                await response.write_eof()
                return response
            if fault == DELAY:
                await asyncio.sleep(0.3)
            line = json.dumps(event(kind, obj)).encode() + b"\n"
            await response.write(line * (2 if fault == DUPLICATE else 1))
            since = version


class RecordedTable(ObjectiveTable):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[dict[str, int | None]] = []

    def replace(self, priorities: Mapping[str, int | None]) -> None:
        super().replace(priorities)
        self.published.append(dict(priorities))


async def test_the_objective_table_equals_the_api_state_through_every_watch_fault(
    serve: Callable[[Any], Any],
) -> None:
    api = ObjectiveApi()
    await api.put("batch", -1)
    await api.put("chat", 10)
    await api.put("elsewhere", 5, pool="other-pool")
    await api.put("other-group", 5, group="example.com")
    await api.put("unset", None)
    url = await serve(api)
    table = RecordedTable()

    async def quick(seconds: float) -> None:
        await asyncio.sleep(0.01)

    watch = InferenceObjectiveWatch(
        table, f"{NAMESPACE}/{POOL}", lambda: AsyncClient(config=kubeconfig(url)), sleep=quick
    )

    async def agrees() -> None:
        await until(lambda: table.priorities == api.expected())

    steps: list[tuple[str | None, Callable[[], Awaitable[None]]]] = [
        (None, lambda: api.put("new", 3)),
        (DUPLICATE, lambda: api.put("chat", 20)),  # the same event twice: no change
        (DUPLICATE, lambda: api.delete("new")),  # a duplicated delete is harmless too
        (DELAY, lambda: api.put("batch", -5)),
        (CUT, lambda: api.put("late", 1)),  # connection cut: back off, list again
        (GONE_NOW, lambda: api.delete("unset")),  # watch lost (410): list again
        (END, lambda: api.put("unset", 0)),  # closed cleanly: resumes where it was
        (None, lambda: api.put("chat", 7, pool="other-pool")),  # moved away: gone from ours
        (None, lambda: api.put("elsewhere", 2)),  # moved here
    ]
    await watch.start()
    try:
        assert watch.synced.is_set()
        assert table.priorities == {"batch": -1, "chat": 10, "unset": None}
        for fault, change in steps:
            if fault is not None:
                api.faults.append(fault)
            await change()
            await agrees()  # the invariant, after every step
        # Lost while disconnected: changes made meanwhile, their events compacted away.
        api.faults.append(CUT)
        await api.put("gap", 4)
        api.compacted = api.version + 2
        await api.put("batch", 1)
        await api.delete("gap")
        await agrees()
    finally:
        await watch.stop()
    # Every table ever published was the pool's state at some version: nothing half-read.
    assert all(published in api.history for published in table.published)
    kinds = [kind for kind, _ in api.requests]
    assert kinds.count("list") == watch.relists >= 4  # start, cut, 410, cut + 410
    assert "chat" not in table.priorities
    assert table.priorities["elsewhere"] == 2


def test_objective_priority_reads_the_spec_defensively() -> None:
    def objective(spec: dict[str, Any]) -> Any:
        return InferenceObjective(metadata=ObjectMeta(name="o"), spec=spec)

    assert objective_priority(objective({"poolRef": {"name": POOL}, "priority": 4}), POOL) == (
        True,
        4,
    )
    assert objective_priority(objective({"poolRef": {"name": POOL}}), POOL) == (True, None)
    assert objective_priority(objective({"poolRef": {"name": POOL}, "priority": "9"}), POOL) == (
        True,
        None,
    )
    assert objective_priority(objective({"priority": 1}), POOL) == (False, 1)
    assert objective_priority(objective({}), POOL) == (False, None)
    # Being deleted (a finalizer holds it): gone already, as upstream's reconciler has it.
    deleting = InferenceObjective(
        metadata=ObjectMeta(name="o", deletionTimestamp=datetime.datetime.now(datetime.UTC)),
        spec={"poolRef": {"name": POOL}, "priority": 4},
    )
    assert objective_priority(deleting, POOL) == (False, 4)


async def test_pool_mode_is_ready_only_after_the_first_endpoint_sync(
    serve: Callable[[Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeApiServer(
        lists=[pod_list("100", pod("a", "127.0.0.1", True, "90"))], watches=[[HOLD]]
    )
    server.gate.clear()  # the Pod list is held until the test lets it through
    url = await serve(server)
    use_kubeconfig(url, tmp_path, monkeypatch)
    settings = Settings(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        inference_pool=f"{NAMESPACE}/{POOL}",
    )
    service = Service(settings)
    starting = asyncio.create_task(service.start())
    try:
        await until(lambda: service.health_port != 0 and service.admin_port != 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                request = health_pb2.HealthCheckRequest(service=name)
                return (await health.Check(request, timeout=10)).status  # type: ignore[no-any-return]

            assert await status("liveness") == SERVING
            assert await status("readiness") == NOT_SERVING
            async with aiohttp.ClientSession() as http:
                readyz = f"http://127.0.0.1:{service.admin_port}/readyz"
                async with http.get(readyz) as reply:
                    assert reply.status == 503
                server.gate.set()
                await starting
                assert await status("readiness") == SERVING
                assert await status("") == SERVING
                async with http.get(readyz) as reply:
                    assert reply.status == 200
        assert service.pool is not None
        assert service.pool.addresses == ["127.0.0.1:8000"]
        # Objectives are watched too; this API server has none, so a name is unknown.
        assert service.objectives is not None
        assert service.objectives.criticality("x") is None
    finally:
        server.gate.set()
        await starting
        await service.stop(drain_timeout=0, grace=0)


class PodsAndObjectives:
    """One API server for both watches of a pool-mode service."""

    def __init__(self, pods: FakeApiServer, objectives: ObjectiveApi) -> None:
        self.pods, self.objectives = pods, objectives

    def app(self) -> web.Application:
        app = self.pods.app()
        app.router.add_get(OBJECTIVES_PATH, self.objectives.handle)
        return app


async def test_a_negative_priority_objective_is_shed_while_saturated_through_the_service(
    serve: Callable[[Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objectives = ObjectiveApi()
    await objectives.put("batch", -1)
    await objectives.put("interactive", 10)
    pods = FakeApiServer(lists=[pod_list("1", pod("a", "127.0.0.1", True, "1"))], watches=[])
    model_server = PoolEndpoint("a")  # scraped, so the endpoint stays in
    await model_server.start()
    pods.target_port = model_server.port
    url = await serve(PodsAndObjectives(pods, objectives))
    use_kubeconfig(url, tmp_path, monkeypatch)
    settings = Settings(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        inference_pool=f"{NAMESPACE}/{POOL}",
        max_concurrency=1,
    )
    service = Service(settings)
    await service.start()
    try:
        assert service.flow.shed_below == 2  # negative priority is sheddable
        await until(lambda: service.objectives is not None and bool(service.objectives.priorities))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)

            async def send(headers: dict[str, str | bytes]) -> Any:
                stream = stub.Process()
                await stream.write(request_headers(headers))
                return stream, await stream.read()

            objective = "x-gateway-inference-objective"
            fairness = "x-gateway-inference-fairness-id"
            running, first = await send({fairness: "tenant-a"})
            assert first.WhichOneof("response") == "request_headers"  # the one slot
            _, shed = await send({fairness: "tenant-b", objective: "batch"})
            assert shed.immediate_response.status.code == 429
            assert immediate_headers(shed)["x-workload-dropped-reason"] == "shed"
            # An empty fairness id and an unknown objective: the default flow, queued.
            held, answer = await send({fairness: "", objective: "no-such"})
            assert answer.WhichOneof("response") != "immediate_response"
            assert service.flow.queued_for("default") == 1
            unknown = service.metrics.registry.get_sample_value("extproc_objective_unknown_total")
            assert unknown == 1
            running.cancel()
            held.cancel()
    finally:
        await service.stop(drain_timeout=0, grace=0)
        await model_server.stop()


async def test_a_pool_listed_after_the_start_gave_up_waiting_turns_readiness_on(
    serve: Callable[[Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server slower than the start's bounded wait: the service serves, not ready,
    and turns ready by itself when the list arrives (no restart, no other event)."""

    class QuickStart(InferencePoolWatch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, sync_timeout=0.05)

    monkeypatch.setattr("extproc.service.app.InferencePoolWatch", QuickStart)
    server = FakeApiServer(
        lists=[pod_list("100", pod("a", "127.0.0.1", True, "90"))], watches=[[HOLD]]
    )
    server.gate.clear()
    url = await serve(server)
    use_kubeconfig(url, tmp_path, monkeypatch)
    settings = Settings(
        listen="127.0.0.1:0", admin_listen="127.0.0.1:0", inference_pool=f"{NAMESPACE}/{POOL}"
    )
    service = Service(settings)
    with capture_logs() as logs:
        await service.start()
    try:
        # The log states the shed threshold in force: sheddable objectives make it 2.
        (serving,) = [event for event in logs if event["event"] == "serving"]
        assert serving["shed_below"] == service.flow.shed_below == 2
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                request = health_pb2.HealthCheckRequest(service=name)
                return (await health.Check(request, timeout=10)).status  # type: ignore[no-any-return]

            assert (await status("liveness"), await status("readiness")) == (SERVING, NOT_SERVING)
            server.gate.set()
            deadline = time.monotonic() + 20
            while await status("readiness") != SERVING:
                assert time.monotonic() < deadline, "readiness never turned SERVING"
                await asyncio.sleep(0.01)
            async with aiohttp.ClientSession() as http:
                readyz = f"http://127.0.0.1:{service.admin_port}/readyz"
                async with http.get(readyz) as reply:
                    assert reply.status == 200
    finally:
        server.gate.set()
        await service.stop(drain_timeout=0, grace=0)
