"""Two real vLLMs with prefix caching behind the real Envoy (envoy-pool.yaml) and the
service picking: prefix-aware picking against round robin (check 2), and a server killed
mid-stream, then restarted (check 5). Judged by vLLM's /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.support.extproc_client import eventually, eventually_async
from tests.support.vllm import VllmServer
from tests.support.vllm_load import (
    BLOCK_TOKENS,
    KV_BLOCKS,
    PrefixScenario,
    completion,
    headers,
    run_prefix,
)
from tests.vllm.conftest import Stack

SCENARIO = PrefixScenario()


async def test_prefix_aware_picking_beats_round_robin_on_vllms_own_prefix_cache(
    servers: list[VllmServer], stack: Stack, http: aiohttp.ClientSession
) -> None:
    page = await servers[0].metrics(http)
    info = page.labels["vllm:cache_config_info"]
    assert info["block_size"] == str(BLOCK_TOKENS)
    assert info["enable_prefix_caching"] == "True"
    assert int(info["num_gpu_blocks"]) == KV_BLOCKS
    runs = {}
    for run, picker in enumerate(("scored", "round-robin")):
        _, envoy = await stack(servers, pool=True, picker=picker, policy="fcfs")
        url = f"http://127.0.0.1:{envoy.port}/v1/chat/completions"
        runs[picker] = await run_prefix(
            http, url, servers, SCENARIO.requests(run), SCENARIO.workers
        )
        await envoy.stop()
    scored, rr = runs["scored"], runs["round-robin"]
    for name, result in runs.items():
        assert result.ttft is not None
        print(f"{name}: hits {result.hit_ratio:.2f}, TTFT mean {result.ttft.mean * 1e3:.1f} ms,"
              f" served by {dict(result.served_by)}")  # fmt: skip
        assert set(result.statuses) == {200}
        assert min(result.prompt_tokens) >= 1000
    assert scored.hit_ratio >= 1.5 * rr.hit_ratio
    assert scored.ttft is not None
    assert rr.ttft is not None
    assert scored.ttft.mean < rr.ttft.mean


async def endpoints(http: aiohttp.ClientSession, service: Any) -> dict[str, dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{service.admin_port}/v1/endpoints") as reply:
        return {e["address"]: e for e in (await reply.json())["endpoints"]}


async def workload_active(http: aiohttp.ClientSession, service: Any, workload: str) -> int:
    async with http.get(f"http://127.0.0.1:{service.admin_port}/v1/workloads") as reply:
        listed = (await reply.json())["workloads"]
    return sum(w["active_requests"] for w in listed if w["workload_id"] == workload)


async def test_a_vllm_killed_mid_stream_leaves_the_pick_and_comes_back_restarted(
    servers: list[VllmServer], stack: Stack, http: aiohttp.ClientSession
) -> None:
    service, envoy = await stack(servers, pool=True, picker="round-robin")
    url = f"http://127.0.0.1:{envoy.port}/v1/completions"
    body = completion(20, 1500, stream=True)
    async with http.post(url, json=body, headers=headers("victim")) as reply:
        assert reply.status == 200
        victim = next(s for s in servers if s.address == reply.headers["x-served-by"])
        survivor = next(s for s in servers if s is not victim)
        received = await reply.content.readany()
        assert received.startswith(b"data: ")
        await asyncio.to_thread(victim.kill)
        with pytest.raises(aiohttp.ClientPayloadError):
            received += await reply.content.read()
    assert b"[DONE]" not in received

    async def counted_out() -> bool:
        listed = await endpoints(http, service)
        in_flight = sum(e["in_flight"] for e in listed.values())
        return in_flight == 0 and await workload_active(http, service, "victim") == 0

    await eventually_async(counted_out, within=15)
    await eventually_async(lambda: _ready(http, service, victim.address, False), within=30)
    for _ in range(4):
        async with http.post(url, json=completion(5, 4), headers=headers("after")) as reply:
            assert reply.status == 200
            assert reply.headers["x-served-by"] == survivor.address
    await asyncio.to_thread(victim.start)
    await eventually_async(lambda: _ready(http, service, victim.address, True), within=30)
    served = set()
    for _ in range(4):
        async with http.post(url, json=completion(5, 4), headers=headers("back")) as reply:
            assert reply.status == 200
            served.add(reply.headers["x-served-by"])
    assert served == {victim.address, survivor.address}
    await eventually(lambda: service.flow.in_flight == 0)


async def _ready(http: aiohttp.ClientSession, service: Any, address: str, ready: bool) -> bool:
    return bool((await endpoints(http, service))[address]["ready"] == ready)
