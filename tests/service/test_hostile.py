"""Hostile input: a million workload ids, arbitrary header bytes, arbitrary message orders.
Nothing crashes, nothing leaks a count, memory stays bounded."""

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import Settings
from extproc.context import FAIRNESS_ID_HEADER, WORKLOAD_CONTEXT_HEADER, ContextError, ContextParser
from extproc.log import configure_logging
from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.extproc_client import (
    request_headers,
    response_headers,
    response_trailers,
    workload_headers,
)
from tests.support.rpc_context import RpcContext

KNOWN = [f"known-{i}" for i in range(10)]


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """A million request lines would be captured and slow everything down."""
    configure_logging("json", "warning")
    yield
    structlog.reset_defaults()


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def one_request(service: Service, workload: str) -> None:
    """One HTTP request's whole ext_proc exchange, through the real stream handler."""
    messages = [workload_headers(workload), response_trailers()]

    async def stream() -> AsyncIterator[Any]:
        for message in messages:
            yield message

    async for _ in service.ext_proc.Process(stream(), RpcContext()):
        pass


async def test_a_million_workload_ids_keep_memory_bounded(start_service: StartService) -> None:
    """Bound stated: the registry holds at most --max-workloads (100,000) plus `overflow`;
    RSS grows by under 80 MB in all (measured: 34 MB) and by under 5 MB over the last
    700,000 ids, and the known workloads' counts stay exact."""
    service = await start_service()
    start = rss_mb()
    plateau = 0.0
    for i in range(1_000_000):
        await one_request(service, KNOWN[i // 1000 % 10] if i % 1000 == 0 else f"tenant-{i}")
        if i == 300_000:
            plateau = rss_mb()
    assert len(service.registry) == 100_001
    assert rss_mb() - start < 80
    assert rss_mb() - plateau < 5
    for known in KNOWN:
        metrics = service.registry.get_metrics(known)
        assert metrics is not None
        assert (metrics.total_requests, metrics.active_requests) == (100, 0)
        assert metrics.dispatched_count == 100
    overflow = service.registry.get_metrics("overflow")
    assert overflow is not None
    tracked_tenants = 100_000 - len(KNOWN)  # one request each, before the registry filled
    assert overflow.total_requests == 1_000_000 - 1_000 - tracked_tenants
    assert overflow.active_requests == 0
    assert service.flow.in_flight == service.flow.queued == 0


async def test_many_workload_ids_over_grpc_stay_within_the_registry_bound(
    start_service: StartService,
) -> None:
    service = await start_service(max_workloads=5_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def send(workload: str) -> None:
            call = stub.Process()
            await call.write(workload_headers(workload))
            await call.read()
            await call.write(response_trailers())
            await call.read()
            await call.done_writing()

        for batch in range(20):
            await asyncio.gather(*(send(f"id-{batch}-{i}") for i in range(1000)))
    assert len(service.registry) == 5_001
    metrics = service.registry.list_metrics()
    assert sum(m.total_requests for m in metrics) == 20_000
    assert all(m.active_requests == 0 for m in metrics)


# -- fuzzing --------------------------------------------------------------------------------

header_values = st.lists(st.binary(max_size=1200), min_size=1, max_size=3)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    context=st.none() | header_values,
    fairness=st.none() | header_values,
    structured=st.none()
    | st.dictionaries(st.sampled_from(["workload_id", "criticality", "x"]), json_like, max_size=3),
)
def test_any_header_bytes_give_a_context_or_a_named_error(
    context: list[bytes] | None, fairness: list[bytes] | None, structured: dict[str, Any] | None
) -> None:
    headers: dict[str, list[bytes]] = {}
    if structured is not None:
        headers[WORKLOAD_CONTEXT_HEADER] = [json.dumps(structured).encode()]
    elif context is not None:
        headers[WORKLOAD_CONTEXT_HEADER] = context
    if fairness is not None:
        headers[FAIRNESS_ID_HEADER] = fairness
    try:
        parsed = ContextParser("default").parse(headers)
    except ContextError as caught:
        error = caught
    else:
        assert 1 <= parsed.criticality <= 5
        assert 0 < len(parsed.workload_id.encode()) <= 128
        return
    assert error.detail
    assert error.header in (WORKLOAD_CONTEXT_HEADER, FAIRNESS_ID_HEADER)


PHASES = {
    "headers": lambda draw: workload_headers(draw(st.sampled_from(["a", "b", "c"]))),
    "bad-headers": lambda draw: request_headers({"x-workload-context": "{oops"}),
    "request-body": lambda draw: pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x")),
    "request-trailers": lambda draw: pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
    "response-headers": lambda draw: response_headers(end_of_stream=draw(st.booleans())),
    "response-body": lambda draw: pb.ProcessingRequest(
        response_body=pb.HttpBody(end_of_stream=draw(st.booleans()))
    ),
    "response-trailers": lambda draw: response_trailers(),
    "nothing": lambda draw: pb.ProcessingRequest(),
}


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Any], int | None]:
    kinds = draw(st.lists(st.sampled_from(sorted(PHASES)), max_size=6))
    messages = [PHASES[kind](draw) for kind in kinds]
    cancel_after = draw(st.none() | st.integers(min_value=0, max_value=len(messages)))
    return messages, cancel_after


async def drive(service: Service, messages: list[Any], cancel_after: int | None) -> None:
    """Feed one stream's messages to the real handler, cancelling it after `cancel_after`."""
    consumed = 0
    gate = asyncio.Event()

    async def source() -> AsyncIterator[Any]:
        nonlocal consumed
        for message in messages:
            consumed += 1
            yield message
            if consumed == cancel_after:
                gate.set()
        gate.set()

    async def run() -> None:
        async for _ in service.ext_proc.Process(source(), RpcContext()):
            await asyncio.sleep(0)

    task = asyncio.create_task(run())
    if cancel_after is not None:
        await gate.wait()
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(streams(), min_size=1, max_size=8))
def test_any_message_sequence_leaves_every_count_balanced(
    sequences: list[tuple[list[Any], int | None]],
) -> None:
    async def scenario() -> None:
        service = Service(
            Settings(max_concurrency=2, max_queue=3, queue_timeout=0.05, policy="fair-share")
        )
        await asyncio.gather(*(drive(service, m, c) for m, c in sequences))
        assert (service.flow.in_flight, service.flow.queued) == (0, 0)
        assert all(m.active_requests == 0 for m in service.registry.list_metrics())
        # Still healthy: a fresh request is dispatched at once.
        await drive(service, [workload_headers("after"), response_trailers()], None)
        assert service.registry.get_metrics("after").dispatched_count == 1  # type: ignore[union-attr]

    asyncio.run(scenario())
