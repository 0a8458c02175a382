"""The demo model server: the OpenAI-compatible API as the official SDK uses it,
its errors, its timing model, its prefix cache and its vLLM-named metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.capacity.saturation import SaturationOptions, parse_reading
from extproc.tools.demo_backend import Timing
from tests.support.demo_server import completion, demo_server

FAST = Timing(first_token=0.0, inter_token=0.005)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with demo_server(2, max_tokens=7, timing=FAST) as url:
        yield url


def sdk(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


async def metrics(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as reply:
        page = await reply.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if "le" not in sample.labels
    }


async def test_the_sync_sdk_gets_a_chat_completion_and_a_completion(base: str) -> None:
    await asyncio.to_thread(sync_sdk_session, base)  # the server runs on this loop


def sync_sdk_session(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == " the queue is"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    # <|system|> be brief <|user|> Hello , world !
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (8, 3)
    assert chat.usage.total_tokens == 11
    text = client.completions.create(model="demo", prompt="one two three")
    assert text.object == "text_completion"
    assert text.usage is not None
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (3, 7)  # server default
    assert len(text.choices[0].text.split()) == 7
    [model] = client.models.list().data
    assert model.id == "demo"


async def test_the_async_sdk_streams_deltas_then_usage(base: str) -> None:
    client = sdk(base)
    stream = await client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=4, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    *tokens, last = chunks
    assert tokens[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in tokens) == " the queue is fair"
    assert [c.choices[0].finish_reason for c in tokens] == [None] * 4 + ["length"]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    plain = await client.completions.create(model="demo", prompt="x", max_tokens=2, stream=True)
    pieces = [chunk async for chunk in plain]
    assert [p.choices[0].text for p in pieces] == [" the", " queue"]
    assert all(p.usage is None for p in pieces)


async def test_the_stream_ends_with_done(base: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/v1/completions", json=completion(2)) as reply,
    ):
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [e for e in (await reply.text()).split("\n\n") if e]
    assert [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]] == [
        " the",
        " queue",
    ]
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("path", "body", "param", "problem"),
    [
        ("/v1/completions", b"{not json", None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", None, "JSON object"),
        ("/v1/completions", b'{"model": "demo"}', "prompt", "prompt must be"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "at least 1"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "9"}', "max_tokens", "integer"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 40000}', "max_tokens", "context"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream", "boolean"),
        ("/v1/completions", b'{"prompt": "x", "n": 3}', "n", "n=1"),
        (
            "/v1/completions",
            b'{"prompt": "x", "stream_options": {"include_usage": true}}',
            "stream_options",
            "stream=True",
        ),
        (
            "/v1/completions",
            b'{"prompt": "x", "stream": true, "stream_options": 1}',
            "stream_options",
            "an object",
        ),
        ("/v1/chat/completions", b'{"messages": []}', "messages", "non-empty"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', "messages", "role"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": 7}]}',
            "messages",
            "content",
        ),
    ],
)
async def test_a_malformed_body_gets_a_400_in_openais_shape(
    base: str, path: str, body: bytes, param: str | None, problem: str
) -> None:
    async with aiohttp.ClientSession() as http, http.post(base + path, data=body) as reply:
        assert reply.status == 400
        error = (await reply.json())["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == param
    assert problem in error["message"]


async def test_the_sdk_raises_its_own_errors(base: str) -> None:
    client = sdk(base)
    with pytest.raises(openai.BadRequestError, match="prompt must be"):
        await client.completions.create(model="demo", prompt=[])
    with pytest.raises(openai.NotFoundError, match="`gpt-9` does not exist"):
        await client.completions.create(model="gpt-9", prompt="x")
    assert (await metrics(base))["vllm:prompt_tokens_total"] == 0  # nothing was served


async def test_limits_how_many_requests_it_serves_at_once() -> None:
    finished: list[str] = []
    timing = Timing(first_token=0.0, inter_token=0.5)

    async def fetch(http: aiohttp.ClientSession, url: str, name: str) -> None:
        async with http.post(url, json=completion(1)) as reply:
            await reply.read()
        finished.append(name)

    async with demo_server(1, timing=timing) as base, aiohttp.ClientSession() as http:
        url = f"{base}/v1/completions"
        async with http.post(url, json=completion(2)) as slow:  # first token out: it holds the slot
            fast = asyncio.create_task(fetch(http, url, "fast"))
            await slow.read()
            finished.append("slow")
        await fast
    # Unlimited, the one-token request would finish long before the two-token one.
    assert finished == ["slow", "fast"]


async def test_metrics_keep_vllms_names_and_count_what_was_served(base: str) -> None:
    client = sdk(base)
    await asyncio.gather(
        *(client.completions.create(model="demo", prompt="a b", max_tokens=5) for _ in range(3))
    )
    seen = await metrics(base)
    assert seen["vllm:time_to_first_token_seconds_count"] == 3
    assert seen["vllm:inter_token_latency_seconds_count"] == 3 * 4  # gaps between 5 tokens
    assert seen["vllm:e2e_request_latency_seconds_count"] == 3
    assert seen["vllm:generation_tokens_total"] == 15
    assert seen["vllm:prompt_tokens_total"] == 6
    assert (seen["vllm:num_requests_running"], seen["vllm:num_requests_waiting"]) == (0, 0)
    assert seen["demo_backend_max_waiting"] == 1  # two slots, three requests
    # Timing model lower bound: each gap sleeps inter_token first.
    assert seen["vllm:inter_token_latency_seconds_sum"] >= 12 * FAST.inter_token
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as reply:
        reading = parse_reading(await reply.text(), SaturationOptions())
    assert (reading.waiting, reading.kv_cache_usage) == (0, 0)


async def test_a_cached_prefix_skips_its_prefill() -> None:
    # 800 prompt tokens at 400 tokens/s: 2 s of prefill uncached.
    timing = Timing(first_token=0.0, prefill_rate=400.0, inter_token=0.0)
    shared = " ".join(f"w{i}" for i in range(790))
    async with demo_server(4, timing=timing) as base:
        client = sdk(base)

        async def first_token(suffix: str) -> tuple[float, int]:
            started = time.monotonic()
            reply = await client.completions.create(
                model="demo", prompt=shared + suffix, max_tokens=1
            )
            assert reply.usage is not None
            assert reply.usage.prompt_tokens_details is not None
            return time.monotonic() - started, reply.usage.prompt_tokens_details.cached_tokens or 0

        cold, cold_cached = await first_token(" a b c d e f g h i j")
        warm, warm_cached = await first_token(" k l m n o p q r s t")
        seen = await metrics(base)
    assert (cold_cached, warm_cached) == (0, 784)  # 49 whole blocks of 16 shared tokens
    assert cold >= 2.0  # the model's prefill; asyncio.sleep never ends early
    assert warm < cold
    assert seen["vllm:prefix_cache_queries_total"] == 1600
    assert seen["vllm:prefix_cache_hits_total"] == 784


def test_speed_divides_every_time() -> None:
    slow, fast = Timing(speed=1.0), Timing(speed=4.0)
    assert fast.prefill(1000) == pytest.approx(slow.prefill(1000) / 4)
    assert fast.decode() == pytest.approx(slow.decode() / 4)
    assert slow.prefill(500) == pytest.approx(slow.first_token + 500 / slow.prefill_rate)
    with pytest.raises(ValueError, match="speed"):
        Timing(speed=0)


async def test_kv_cache_use_covers_running_requests() -> None:
    timing = Timing(first_token=0, inter_token=0.2)
    async with demo_server(1, timing=timing) as slow, aiohttp.ClientSession() as http:
        url = f"{slow}/v1/completions"
        async with http.post(url, json=completion(5, prompt="a b c")) as reply:
            await reply.content.readline()  # first token out: it is running
            seen = await metrics(slow)
            await reply.read()
        after = await metrics(slow)
    assert seen["vllm:num_requests_running"] == 1
    assert 0 < seen["vllm:kv_cache_usage_perc"] < 1
    assert after["vllm:kv_cache_usage_perc"] == 0


async def test_the_workload_headers_come_back(base: str) -> None:
    headers = {"x-workload-id": "team-a", "x-workload-queue-wait-ms": "12"}
    raw = await sdk(base).completions.with_raw_response.create(
        model="demo", prompt="x", max_tokens=1, extra_headers=headers
    )
    assert raw.headers["x-demo-workload-id"] == "team-a"
    assert raw.headers["x-demo-queue-wait-ms"] == "12"


async def test_a_client_that_leaves_mid_answer_frees_its_slot() -> None:
    timing = Timing(first_token=0.0, inter_token=0.05)
    async with demo_server(1, timing=timing) as base, aiohttp.ClientSession() as http:
        url = f"{base}/v1/completions"
        reply = await http.post(url, json=completion(1000))  # 50 s if read to the end
        await reply.content.readline()
        reply.close()  # gone after the first token
        deadline = time.monotonic() + 10
        while (await metrics(base))["vllm:num_requests_running"] != 0:
            assert time.monotonic() < deadline, "the abandoned request still runs"
            await asyncio.sleep(0.05)
        seen = await metrics(base)
        assert seen["vllm:kv_cache_usage_perc"] == 0
        assert seen["vllm:generation_tokens_total"] < 1000
        assert seen["vllm:e2e_request_latency_seconds_count"] == 0  # not finished
        async with http.post(url, json=completion(2, stream=False)) as second:
            assert (await second.json())["usage"]["completion_tokens"] == 2
        async with http.get(f"{base}/health") as health:
            assert health.status == 200
