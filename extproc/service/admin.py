"""The HTTP admin listener: liveness, readiness, Prometheus metrics, and the workload
read API, the capacity gate's and the endpoint pool's state as JSON.

Liveness and readiness are open to probes; `/metrics` and `/v1/...` (which name
workloads) need the bearer token when one is configured (see `auth`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from extproc.service.auth import BearerToken
from extproc.service.readapi import WorkloadReader

_READER = web.AppKey("reader", WorkloadReader)
_IS_READY: web.AppKey[Callable[[], bool]] = web.AppKey("is_ready")
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_admin_app(
    reader: WorkloadReader,
    is_ready: Callable[[], bool],
    token: BearerToken,
    metrics: CollectorRegistry,
) -> web.Application:
    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or token.allows(request.headers.get("authorization")):
            return await handler(request)
        return web.json_response(
            {"error": "unauthorized", "detail": "bearer token required"},
            status=401,
            headers={"www-authenticate": "Bearer"},
        )

    app = web.Application(middlewares=[authorize])
    app[_READER] = reader
    app[_IS_READY] = is_ready
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/v1/workloads", _list_workloads)
    app.router.add_get("/v1/workloads/{workload_id}", _get_workload)
    app.router.add_get("/v1/capacity", _capacity)
    app.router.add_get("/v1/fleet", _fleet)
    app.router.add_get("/v1/endpoints", _endpoints)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics))
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[_IS_READY]():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def _list_workloads(request: web.Request) -> web.Response:
    reader = request.app[_READER]
    body: dict[str, object] = {"workloads": [status.as_json() for status in reader.list()]}
    if reader.workloads is not None and reader.workloads.path is not None:
        body["table"] = reader.workloads.table.as_json()  # every entry, tracked or not
    return web.json_response(body)


async def _capacity(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[_READER].flow.capacity.status()))


async def _fleet(request: web.Request) -> web.Response:
    fleet = request.app[_READER].fleet
    if fleet is None:
        return web.json_response(
            {"error": "not_found", "detail": "the registry is not shared (--registry memory)"},
            status=404,
        )
    return web.json_response(dataclasses.asdict(fleet()))


async def _endpoints(request: web.Request) -> web.Response:
    pool = request.app[_READER].pool
    if pool is None:
        return web.json_response(
            {"error": "not_found", "detail": "endpoint picking is off (no --endpoints)"},
            status=404,
        )
    return web.json_response(dataclasses.asdict(pool()))


async def _get_workload(request: web.Request) -> web.Response:
    workload_id = request.match_info["workload_id"]
    status = request.app[_READER].get(workload_id)
    if status is None:
        return web.json_response(
            {"error": "not_found", "detail": f"workload {workload_id!r} is not tracked"},
            status=404,
        )
    return web.json_response(status.as_json())
