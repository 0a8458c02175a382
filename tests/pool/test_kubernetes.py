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
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from lightkube import AsyncClient, KubeConfig

from extproc.clock import VirtualClock
from extproc.pool.discovery import DnsDiscovery
from extproc.pool.kubernetes import BACKOFF_FIRST, InferencePoolWatch
from tests.pool.support import make_pool

NAMESPACE, POOL = "models", "chat-pool"


def kubeconfig(url: str) -> KubeConfig:
    """What KUBECONFIG would hold: the server and a bearer token."""
    return KubeConfig.from_dict({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    })  # fmt: skip


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


class FakeApiServer:
    """Answers from recorded scripts, in order; records every request's query."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.step = asyncio.Event()

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
                     "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "workload-extproc", "port": {"number": 9002}}},
        })  # fmt: skip

    async def pods(self, request: web.Request) -> web.StreamResponse:
        assert request.headers["authorization"] == "Bearer test-token"
        query = dict(request.query)
        if query.get("watch") != "true":
            self.requests.append(("list", query))
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
