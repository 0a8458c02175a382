"""Fixtures of the real-vLLM checks: the tiny model and two servers (once per session),
an HTTP session, and the service + Envoy stacks the checks put in front of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartService
from tests.support.envoy import Envoy, bundled_config, pool_config
from tests.support.vllm import VllmServer, build_model, running
from tests.support.vllm_load import pool_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    """Two servers for the whole session (a start is 30 s on a quiet machine, minutes on
    a busy one): the first alone for the one-server checks, both for the pool's. The
    pool's test that kills one runs last and restarts it."""
    both = pool_servers(build_model(tmp_path_factory.mktemp("tiny-llama")))
    with running(*both):
        yield both


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout
    ) as session:
        yield session


Stack = Callable[..., Awaitable[tuple[Any, Envoy]]]


@pytest.fixture
async def stack(start_service: StartService) -> AsyncIterator[Stack]:
    """`stack(servers, pool=..., **settings)`: the real service with `settings` and a real
    Envoy in front of `servers` -- envoy/envoy-pool.yaml with the service picking among
    them (pool=True), else envoy/envoy.yaml with one server as the backend."""
    envoys: list[Envoy] = []

    async def make(servers: list[VllmServer], pool: bool, **settings: object) -> tuple[Any, Envoy]:
        settings.setdefault("log_level", "warning")  # a line per request drowns the numbers
        if pool:
            settings["endpoints"] = [server.address for server in servers]
            # A busy machine's vLLM can take over a second to answer /metrics.
            settings.setdefault("endpoint_stale", 5)
        service = await start_service(**settings)
        ports = [server.port for server in servers]
        config = (
            pool_config(service.grpc_port, ports)
            if pool
            else bundled_config(service.grpc_port, ports[0])
        )
        envoy = Envoy(config)
        envoys.append(envoy)
        await envoy.start()
        return service, envoy

    yield make
    for envoy in envoys:
        await envoy.stop()
