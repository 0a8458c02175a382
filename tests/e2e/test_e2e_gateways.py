"""End to end behind each gateway style that routes InferencePools: a real Envoy on the
config the gateway generates (tests/support/gateway_envoy.py: Envoy AI Gateway /
kgateway, ORIGINAL_DST + TLS to the picker, bodies full-duplex or buffered) and on our
own override-host file (envoy/envoy-pool.yaml), the real service, three model servers.
The same generated config with STREAMED and NONE bodies too (modes Envoy can be
configured with, though no gateway generates them). Each: 30 distinct prompts all
answered 200 by the endpoint named, a 512 KiB body intact, SSE streamed where the
response body streams, prefix affinity where the body arrives before the answer is
due (none elsewhere), every count back to zero."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakePoolStack, PoolStack
from tests.support.certs import Authority
from tests.support.extproc_client import eventually
from tests.support.gateway_envoy import gateway_config

pytestmark = pytest.mark.e2e

STYLES = {
    # style: (body mode of the generated config, None for envoy-pool.yaml; whether the
    # response body streams; whether the body arrives before the answer is due)
    "ai-gateway-duplex": ("FULL_DUPLEX_STREAMED", True, True),
    "ai-gateway-buffered": ("BUFFERED", False, True),
    "ai-gateway-buffered-partial": ("BUFFERED_PARTIAL", False, True),
    "override-host": (None, True, True),
    # Not what the gateways generate, but a mode Envoy can be configured with: the
    # pick still works, without the prompt.
    "streamed": ("STREAMED", True, False),
    "no-bodies": ("NONE", True, False),
}
MakeStack = Callable[..., Awaitable[PoolStack]]
SHARED = "You are a careful assistant who answers in one short paragraph. " * 11  # ~700 B


@pytest.fixture
def make_stack(make_pool_stack: MakePoolStack, tmp_path: Path) -> MakeStack:
    async def make(style: str, **settings: object) -> PoolStack:
        body_mode, _, _ = STYLES[style]
        if body_mode is None:
            return await make_pool_stack(**settings)
        # The gateways dial the picker with TLS and verify nothing.
        pem = Authority(tmp_path, "ca").issue("picker", server=True)
        return await make_pool_stack(
            envoy_config=lambda port, _: gateway_config(port, body_mode),
            tls_cert=pem.cert,
            tls_key=pem.key,
            **settings,
        )

    return make


async def settled(stack: PoolStack, workload: str = "a") -> None:
    await eventually(lambda: stack.in_flight() == 0 and stack.active(workload) == 0, within=10)
    assert stack.service.flow.queued == 0


@pytest.mark.parametrize("style", STYLES)
async def test_a_gateway_style_routes_every_request_to_the_endpoint_named(
    make_stack: MakeStack, style: str
) -> None:
    stack = await make_stack(style)
    _, streams_response, reads_prompt = STYLES[style]

    # 30 distinct prompts: all 200, each served by the one endpoint the picker named.
    answers = await asyncio.gather(
        *(stack.complete("a", {"model": "m", "prompt": f"distinct {i}"}) for i in range(30))
    )
    assert [status for status, _ in answers] == [200] * 30, answers
    for _, answer in answers:
        assert "," not in answer["destination"]
        assert stack.by_address(answer["destination"]).name == answer["endpoint"]
    assert sum(len(e.served) for e in stack.endpoints) == 30
    await settled(stack)

    # A 512 KiB body, byte for byte.
    big = json.dumps({"model": "m", "prompt": "x" * (512 << 10)}).encode()
    status, answer = await stack.complete("a", big)
    assert status == 200, answer
    assert (answer["bytes"], answer["sha256"]) == (len(big), hashlib.sha256(big).hexdigest())
    await settled(stack)

    # SSE: every event arrives; streamed where the response body mode streams.
    body = {"model": "m", "prompt": "p", "stream": True, "chunks": 4, "interval": 0.4}
    arrivals, received = [], b""
    async with stack.post("a", body) as reply:
        assert reply.status == 200
        started = time.monotonic()
        async for chunk in reply.content.iter_any():
            arrivals.append(time.monotonic() - started)
            received += chunk
    assert received.count(b"data: ") == 5
    assert received.endswith(b"data: [DONE]\n\n")
    if streams_response:
        assert arrivals[-1] - arrivals[0] > 0.6  # buffered, all would come at once
    await settled(stack)

    # Prefix affinity where the body arrives before the answer: a shared ~700-byte
    # prompt goes where the first one went. Elsewhere the pick has no prompt.
    hits_before = sum(e.prefix_hits for e in pool_status(stack))
    served = []
    for index in range(6):
        status, answer = await stack.complete("a", {"model": "m", "prompt": f"{SHARED}q{index}"})
        assert status == 200, answer
        served.append(answer["endpoint"])
    hits = sum(e.prefix_hits for e in pool_status(stack)) - hits_before
    if reads_prompt:
        assert len(set(served)) == 1, served
        assert hits == 5
    else:
        assert hits == 0
    await settled(stack)
    totals = stack.service.reader.get("a")
    assert totals is not None
    assert totals.metrics.total_requests == totals.metrics.dispatched_count == 38


def pool_status(stack: PoolStack) -> Any:
    assert stack.service.pool is not None
    return stack.service.pool.status().endpoints


async def test_the_conformance_header_steers_through_a_generated_gateway(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack("ai-gateway-duplex", conformance_test_hooks=True)
    target = stack.endpoints[2]
    url = f"http://127.0.0.1:{stack.envoy.port}/v1/completions"
    for index in range(6):
        headers = {"test-epp-endpoint-selection": target.address}
        data = json.dumps({"model": "m", "prompt": f"p{index}"})
        async with stack.http.post(url, data=data, headers=headers) as reply:
            assert reply.status == 200
            assert (await reply.json())["endpoint"] == target.name
            # This Envoy reports no served endpoint; the report says so, as upstream's.
            served = reply.headers["x-conformance-test-served-endpoint"]
            assert served == "fail: missing envoy lb metadata"
    assert len(target.served) == 6
    await settled(stack, "default")


@pytest.mark.parametrize("body_mode", ["BUFFERED", "BUFFERED_PARTIAL"])
async def test_a_buffered_request_outlives_a_short_message_timeout_in_the_queue(
    make_pool_stack: MakePoolStack, tmp_path: Path, body_mode: str
) -> None:
    # A short message_timeout (a hung picker fails fast) with max_message_timeout set:
    # the buffered body's answer is due within 200 ms unless the hold, sent in the body
    # phase, reaches Envoy. Held ~0.6 s in the queue, it must still go, with its headers.
    pem = Authority(tmp_path, "ca").issue("picker", server=True)
    stack = await make_pool_stack(
        envoy_config=lambda port, _: gateway_config(
            port, body_mode, message_timeout="0.2s", max_message_timeout="65s"
        ),
        tls_cert=pem.cert,
        tls_key=pem.key,
        max_concurrency=1,
    )
    first = asyncio.create_task(stack.complete("a", {"model": "m", "prompt": "1", "hold": True}))
    await eventually(lambda: sum(e.running for e in stack.endpoints) == 1, within=10)
    second = asyncio.create_task(stack.complete("b", {"model": "m", "prompt": "2"}))
    await eventually(lambda: stack.service.flow.queued == 1, within=10)
    await asyncio.sleep(0.6)  # three message timeouts long, held in the queue
    assert not second.done()
    for endpoint in stack.endpoints:
        endpoint.gate.set()
    (status_a, _), (status_b, answer) = await asyncio.gather(first, second)
    assert (status_a, status_b) == (200, 200), answer
    assert stack.by_address(answer["destination"]).name == answer["endpoint"]
    assert sorted(w for e in stack.endpoints for w in e.served) == ["a", "b"]
    stats = await stack.envoy.stats("ext_proc")
    assert stats.get("http.gateway.ext_proc.message_timeouts", 0) == 0
    await settled(stack, "b")
    await settled(stack, "a")


@pytest.mark.parametrize(("body_mode", "status"), [("BUFFERED", 413), ("BUFFERED_PARTIAL", 200)])
async def test_a_body_over_envoys_buffer_limit(
    make_stack: MakeStack, body_mode: str, status: int
) -> None:
    # 3 MiB, over Envoy's 1 MiB connection buffer: BUFFERED answers 413 itself (never
    # dispatched, no endpoint charged); BUFFERED_PARTIAL sends the first part, and the
    # whole body still reaches the backend intact.
    stack = await make_stack(f"ai-gateway-{body_mode.lower().replace('_', '-')}")
    big = json.dumps({"model": "m", "prompt": "x" * (3 << 20)}).encode()
    got, answer = await stack.complete("a", big)
    assert got == status, answer
    dispatched = 1 if status == 200 else 0
    if dispatched:
        assert (answer["bytes"], answer["sha256"]) == (len(big), hashlib.sha256(big).hexdigest())
    assert sum(len(e.served) for e in stack.endpoints) == dispatched
    await settled(stack)
    totals = stack.service.reader.get("a")
    assert totals is not None
    assert (totals.metrics.total_requests, totals.metrics.dispatched_count) == (1, dispatched)
    assert sum(e.picked for e in pool_status(stack)) == dispatched


async def test_a_buffered_request_whose_client_leaves_while_queued_is_counted_out(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack("ai-gateway-buffered", max_concurrency=1)
    first = asyncio.create_task(stack.complete("a", {"model": "m", "prompt": "1", "hold": True}))
    await eventually(lambda: sum(e.running for e in stack.endpoints) == 1, within=10)
    leaving = asyncio.create_task(stack.complete("b", {"model": "m", "prompt": "2"}))
    await eventually(lambda: stack.service.flow.queued == 1 and stack.active("b") == 1, within=10)
    leaving.cancel()  # closes the client's connection while its body waits in the queue
    await asyncio.gather(leaving, return_exceptions=True)
    await eventually(lambda: stack.active("b") == 0 and stack.service.flow.queued == 0)
    for endpoint in stack.endpoints:
        endpoint.gate.set()
    assert (await first)[0] == 200
    await settled(stack)
    totals = stack.service.reader.get("b")
    assert totals is not None
    assert (totals.metrics.total_requests, totals.metrics.dispatched_count) == (1, 0)
    assert sum(len(e.served) for e in stack.endpoints) == 1
