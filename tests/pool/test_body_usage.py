"""Reading the OpenAI request body, estimating its tokens, and reading `usage` back."""

import json

import pytest

from extproc.contracts import TokenCount
from extproc.pool.body import UNKNOWN, BodyBuffer, InferenceRequest, parse
from extproc.pool.usage import _TAIL_BYTES, DEFAULT_OUTPUT_TOKENS, UsageReader, estimate


def test_completions_body() -> None:
    body = {"model": "m", "prompt": "hello", "stream": True, "max_tokens": 7,
            "stream_options": {"include_usage": True}}  # fmt: skip
    assert parse(json.dumps(body).encode()) == InferenceRequest("m", "hello", True, 7, True)


def test_chat_messages_become_one_prompt_in_order() -> None:
    body = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
    ], "max_completion_tokens": 3}  # fmt: skip
    request = parse(json.dumps(body).encode())
    assert request.prompt == "system: be brief\nuser: hi\n"
    assert request.max_tokens == 3


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"[1]", b'"text"', b"{", b'{"prompt": 5, "max_tokens": true}', b"[" * 100_000],
)
def test_unusable_bodies_read_as_nothing_known(body: bytes) -> None:
    request = parse(body)
    assert request.prompt is None
    assert request.max_tokens is None


def test_a_body_past_the_limit_is_not_read() -> None:
    buffer = BodyBuffer(limit=10)
    buffer.add(b'{"prompt":')
    assert not buffer.over_limit
    buffer.add(b' "x"}')
    assert buffer.over_limit
    assert buffer.read() is UNKNOWN


def test_estimate_from_prompt_and_max_tokens() -> None:
    assert estimate(InferenceRequest(prompt="x" * 9, max_tokens=5)) == TokenCount(3, 5)
    assert estimate(InferenceRequest(prompt="abcd")) == TokenCount(1, DEFAULT_OUTPUT_TOKENS)
    assert estimate(UNKNOWN) is None


def usage_of(chunks: list[bytes], limit: int = 1 << 20) -> TokenCount | None:
    reader = UsageReader(limit)
    for chunk in chunks:
        reader.add(chunk)
    return reader.usage()


def test_usage_from_a_json_body_in_pieces() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    assert usage_of([body[:10].encode(), body[10:].encode()]) == TokenCount(4, 9)


@pytest.mark.parametrize("limit", [1 << 20, 100])
def test_usage_from_the_last_sse_event(limit: int) -> None:
    events = [b'data: {"choices": [{"text": "t"}]}\n\n'] * 50
    events.append(
        b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 50}}\n\n'
    )
    events.append(b"data: [DONE]\n\n")
    assert usage_of(events, limit) == TokenCount(2, 50)


@pytest.mark.parametrize(
    "chunks",
    [
        [b'{"usage": {"prompt_tokens": -1, "completion_tokens": 2}}'],
        [b"data: {}\n\n"],
        [b"plain"],
        [],
    ],
)
def test_no_usage(chunks: list[bytes]) -> None:
    assert usage_of(chunks) is None


def test_an_event_stream_is_kept_only_as_its_tail() -> None:
    """Usage is in the last events: a long stream is not kept whole, even within the limit."""
    reader = UsageReader(1 << 30)
    event = b'data: {"choices": [{"text": "t"}]}\n\n'
    for _ in range(20_000):  # ~740 KB
        reader.add(event)
    reader.add(b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}\n\n')
    reader.add(b"data: [DONE]\n\n")
    assert reader._kept < _TAIL_BYTES + 200  # the bound is the point
    assert reader.usage() == TokenCount(3, 7)


def test_a_json_body_opening_after_whitespace_is_kept_whole() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "x" * 70_000})
    assert usage_of([b"\n  ", body[:5].encode(), body[5:].encode()]) == TokenCount(1, 2)
