"""The pool-mode end-to-end stack, shared by the tests behind each Envoy config: three
model servers of the tests' own, the real service picking among them, a real Envoy,
all on ephemeral loopback ports."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.envoy import Envoy, pool_config
from tests.support.extproc_client import eventually
from tests.support.pool_endpoint import PoolEndpoint


@dataclass
class PoolStack:
    service: Service
    endpoints: list[PoolEndpoint]
    envoy: Envoy
    http: aiohttp.ClientSession

    def post(
        self, workload: str, body: dict[str, Any] | bytes | AsyncIterator[bytes], **kw: Any
    ) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        context = json.dumps({"workload_id": workload, "criticality": 3})
        url = f"http://127.0.0.1:{self.envoy.port}/v1/completions"
        return self.http.post(url, data=data, headers={"x-workload-context": context}, **kw)

    async def complete(self, workload: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
        async with self.post(workload, body) as reply:
            text = await reply.read()
            if reply.content_type == "application/json" and reply.status == 200:
                return reply.status, json.loads(text)
            return reply.status, text

    def by_address(self, address: str) -> PoolEndpoint:
        return next(e for e in self.endpoints if e.address == address)

    def in_flight(self) -> int:
        assert self.service.pool is not None
        return sum(e.in_flight for e in self.service.pool.status().endpoints)

    def active(self, workload: str) -> int:
        status = self.service.reader.get(workload)
        return status.metrics.active_requests if status else 0

    async def saturation_seen(self, endpoint: PoolEndpoint, saturated: bool) -> None:
        """Wait until the service's scrape of `endpoint` says what the test set."""

        def seen() -> bool:
            assert self.service.pool is not None
            (snap,) = [
                e for e in self.service.pool.status().endpoints if e.address == endpoint.address
            ]
            return snap.saturation is not None and (snap.saturation >= 1) == saturated

        await eventually(seen, within=10)


MakePoolStack = Callable[..., Awaitable[PoolStack]]
EnvoyConfig = Callable[[int, list[int]], dict[str, Any]]


@pytest.fixture
async def make_pool_stack(start_service: StartService) -> AsyncIterator[MakePoolStack]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(
        envoy_filter: dict[str, Any] | None = None,
        *,
        envoy_config: EnvoyConfig | None = None,
        **settings: object,
    ) -> PoolStack:
        """envoy-pool.yaml (with `envoy_filter` on its ext_proc filter) unless an
        `envoy_config` builds another from the service's port and the endpoints' ports."""
        endpoints = [PoolEndpoint(f"e{i}") for i in range(3)]
        for endpoint in endpoints:
            await endpoint.start()
            cleanups.append(endpoint.stop)
        service = await start_service(endpoints=[e.address for e in endpoints], **settings)
        ports = [e.port for e in endpoints]
        if envoy_config is None:
            config = pool_config(service.grpc_port, ports, **(envoy_filter or {}))
        else:
            config = envoy_config(service.grpc_port, ports)
        envoy = Envoy(config)
        cleanups.append(envoy.stop)
        await envoy.start()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        cleanups.append(http.close)
        return PoolStack(service, endpoints, envoy, http)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()
