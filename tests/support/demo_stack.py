"""Envoy (bundled config) + the real service + the demo model server, all on loopback,
and a flood of clients through them that samples the model server's own load: what
the end-to-end capacity tests and `make bench`'s capacity comparison share."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from extproc.config import Settings
from extproc.service.app import Service
from extproc.tools.demo_backend import Timing
from tests.support.demo_server import completion, demo_server
from tests.support.envoy import Envoy, bundled_config

SAMPLE_EVERY = 0.05
TOKENS = 5


@dataclass
class DemoStack:
    service: Service
    backend_port: int
    envoy: Envoy
    http: aiohttp.ClientSession

    async def backend_metric(self, name: str) -> float:
        return (await backend_metrics(self.http, self.backend_port))[name]

    async def flood(self, clients: int, seconds: float) -> Flood:
        return await flood(self.http, self.envoy.port, self.backend_port, clients, seconds)


async def backend_metrics(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """The demo backend's own gauges, by name (labels dropped)."""
    values = {}
    async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
        for line in (await reply.text()).splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0]] = float(value)
    return values


async def flood(
    http: aiohttp.ClientSession, envoy_port: int, backend_port: int, clients: int, seconds: float
) -> Flood:
    """`clients` loops sending back to back through Envoy for `seconds`, the demo backend's
    running and waiting counts sampled meanwhile."""
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    url = f"http://127.0.0.1:{envoy_port}/v1/completions"

    async def client(index: int) -> None:
        headers = {"x-workload-context": f'{{"workload_id": "tenant-{index % 4}"}}'}
        while time.monotonic() < deadline:
            async with http.post(url, headers=headers, json=completion(TOKENS)) as reply:
                await reply.read()
                statuses[reply.status] += 1

    running: list[float] = []
    waiting: list[float] = []

    async def sample() -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            gauges = await backend_metrics(http, backend_port)
            running.append(gauges["vllm:num_requests_running"])
            waiting.append(gauges["vllm:num_requests_waiting"])

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    return Flood(statuses, running, waiting, elapsed)


@dataclass(frozen=True)
class Flood:
    statuses: Counter[int]
    running: list[float]
    """The model server's running count, sampled every SAMPLE_EVERY s during the flood."""
    waiting: list[float]
    elapsed: float
    """Seconds from the first request sent to the last answer read."""

    @property
    def served(self) -> int:
        return self.statuses[200]

    def busy(self) -> float:
        """Mean slots busy, over the samples taken once the server had its first load."""
        return statistics.mean(self.running[2:])

    def mean_waiting(self) -> float:
        return statistics.mean(self.waiting[2:])


def timing(duration: float) -> Timing:
    """The demo server's timing for a request of TOKENS tokens that takes `duration` s."""
    step = duration / TOKENS
    return Timing(first_token=step, inter_token=step)


@contextlib.asynccontextmanager
async def demo_stack(slots: int, duration: float, **settings: object) -> AsyncIterator[DemoStack]:
    """A demo model server of `slots`, answering in `duration` s, behind Envoy and the service
    with `settings` (the metrics gate, if chosen, scrapes the demo server)."""
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(
            demo_server(slots, timing=timing(duration), prefix_cache_blocks=0)
        )
        port = int(base.rsplit(":", 1)[1])
        if settings.get("capacity") == "metrics":
            settings["backend_metrics_url"] = [f"{base}/metrics"]
        service_settings = Settings(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", **settings)  # type: ignore[arg-type]
        service = Service(service_settings)
        await service.start()
        stack.push_async_callback(service.stop, drain_timeout=0, grace=0)
        envoy = Envoy(bundled_config(service.grpc_port, port))
        await envoy.start()
        stack.push_async_callback(envoy.stop)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        stack.push_async_callback(http.close)
        yield DemoStack(service, port, envoy, http)
