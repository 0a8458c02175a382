"""/metrics: outcome counters, waits, gauges, and bounded per-workload cardinality."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.tools.demo_backend import make_demo_app
from tests.conftest import StartService
from tests.support.extproc_client import (
    exchange,
    request_headers,
    response_trailers,
    workload_headers,
)
from tests.support.metrics_page import scrape
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


async def test_outcomes_waits_and_gauges(start_service: StartService) -> None:
    service = await start_service(max_concurrency=1, max_queue=1, queue_timeout=0.2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        await exchange(channel, workload_headers("a"))  # dispatched, completed
        running, _ = await exchange(channel, workload_headers("a"), complete=False)
        waiting = pb_grpc.ExternalProcessorStub(channel).Process()
        await waiting.write(workload_headers("b"))
        await waiting.read()  # held
        await exchange(channel, workload_headers("c"))  # queue full
        await exchange(channel, request_headers({"x-workload-context": "nope"}))  # invalid
        samples = await scrape(service)
        assert samples["extproc_queue_size", ()] == 1
        assert samples["extproc_in_flight_requests", ()] == 1
        assert samples["extproc_max_concurrency", ()] == 1
        assert samples["extproc_tracked_workloads", ()] == 3
        assert samples["extproc_workload_queued_requests", (("workload", "b"),)] == 1
        assert (await waiting.read()).immediate_response.status.code == 503  # queue timeout
        picked = pb_grpc.ExternalProcessorStub(channel).Process()
        await picked.write(workload_headers("d"))
        await picked.read()  # held, then picked from the queue when `running` ends
        running.cancel()
        assert (await picked.read()).WhichOneof("response") == "request_headers"
        await picked.write(response_trailers())
        await picked.read()
    samples = await scrape(service)
    outcome = lambda name: samples["extproc_requests_total", (("outcome", name),)]  # noqa: E731
    assert outcome("dispatched") == 3
    assert outcome("queue-full") == outcome("queue-timeout") == 1
    assert outcome("invalid-workload-context") == 1
    assert samples["extproc_rejections_total", (("reason", "queue-full"),)] == 1
    assert samples["extproc_rejections_total", (("reason", "queue-timeout"),)] == 1
    assert samples["extproc_queue_wait_seconds_count", (("outcome", "queue-timeout"),)] == 1
    assert samples["extproc_queue_wait_seconds_sum", (("outcome", "queue-timeout"),)] >= 0.2
    assert samples["extproc_dispatch_decision_seconds_count", ()] >= 1


async def test_per_workload_series_are_bounded(start_service: StartService) -> None:
    service = await start_service(metrics_top_workloads=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        for workload, requests in (("big", 6), ("medium", 4), ("small", 2), ("tiny", 1)):
            for _ in range(requests):
                await exchange(channel, workload_headers(workload))
    samples = await scrape(service)
    rates = {
        dict(labels)["workload"]: value
        for (name, labels), value in samples.items()
        if name == "extproc_workload_request_rate"
    }
    assert set(rates) == {"big", "medium", "other"}
    assert rates["other"] == rates["big"] / 6 * 3  # small and tiny, summed


async def test_metric_names_follow_prometheus_conventions(start_service: StartService) -> None:
    service = await start_service()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/metrics") as reply,
    ):
        text = await reply.text()
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("extproc_"), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the parser strips it ...
            assert f"{family.name}_total" in text  # ... from the exposed name
        if "seconds" in family.name and not family.name.endswith("_created"):
            assert family.name.endswith("_seconds")


async def test_every_metric_the_grafana_dashboard_queries_exists(
    start_service: StartService,
) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "workload-extproc.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bextproc_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 10
    service = await start_service(max_concurrency=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        running, _ = await exchange(channel, workload_headers("a"), complete=False)
        waiting = pb_grpc.ExternalProcessorStub(channel).Process()
        await waiting.write(workload_headers("b"))
        await waiting.read()
        await exchange(channel, request_headers({"x-workload-context": "bad"}))
        await running.write(response_trailers())
        await running.read()
        await waiting.read()
    exposed = {name for name, _ in await scrape(service)}
    # The gate and fleet panels: a service with the metrics gate and the shared registry.
    demo = web.AppRunner(make_demo_app())
    await demo.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(demo, sock).start()
    redis = RedisServer()
    await redis.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
        gated = await start_service(
            capacity="metrics", backend_metrics_url=[url], registry=redis.url, max_concurrency=8
        )
        exposed |= {name for name, _ in await scrape(gated)}
        picking = await start_service(endpoints=[f"127.0.0.1:{sock.getsockname()[1]}"])
        exposed |= {name for name, _ in await scrape(picking)}
        adaptive = await start_service(
            capacity="adaptive", max_concurrency=4, adaptive_window=0.001
        )
        for _ in range(10):  # first bytes of requests: the no-load probe, then a window
            adaptive.capacity.on_latency(0.01, time.monotonic())
            await asyncio.sleep(0.001)
        exposed |= {name for name, _ in await scrape(adaptive)}
    finally:
        await redis.close()
        await demo.cleanup()
    assert queried <= exposed, queried - exposed
