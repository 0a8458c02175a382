"""A stand-in for an LLM inference server, for `make run` and for the end-to-end tests.

It speaks the OpenAI-compatible API the way vLLM's server does, closely enough
that the official `openai` SDK (and curl with a JSON body, LangChain, LLM
benchmarks) works unchanged: `POST /v1/chat/completions` and
`POST /v1/completions` (`model`, `messages`/`prompt`, `max_tokens`, `stream`,
`stream_options.include_usage`), answered as one JSON object with `choices`
and `usage`, or as server-sent chunks with `choices[].delta` (`text` for
completions) ending in `data: [DONE]`; `GET /v1/models` and `GET /health`.
Bad requests get a 400 with `{"error": {"message", "type", "param", "code"}}`,
an unknown model a 404. The answer is made-up words: exactly `max_tokens` of
them (`--max-tokens` when the request names none), `finish_reason` "length".
One prompt and one choice per request (no batches, no `n` > 1).

Timing model (all times divided by `Timing.speed`, so speed 2 is twice as fast):
- Admission: at most `concurrency` requests run at once; the rest wait inside
  the server in arrival order, where no fairness applies -- which is why the
  queue in front of it matters. They count as `vllm:num_requests_waiting`.
- Prefill: once admitted, the first token comes after
  `first_token + (prompt_tokens - cached_tokens) / prefill_rate` seconds, where
  `cached_tokens` is the prompt's prefix found in the prefix cache
  (extproc/tools/prefix_cache.py: whole blocks of 16 tokens, LRU). A cached
  prefix skips its share of the prefill, so it answers its first token sooner.
- Decode: each further token follows `inter_token` seconds after the one
  before; running requests do not slow each other (a simplification: a real
  server's step time grows with its batch).
- Time to first token, as a client sees it = time waiting inside + prefill.
A token is a word or a punctuation mark; a chat prompt is each message's role
marker and content.

`GET /metrics` reports all this under vLLM's names, so `--capacity metrics`
can gate on it and dashboards read it as they read vLLM: requests waiting and
running, KV-cache use (tokens held by running requests over `kv_cache_tokens`),
`vllm:time_to_first_token_seconds` (from arrival, as vLLM measures it),
`vllm:inter_token_latency_seconds`, `vllm:e2e_request_latency_seconds`, prompt
and generation token counters, and `vllm:prefix_cache_queries_total` /
`vllm:prefix_cache_hits_total` (in prompt tokens). `demo_backend_max_waiting`
is the most requests that ever waited at once, for tests to check a gate
against. The workload headers the service adds upstream come back as
`x-demo-workload-id` and `x-demo-queue-wait-ms`, to show what the server saw.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.tools.prefix_cache import PrefixCache

MAX_MODEL_LEN = 32_768
MAX_BODY_BYTES = 16 * 2**20
KV_TOKENS_PER_SLOT = 1024
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORDS = ("the", "queue", "is", "fair", "and", "every", "tenant", "gets", "its", "turn", ".")
# vLLM's buckets for these two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """The timing model above; seconds and prompt tokens per second."""

    first_token: float = 0.05
    prefill_rate: float = 5000.0
    inter_token: float = 0.1
    speed: float = 1.0

    def __post_init__(self) -> None:
        if min(self.first_token, self.inter_token) < 0 or min(self.prefill_rate, self.speed) <= 0:
            raise ValueError("times must be >= 0, prefill rate and speed > 0")

    def prefill(self, uncached_tokens: int) -> float:
        return (self.first_token + uncached_tokens / self.prefill_rate) / self.speed

    def decode(self) -> float:
        return self.inter_token / self.speed


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status

    def response(self) -> web.Response:
        kind = {400: "BadRequestError", 404: "NotFoundError"}[self.status]
        error = {"message": str(self), "type": kind, "param": self.param, "code": self.status}
        return web.json_response({"error": error}, status=self.status)


@dataclass(frozen=True)
class Ask:
    """One generation request, as parsed from its body."""

    chat: bool
    prompt: tuple[str, ...]
    max_tokens: int
    stream: bool
    include_usage: bool


@dataclass
class _Load:
    concurrency: int
    kv_cache_tokens: int
    waiting: int = 0
    running: int = 0
    max_waiting: int = 0
    held_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.held_tokens / self.kv_cache_tokens)


class _Metrics:
    def __init__(self, model: str, load: _Load) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, labels, registry=r)

        gauge("vllm:num_requests_waiting", "Requests waiting to be processed.").labels(
            model
        ).set_function(lambda: load.waiting)
        gauge("vllm:num_requests_running", "Requests running.").labels(model).set_function(
            lambda: load.running
        )
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.").labels(
            model
        ).set_function(lambda: load.kv_cache_usage)
        Gauge(
            "demo_backend_max_waiting", "Most requests ever waiting at once.", registry=r
        ).set_function(lambda: load.max_waiting)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token, from arrival.", labels,
            registry=r, buckets=TTFT_BUCKETS,
        ).labels(model)  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", labels,
            registry=r, buckets=ITL_BUCKETS,
        ).labels(model)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
            registry=r, buckets=TTFT_BUCKETS,
        ).labels(model)  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens.", labels, registry=r
        ).labels(model)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=r
        ).labels(model)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            labels, registry=r,
        ).labels(model)  # fmt: skip
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
            labels, registry=r,
        ).labels(model)  # fmt: skip


@dataclass(frozen=True)
class _Server:
    model: str
    default_max_tokens: int
    timing: Timing
    load: _Load
    slots: asyncio.Semaphore
    cache: PrefixCache
    metrics: _Metrics


_SERVER = web.AppKey("server", _Server)


def make_demo_app(
    concurrency: int = 4,
    *,
    max_tokens: int = 20,
    timing: Timing | None = None,
    prefix_cache_blocks: int = 2048,
    model: str = "demo",
    kv_cache_tokens: int | None = None,
) -> web.Application:
    """`max_tokens` answers a request that names none; the KV cache defaults to
    1,024 tokens per running request."""
    if concurrency < 1 or not 1 <= max_tokens <= MAX_MODEL_LEN:
        raise ValueError(f"concurrency must be >= 1 and max_tokens in 1..{MAX_MODEL_LEN}")
    load = _Load(concurrency, kv_cache_tokens or KV_TOKENS_PER_SLOT * concurrency)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_SERVER] = _Server(
        model, max_tokens, timing or Timing(), load, asyncio.Semaphore(concurrency),
        PrefixCache(prefix_cache_blocks), _Metrics(model, load),
    )  # fmt: skip
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    return app


async def _metrics(request: web.Request) -> web.Response:
    page = generate_latest(request.app[_SERVER].metrics.registry)
    return web.Response(body=page, content_type="text/plain", charset="utf-8")


async def _health(_: web.Request) -> web.Response:
    return web.Response()  # as vLLM: 200 while it serves


async def _models(request: web.Request) -> web.Response:
    model = request.app[_SERVER].model
    entry = {"id": model, "object": "model", "created": int(time.time()), "owned_by": "demo",
             "root": model, "parent": None, "max_model_len": MAX_MODEL_LEN}  # fmt: skip
    return web.json_response({"object": "list", "data": [entry]})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    server = request.app[_SERVER]
    arrival = time.monotonic()
    try:
        ask = parse_ask(await _json_body(request), chat, server.model, server.default_max_tokens)
    except OpenAIError as error:
        return error.response()
    load = server.load
    load.waiting += 1
    load.max_waiting = max(load.max_waiting, load.waiting)
    try:
        await server.slots.acquire()
    finally:
        load.waiting -= 1
    load.running += 1
    load.held_tokens += len(ask.prompt)
    reply = _Reply(request, server, ask, arrival)
    try:
        async with aclosing(reply.generate()) as tokens:
            return await (reply.stream(tokens) if ask.stream else reply.whole(tokens))
    finally:
        load.held_tokens -= len(ask.prompt) + reply.generated
        load.running -= 1
        server.slots.release()


async def _json_body(request: web.Request) -> object:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as error:
        raise OpenAIError(f"the body is not valid JSON: {error}") from None


def parse_ask(body: object, chat: bool, served: str, default_max_tokens: int) -> Ask:
    """The request's fields, checked as vLLM checks them; OpenAIError names the first fault."""
    if not isinstance(body, dict):
        raise OpenAIError("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise OpenAIError(f"The model `{model}` does not exist.", "model", status=404)
    prompt = _chat_prompt(body.get("messages")) if chat else _completion_prompt(body.get("prompt"))
    limit = body.get("max_completion_tokens") if chat else None
    max_tokens = _optional_int(body, "max_completion_tokens" if limit is not None else "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError("max_tokens must be at least 1", "max_tokens")
    max_tokens = max_tokens or max(1, min(default_max_tokens, MAX_MODEL_LEN - len(prompt)))
    if len(prompt) + max_tokens > MAX_MODEL_LEN:
        raise OpenAIError(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens; the request has "
            f"{len(prompt)} prompt tokens and asks for {max_tokens} more.", "max_tokens",
        )  # fmt: skip
    if body.get("n", 1) not in (1, None):
        raise OpenAIError("the demo backend answers n=1 only", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise OpenAIError("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise OpenAIError(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    include_usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict | None) or not isinstance(include_usage, bool | None):
        raise OpenAIError(
            "stream_options must be an object with include_usage a boolean", "stream_options"
        )
    return Ask(chat, prompt, max_tokens, stream, bool(include_usage))


def _optional_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise OpenAIError(f"{field} must be an integer", field)


def _chat_prompt(messages: object) -> tuple[str, ...]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list", "messages")
    tokens: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OpenAIError("each message must be an object with a role", "messages")
        tokens.append(f"<|{message['role']}|>")
        tokens += _TOKEN.findall(_message_text(message.get("content")))
    return tuple(tokens)


def _message_text(content: object) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return " ".join(part["text"] for part in content)
    raise OpenAIError("message content must be a string or a list of text parts", "messages")


def _completion_prompt(prompt: object) -> tuple[str, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tuple(_TOKEN.findall(prompt))
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return tuple(map(str, prompt))  # token ids
    raise OpenAIError(
        "prompt must be a string, a list of one string or a list of token ids", "prompt"
    )


class _Reply:
    """One admitted request: generates on the timing model, answers in OpenAI's shapes."""

    def __init__(self, request: web.Request, server: _Server, ask: Ask, arrival: float) -> None:
        self.request, self.server, self.ask, self.arrival = request, server, ask, arrival
        self.id = f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.generated = 0
        self.cached = 0

    async def generate(self) -> AsyncGenerator[str, None]:
        """The answer's tokens, each when the timing model says; stops if the client leaves."""
        server, metrics = self.server, self.server.metrics
        prompt = self.ask.prompt
        self.cached = server.cache.cached_tokens(prompt)
        metrics.prefix_queries.inc(len(prompt))
        metrics.prefix_hits.inc(self.cached)
        metrics.prompt_tokens.inc(len(prompt))
        await asyncio.sleep(server.timing.prefill(len(prompt) - self.cached))
        server.cache.insert(prompt)
        last = time.monotonic()
        metrics.ttft.observe(last - self.arrival)
        for index in range(self.ask.max_tokens):
            if index:
                await asyncio.sleep(server.timing.decode())
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
            if self.request.transport is None or self.request.transport.is_closing():
                return  # the client left; a model server aborts the request too
            self.generated += 1
            server.load.held_tokens += 1
            metrics.generation_tokens.inc()
            yield " " + _WORDS[index % len(_WORDS)]
        metrics.e2e.observe(time.monotonic() - self.arrival)

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"content-type": content_type}
        for seen, echo in (("x-workload-id", "x-demo-workload-id"),
                           ("x-workload-queue-wait-ms", "x-demo-queue-wait-ms")):  # fmt: skip
            if seen in self.request.headers:
                headers[echo] = self.request.headers[seen]
        return headers

    def usage(self) -> dict[str, Any]:
        prompt = len(self.ask.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.generated,
                "total_tokens": prompt + self.generated,
                "prompt_tokens_details": {"cached_tokens": self.cached}}  # fmt: skip

    def _envelope(self, choice: dict[str, Any], stream: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.ask.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if stream and self.ask.chat else ""),
                "created": self.created, "model": self.server.model,
                "choices": [{"index": 0, **choice, "logprobs": None}]}  # fmt: skip

    async def whole(self, tokens: AsyncIterator[str]) -> web.StreamResponse:
        text = "".join([token async for token in tokens])
        if self.ask.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        body = self._envelope({**choice, "finish_reason": "length"}, stream=False)
        body["usage"] = self.usage()
        return web.Response(text=json.dumps(body), headers=self._headers("application/json"))

    def _chunk(self, content: str, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.ask.chat:
            delta = {"role": "assistant", "content": content} if first else {"content": content}
            choice: dict[str, Any] = {"delta": delta, "finish_reason": finish}
        else:
            choice = {"text": content, "finish_reason": finish}
        chunk = self._envelope(choice, stream=True)
        if self.ask.include_usage:
            chunk["usage"] = None  # as vLLM: only the last chunk carries usage
        return chunk

    async def stream(self, tokens: AsyncIterator[str]) -> web.StreamResponse:
        """Headers go out with the first token, so a first byte means a first token."""
        response = web.StreamResponse(headers=self._headers("text/event-stream; charset=utf-8"))
        try:
            async for token in tokens:
                if not response.prepared:
                    await response.prepare(self.request)
                    if self.ask.chat:
                        await response.write(_event(self._chunk("", None, first=True)))
                finish = "length" if self.generated == self.ask.max_tokens else None
                await response.write(_event(self._chunk(token, finish)))
            if self.generated < self.ask.max_tokens:
                return response  # the client left
            if self.ask.include_usage:
                usage = self._envelope({}, stream=True) | {"choices": [], "usage": self.usage()}
                await response.write(_event(usage))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading; generate() sees the closed transport next
        return response


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
