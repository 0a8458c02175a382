"""Reading model servers' metrics: the parser, the scraper over real HTTP against the
demo backend, the settings that turn it on, and how the service shows the gate."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from extproc.capacity.saturation import (
    MetricsCapacity,
    MetricsError,
    SaturationOptions,
    parse_reading,
)
from extproc.capacity.scraper import MAX_PAGE_BYTES, Scraper
from extproc.capacity.static import StaticCapacity
from extproc.cli import main
from extproc.clock import SystemClock
from extproc.config import Settings
from extproc.tools.demo_backend import Timing
from tests.conftest import StartService
from tests.support.demo_server import completion, demo_server
from tests.support.metrics_page import scrape
from tests.support.process import top_frame

VLLM_OLD = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="a"} 7.0
"""


def test_reads_old_and_new_vllm_names_summing_waiting_over_series() -> None:
    reading = parse_reading(VLLM_OLD, SaturationOptions())
    assert (reading.waiting, reading.kv_cache_usage) == (5.0, 0.25)
    new = VLLM_OLD.replace("gpu_cache_usage_perc", "kv_cache_usage_perc")
    assert parse_reading(new, SaturationOptions()).kv_cache_usage == 0.25


def test_names_are_configurable_and_kv_cache_is_optional() -> None:
    text = "sglang:num_queue_reqs 4\n"
    options = SaturationOptions(waiting_metrics=("sglang:num_queue_reqs",))
    assert parse_reading(text, options).waiting == 4
    assert parse_reading(text, options).kv_cache_usage is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("up 1\n", "no vllm:num_requests_waiting"),
        ("vllm:num_requests_waiting{ 1\n", "unparsable"),
        ("vllm:num_requests_waiting NaN\n", "out of range"),
        ("vllm:num_requests_waiting 1\nvllm:num_requests_running +Inf\n", "out of range"),
        ("vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc NaN\n", "out of range"),
        ("vllm:num_requests_waiting 1e308\nvllm:num_requests_running 1e308\n", "out of range"),
        ("vllm:num_requests_waiting -1\n", "out of range"),
    ],
)
def test_a_page_without_the_waiting_series_or_with_a_value_out_of_range_is_an_error(
    text: str, problem: str
) -> None:
    with pytest.raises(MetricsError, match=problem):
        parse_reading(text, SaturationOptions())


@pytest.fixture
async def demo_backend() -> AsyncIterator[str]:
    async with demo_server(1, max_tokens=4, timing=Timing(inter_token=0.1)) as url:
        yield url


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"  # closed on return


async def test_scraper_reads_the_demo_backends_real_load(demo_backend: str) -> None:
    gate = MetricsCapacity([f"{demo_backend}/metrics"], SystemClock(), StaticCapacity(0))
    scraper = Scraper(gate, interval=0.05)
    async with aiohttp.ClientSession() as http:
        requests = [asyncio.create_task(_get(http, demo_backend)) for _ in range(3)]
        await asyncio.sleep(0.2)  # one running, two waiting inside the server
        await scraper.start()
        try:
            [endpoint] = gate.status().endpoints
            assert endpoint.waiting == 2
            assert endpoint.errors == 0
            assert endpoint.kv_cache_usage is not None
            assert 0 < endpoint.kv_cache_usage < 1
            await asyncio.gather(*requests)
            await asyncio.sleep(0.2)
            assert gate.status().endpoints[0].waiting == 0
        finally:
            await scraper.stop()
        async with http.get(f"{demo_backend}/metrics") as reply:
            assert "demo_backend_max_waiting 2.0" in await reply.text()


async def _get(http: aiohttp.ClientSession, base: str) -> None:
    async with http.post(base + "/v1/completions", json=completion(4)) as reply:
        await reply.read()


async def test_an_unreachable_endpoint_counts_errors_and_hands_over_to_the_static_limit() -> None:
    options = SaturationOptions(stale_after=0.2)
    gate = MetricsCapacity([refused_url()], SystemClock(), StaticCapacity(2), options)
    scraper = Scraper(gate, interval=0.05)
    await scraper.start()
    try:
        await asyncio.sleep(0.3)
        status = gate.status()
        assert status.fallback is True
        assert status.endpoints[0].errors >= 3
        assert "connect" in status.endpoints[0].last_error.lower()
        assert (gate.has_room(1), gate.has_room(2)) == (True, False)
    finally:
        await scraper.stop()


def test_settings_for_the_metrics_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="needs at least one --backend-metrics-url"):
        Settings(capacity="metrics")
    with pytest.raises(ValidationError, match="http:// or https://"):
        Settings(capacity="metrics", backend_metrics_url=["127.0.0.1:8000/metrics"])
    with pytest.raises(ValidationError, match="needs --max-concurrency"):
        Settings(capacity="adaptive")
    with pytest.raises(ValidationError, match="metrics go stale"):  # #16.6: never unlimited
        Settings(capacity="metrics", backend_metrics_url=["http://a:1/metrics"])
    with pytest.raises(ValidationError, match="waiting_metrics"):
        Settings(waiting_metrics=" , ")
    monkeypatch.setenv("EXTPROC_BACKEND_METRICS_URL", "http://a:1/metrics, http://b:2/metrics")
    settings = Settings(capacity="metrics", max_concurrency=8)
    assert settings.backend_metrics_url == ["http://a:1/metrics", "http://b:2/metrics"]


def test_the_url_flag_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "show", "--capacity", "metrics", "--max-concurrency", "8"]
    argv += ["--backend-metrics-url", "http://a:1/m", "--backend-metrics-url", "http://b:2/m"]
    assert main(argv) == 0
    assert "- http://a:1/m\n- http://b:2/m" in capsys.readouterr().out


async def test_the_service_shows_its_gate_in_metrics_json_and_top(
    start_service: StartService, demo_backend: str
) -> None:
    url = f"{demo_backend}/metrics"
    service = await start_service(capacity="metrics", backend_metrics_url=[url], max_concurrency=8)
    samples = await scrape(service)
    assert samples["extproc_capacity_saturation", ()] == 0
    assert samples["extproc_capacity_fallback", ()] == 0
    assert samples["extproc_backend_waiting_requests", (("endpoint", url),)] == 0
    assert samples["extproc_backend_scrape_errors_total", (("endpoint", url),)] == 0
    assert samples["extproc_backend_running_requests", (("endpoint", url),)] == 0
    assert samples["extproc_backend_slots", (("endpoint", url),)] == 0  # nothing learnt yet
    assert samples["extproc_backend_scrape_age_seconds", (("endpoint", url),)] < 1
    assert samples["extproc_max_concurrency", ()] == 8
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/v1/capacity") as reply,
    ):
        body = await reply.json()
    assert (body["mode"], body["limit"], body["endpoints"][0]["url"]) == ("metrics", 8, url)
    frame = await top_frame(service.grpc_port)
    assert "capacity metrics   limit 8   saturation 0.00" in frame
    assert f"{url}   waiting 0   running 0 of ~0 slots   kv 0%" in frame


async def test_an_oversized_or_failing_page_is_an_error_not_a_reading() -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"# " + b"x" * MAX_PAGE_BYTES + b"\n")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/huge", huge)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    urls = [f"{base}/huge", f"{base}/broken"]
    gate = MetricsCapacity(urls, SystemClock(), StaticCapacity(3))
    scraper = Scraper(gate, interval=1.0)
    try:
        await scraper.start()
        huge_status, broken_status = gate.status().endpoints
        assert huge_status.last_error == f"metrics page larger than {MAX_PAGE_BYTES} bytes"
        assert broken_status.last_error == "HTTP 503"
        assert gate.status().fallback is True
    finally:
        await scraper.stop()
        await runner.cleanup()
