"""--workloads, --workload-header and --shed-below through the real gRPC service: the
answers, the counts (every request counted out once) and what the read APIs show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from rich.console import Console

from extproc.service.app import Service
from extproc.tools.top import render
from tests.conftest import StartService
from tests.support.extproc_client import (
    eventually,
    exchange,
    immediate_headers,
    request_headers,
    response_trailers,
    workload_headers,
)
from tests.support.metrics_page import scrape


def table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workloads.yaml"
    path.write_text(text)
    return path


def active(service: Service, workload: str) -> int:
    status = service.reader.get(workload)
    return status.metrics.active_requests if status else 0


async def test_unlisted_ids_refused_403_and_never_tracked(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "default: {allow: false}\nteam-a: {}\n")
    service = await start_service(workloads=path)
    channel = channel_to(service)
    _, refused = await exchange(channel, workload_headers("stranger"))
    assert refused.immediate_response.status.code == 403
    assert immediate_headers(refused)["x-workload-dropped-reason"] == "not-allowed"
    assert json.loads(refused.immediate_response.body)["workload_id"] == "stranger"
    _, served = await exchange(channel, workload_headers("team-a"))
    assert served.WhichOneof("response") == "request_headers"
    assert service.reader.get("stranger") is None
    samples = await scrape(service)
    assert samples["extproc_rejections_total", (("reason", "not-allowed"),)] == 1


async def test_max_queued_answers_workload_limit_and_max_in_flight_holds_back(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "capped: {max_in_flight: 1, max_queued: 1}\n")
    service = await start_service(workloads=path, max_concurrency=4)
    stub = pb_grpc.ExternalProcessorStub(channel_to(service))
    running, held, over = stub.Process(), stub.Process(), stub.Process()
    await running.write(workload_headers("capped"))
    assert (await running.read()).WhichOneof("response") == "request_headers"
    await held.write(workload_headers("capped"))
    assert (await held.read()).HasField("override_message_timeout")  # capped: it waits
    await over.write(workload_headers("capped"))
    refused = await over.read()
    assert refused.immediate_response.status.code == 429
    assert immediate_headers(refused)["x-workload-dropped-reason"] == "workload-limit"
    _, other = await exchange(channel_to(service), workload_headers("free"))
    assert other.WhichOneof("response") == "request_headers"  # the gate had room
    await running.write(response_trailers())
    await running.read()
    assert (await held.read()).WhichOneof("response") == "request_headers"
    await held.write(response_trailers())
    await held.read()
    await eventually(lambda: active(service, "capped") == 0)
    assert (service.flow.in_flight, service.flow.queued) == (0, 0)


async def test_claims_above_max_criticality_are_clamped_and_counted(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "default: {max_criticality: 2}\n")
    service = await start_service(workloads=path, max_concurrency=1)
    channel = channel_to(service)
    stub = pb_grpc.ExternalProcessorStub(channel)
    running = stub.Process()
    await running.write(workload_headers("a", 5))
    await running.read()
    held = stub.Process()
    await held.write(workload_headers("b", 5))
    await held.read()
    assert service.flow._flows.keys() == {("b", 2)}  # queued at the clamped criticality
    samples = await scrape(service)
    assert samples["extproc_criticality_clamped_total", ()] == 2
    held.cancel()
    running.cancel()


async def test_read_apis_show_the_limits_in_force(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "default: {max_queued: 7}\nteam-a: {weight: 4, max_in_flight: 2}\n")
    service = await start_service(workloads=path)
    for workload in ("team-a", "someone"):
        await exchange(channel_to(service), workload_headers(workload))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/v1/workloads") as reply,
    ):
        body = await reply.json()
    limits = {w["workload_id"]: w["limits"] for w in body["workloads"]}
    assert limits["team-a"]["weight"] == 4
    assert limits["team-a"]["max_in_flight"] == 2
    assert limits["someone"]["max_queued"] == 7  # the default entry, in force for it
    assert body["table"] == {
        "default": {"max_queued": 7},
        "team-a": {"weight": 4.0, "max_in_flight": 2},
    }
    snapshot = service.reader.snapshot()
    frame = _text(render(snapshot, [0], "rate", 10))
    assert "weight 4  in flight ≤2" in frame
    assert "queued ≤7" in frame


async def test_a_bad_edit_keeps_the_last_good_table_and_is_counted(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "default: {allow: false}\nteam-a: {}\n")
    service = await start_service(workloads=path, workloads_reload_interval=0.05)
    path.write_text("default: {allow: maybe}\n")
    await eventually(lambda: service.workloads.errors == 1)
    _, refused = await exchange(channel_to(service), workload_headers("stranger"))
    assert refused.immediate_response.status.code == 403  # the last good table rules
    samples = await scrape(service)
    assert samples["extproc_workloads_config_errors_total", ()] == 1
    path.write_text("default: {allow: true}\n")
    await eventually(lambda: service.workloads.reloads == 1)
    _, served = await exchange(channel_to(service), workload_headers("stranger"))
    assert served.WhichOneof("response") == "request_headers"


async def test_a_raised_cap_releases_held_requests_at_once(
    start_service: StartService, channel_to: Any, tmp_path: Path
) -> None:
    path = table(tmp_path, "a: {max_in_flight: 1}\n")
    service = await start_service(workloads=path, workloads_reload_interval=0.05, max_concurrency=4)
    stub = pb_grpc.ExternalProcessorStub(channel_to(service))
    first, second = stub.Process(), stub.Process()
    await first.write(workload_headers("a"))
    await first.read()
    await second.write(workload_headers("a"))
    await second.read()  # hold
    path.write_text("a: {max_in_flight: 2}\n")
    assert (await second.read()).WhichOneof("response") == "request_headers"
    first.cancel()
    second.cancel()


async def test_workload_header_counts_the_gateways_identity(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(workload_header="x-tenant-id")
    forged = request_headers(
        {
            "x-tenant-id": "tenant-a",
            "x-workload-context": '{"workload_id": "tenant-b", "criticality": 4}',
        }
    )
    _, answer = await exchange(channel_to(service), forged)
    assert answer.WhichOneof("response") == "request_headers"
    assert service.reader.get("tenant-a") is not None
    assert service.reader.get("tenant-b") is None


async def test_reserved_ids_are_refused_400(start_service: StartService, channel_to: Any) -> None:
    service = await start_service()
    for reserved in ("overflow", "other", "default"):
        _, answer = await exchange(channel_to(service), workload_headers(reserved))
        assert answer.immediate_response.status.code == 400
        assert b"reserved" in answer.immediate_response.body
    assert service.reader.list() == []


async def test_shed_below_answers_429_shed_while_saturated(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1, shed_below=3)
    channel = channel_to(service)
    running, _ = await exchange(channel, workload_headers("a", 1), complete=False)
    _, shed = await exchange(channel, workload_headers("b", 2))
    assert shed.immediate_response.status.code == 429
    assert immediate_headers(shed)["x-workload-dropped-reason"] == "shed"
    await eventually(lambda: active(service, "b") == 0)
    samples = await scrape(service)
    assert samples["extproc_requests_total", (("outcome", "shed"),)] == 1
    running.cancel()


def _text(group: Any) -> str:
    console = Console(width=240, record=True)
    console.print(group)
    return console.export_text()


async def test_a_pushed_out_request_is_answered_429_and_counted_out_once(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1, max_queue=2, policy="fair-share")
    stub = pb_grpc.ExternalProcessorStub(channel_to(service))
    running = stub.Process()
    await running.write(workload_headers("flood"))
    await running.read()
    older, newest = stub.Process(), stub.Process()
    for stream in (older, newest):
        await stream.write(workload_headers("flood"))
        await stream.read()  # hold
    light = stub.Process()
    await light.write(workload_headers("light"))
    await light.read()  # hold: it took the newest flood request's place
    pushed = await newest.read()
    assert pushed.immediate_response.status.code == 429
    assert immediate_headers(pushed)["x-workload-dropped-reason"] == "queue-full"
    assert (service.flow.queued_for("flood"), service.flow.queued_for("light")) == (1, 1)
    await running.write(response_trailers())
    await running.read()
    assert (await light.read()).WhichOneof("response") == "request_headers"  # fair-share
    for stream in (light, older):
        stream.cancel()
    await eventually(lambda: active(service, "flood") == active(service, "light") == 0)
    samples = await scrape(service)
    assert samples["extproc_rejections_total", (("reason", "queue-full"),)] == 1
    assert samples["extproc_requests_total", (("outcome", "queue-full"),)] == 1
