"""The ext_proc stream, the read API, health and reflection, spoken to by a real gRPC client."""

import asyncio
import json
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extproc.api.v1 import registry_pb2, registry_pb2_grpc
from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.extproc_client import (
    eventually,
    immediate_headers,
    request_headers,
    response_headers,
    response_trailers,
    running_and_held,
    set_headers,
    workload_headers,
)


def counts(service: Service, workload: str) -> tuple[int, int, int, int]:
    """(total, active, queued, dispatched) as the read API reports them."""
    status = service.reader.get(workload)
    assert status is not None
    m = status.metrics
    return m.total_requests, m.active_requests, status.queued_requests, m.dispatched_count


async def test_dispatch_adds_upstream_headers_and_trailers_complete(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(workload_headers("team-a", 4))
    answer = await stream.read()
    assert answer.WhichOneof("response") == "request_headers"
    added = set_headers(answer)
    assert added["x-workload-id"] == "team-a"
    assert float(added["x-workload-queue-wait-ms"]) == 0.0
    assert counts(service, "team-a") == (1, 1, 0, 1)
    await stream.write(response_trailers())
    assert (await stream.read()).WhichOneof("response") == "response_trailers"
    assert counts(service, "team-a") == (1, 0, 0, 1)
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert service.flow.in_flight == 0


@pytest.mark.parametrize(
    "ending",
    ["response-headers-end-of-stream", "stream-closed", "stream-cancelled"],
)
async def test_every_way_a_stream_ends_completes_the_request_once(
    start_service: StartService, channel_to: Any, ending: str
) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(workload_headers("a"))
    await stream.read()
    if ending == "response-headers-end-of-stream":
        await stream.write(response_headers(end_of_stream=True))
        assert (await stream.read()).WhichOneof("response") == "response_headers"
    elif ending == "stream-closed":
        await stream.done_writing()
    else:
        stream.cancel()
    await eventually(lambda: counts(service, "a")[1] == 0)
    assert counts(service, "a") == (1, 0, 0, 1)
    assert service.flow.in_flight == 0


async def test_response_headers_without_end_of_stream_keep_the_request_active(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(workload_headers("a"))
    await stream.read()
    await stream.write(response_headers(end_of_stream=False))
    await stream.read()
    assert counts(service, "a")[1] == 1
    await stream.write(response_trailers())
    await stream.read()
    assert counts(service, "a")[1] == 0


async def test_bad_header_gets_400_naming_the_problem_and_is_not_tracked(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(
        request_headers({"x-workload-context": '{"workload_id": "a", "criticality": 9}'})
    )
    answer = await stream.read()
    immediate = answer.immediate_response
    assert immediate.status.code == 400
    assert immediate_headers(answer)["x-workload-dropped-reason"] == "invalid-workload-context"
    body = json.loads(immediate.body)
    assert body["header"] == "x-workload-context"
    assert "criticality" in body["detail"]
    assert service.registry.list_metrics() == []


async def test_missing_context_rejected_when_configured(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(on_missing_context="reject")
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(request_headers({}))
    assert (await stream.read()).immediate_response.status.code == 400


async def test_held_request_extends_envoys_timeout_then_is_released(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1, queue_timeout=20)
    first, second, hold = await running_and_held(channel_to(service))
    assert hold.WhichOneof("response") is None  # the override travels alone
    assert hold.override_message_timeout == duration_pb2.Duration(seconds=21)
    await eventually(lambda: counts(service, "b") == (1, 1, 1, 0))
    await first.write(response_trailers())
    await first.read()
    released = await second.read()
    assert set_headers(released)["x-workload-id"] == "b"
    assert float(set_headers(released)["x-workload-queue-wait-ms"]) > 0
    assert counts(service, "b") == (1, 1, 0, 1)


async def test_client_gone_while_queued_is_counted_out(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1)
    first, second, _ = await running_and_held(channel_to(service))
    second.cancel()
    await eventually(lambda: counts(service, "b") == (1, 0, 0, 0))
    assert service.flow.queued == 0
    await first.write(response_trailers())
    await first.read()
    assert service.flow.in_flight == 0


async def test_full_queue_and_queue_timeout_answer_with_reasons(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1, max_queue=1, queue_timeout=0.3)
    stub = pb_grpc.ExternalProcessorStub(channel_to(service))
    running, queued, refused = stub.Process(), stub.Process(), stub.Process()
    await running.write(workload_headers("a"))
    await running.read()
    await queued.write(workload_headers("a"))
    await queued.read()  # hold
    await refused.write(workload_headers("a"))
    full = await refused.read()
    assert full.immediate_response.status.code == 429
    assert immediate_headers(full)["x-workload-dropped-reason"] == "queue-full"
    assert immediate_headers(full)["retry-after"] == "1"
    timed_out = await queued.read()
    assert timed_out.immediate_response.status.code == 503
    assert immediate_headers(timed_out)["x-workload-dropped-reason"] == "queue-timeout"
    assert b"queue-timeout" in timed_out.immediate_response.body
    await eventually(lambda: counts(service, "a") == (3, 1, 0, 1))


async def test_shutdown_answers_queued_requests_503(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(max_concurrency=1)
    running, queued, _ = await running_and_held(channel_to(service))
    stopping = asyncio.create_task(service.stop(drain_timeout=0, grace=2.0))
    answer = await queued.read()
    assert answer.immediate_response.status.code == 503
    assert immediate_headers(answer)["x-workload-dropped-reason"] == "shutdown"
    running.cancel()
    await stopping
    assert counts(service, "a")[1] == counts(service, "b")[1] == 0


async def test_protocol_oddities_are_answered_and_counted_once(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert (await stream.read()).WhichOneof("response") == "response_trailers"  # before headers
    await stream.write(workload_headers("a"))
    await stream.read()
    await stream.write(workload_headers("a"))
    assert (await stream.read()).WhichOneof("response") == "request_headers"
    await stream.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x")))
    assert (await stream.read()).WhichOneof("response") == "request_body"
    await stream.write(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)))
    assert (await stream.read()).WhichOneof("response") == "response_body"
    assert counts(service, "a") == (1, 0, 0, 1)
    await stream.write(pb.ProcessingRequest())  # no phase at all: nothing to answer
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF


async def test_read_api_over_grpc(start_service: StartService, channel_to: Any) -> None:
    service = await start_service(max_concurrency=1)
    channel = channel_to(service)
    running, _, _ = await running_and_held(channel)
    registry = registry_pb2_grpc.WorkloadRegistryStub(channel)

    b = await registry.GetMetrics(registry_pb2.GetMetricsRequest(workload_id="b"))
    assert (b.total_requests, b.active_requests, b.queued_requests, b.dispatched_count) == (
        1,
        1,
        1,
        0,
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await registry.GetMetrics(registry_pb2.GetMetricsRequest(workload_id="nobody"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    listed = await registry.ListWorkloads(registry_pb2.ListWorkloadsRequest())
    assert [w.workload_id for w in listed.workloads] == ["a", "b"]

    watch = registry.WatchWorkloads(
        registry_pb2.WatchWorkloadsRequest(interval=duration_pb2.Duration(nanos=50_000_000))
    )
    first = await watch.read()
    assert (first.in_flight, first.queued, first.max_concurrency) == (1, 1, 1)
    await running.write(response_trailers())
    await running.read()
    await eventually(lambda: service.flow.queued == 0)
    second = await watch.read()
    assert second.time.ToNanoseconds() > first.time.ToNanoseconds()
    assert (second.in_flight, second.queued) == (1, 0)
    watch.cancel()


async def test_health_and_reflection(start_service: StartService, channel_to: Any) -> None:
    service = await start_service()
    channel = channel_to(service)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "workload_extproc.v1.WorkloadRegistry",
    } <= names
    await call.done_writing()


async def test_admin_http_api(start_service: StartService, channel_to: Any) -> None:
    service = await start_service()
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(workload_headers("team/a"))
    await stream.read()
    base = f"http://127.0.0.1:{service.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as reply:
            assert reply.status == 200
        async with http.get(f"{base}/readyz") as reply:
            assert reply.status == 200
        async with http.get(f"{base}/v1/workloads") as reply:
            (workload,) = (await reply.json())["workloads"]
        assert workload == {
            "workload_id": "team/a",
            "total_requests": 1,
            "active_requests": 1,
            "queued_requests": 0,
            "dispatched_count": 1,
            "average_wait_time_seconds": 0.0,
            "request_rate": pytest.approx(1.0),
            "recent_p99_wait_seconds": 0.0,
        }
        async with http.get(f"{base}/v1/workloads/team%2Fa") as reply:
            assert (await reply.json())["workload_id"] == "team/a"
        async with http.get(f"{base}/v1/workloads/nobody") as reply:
            assert reply.status == 404
            assert "nobody" in (await reply.json())["detail"]
        service.ready = False
        async with http.get(f"{base}/readyz") as reply:
            assert reply.status == 503


@pytest.mark.parametrize("on_full", ["overflow", "reject"])
async def test_full_registry_overflows_or_rejects_new_workloads(
    start_service: StartService, channel_to: Any, on_full: str
) -> None:
    service = await start_service(max_workloads=2, on_registry_full=on_full)
    stub = pb_grpc.ExternalProcessorStub(channel_to(service))
    for workload in ("a", "b", "newcomer", "a"):
        stream = stub.Process()
        await stream.write(workload_headers(workload))
        answer = await stream.read()
        if workload == "newcomer" and on_full == "reject":
            assert answer.immediate_response.status.code == 429
            assert immediate_headers(answer)["x-workload-dropped-reason"] == "registry-full"
        else:
            assert answer.WhichOneof("response") == "request_headers"
        await stream.write(response_trailers())
        await stream.read()
    ids = [m.workload_id for m in service.registry.list_metrics()]
    assert ids == (["a", "b", "overflow"] if on_full == "overflow" else ["a", "b"])
    assert counts(service, "a") == (2, 0, 0, 2)


async def test_sweep_forgets_idle_workloads_in_registry_and_policy(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service(policy="fair-share", workload_idle_ttl=0.01)
    stream = pb_grpc.ExternalProcessorStub(channel_to(service)).Process()
    await stream.write(workload_headers("passing"))
    await stream.read()
    await stream.write(response_trailers())
    await stream.read()
    await eventually(
        lambda: service.sweep() == 1 or service.registry.get_metrics("passing") is None
    )
    assert service.registry.get_metrics("passing") is None
