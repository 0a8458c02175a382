"""The OpenAI-style request body, as far as picking an endpoint needs it.

The stream handler collects the request body's chunks (full-duplex and buffered modes)
into a `BodyBuffer` up to `--max-body-bytes` and reads it once complete.
What it reads (`model`, the prompt text, `stream`, `max_tokens`) only informs
the pick (prefix affinity) and the token estimate; the body itself is always
forwarded exactly as it came. A body that is not JSON, not an object, or larger
than the limit reads as "nothing known" -- never a reason to reject a request.
A `max_tokens` above `contracts.MAX_TOKENS` reads as MAX_TOKENS.

The prompt of a chat request is its messages in order, each as
"role: text" on its own line, so requests that share a conversation prefix
share a prompt prefix. Only text parts of a message's content count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from extproc.contracts import clamp_tokens

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """What the body said; every field None when the body did not say it."""

    model: str | None = None
    prompt: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    include_usage: bool = False
    """`stream_options.include_usage`: the last SSE chunk will carry `usage`."""


UNKNOWN = InferenceRequest()


class BodyBuffer:
    """A request body's chunks in arrival order, read only while within `limit` bytes."""

    __slots__ = ("_chunks", "_limit", "_size")

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._limit = limit
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._limit:
            self._chunks.append(chunk)
        else:
            # Past the limit the body will not be read: keep no copy of it.
            self._chunks.clear()

    @property
    def over_limit(self) -> bool:
        return self._size > self._limit

    def read(self) -> InferenceRequest:
        """The request the body describes; UNKNOWN past the limit or when it is not JSON."""
        if self.over_limit or not self._chunks:
            return UNKNOWN
        return parse(b"".join(self._chunks))


def parse(body: bytes) -> InferenceRequest:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return UNKNOWN
    if not isinstance(document, dict):
        return UNKNOWN
    model = document.get("model")
    max_tokens = document.get("max_completion_tokens", document.get("max_tokens"))
    options = document.get("stream_options")
    return InferenceRequest(
        model=model if isinstance(model, str) else None,
        prompt=_prompt(document),
        stream=document.get("stream") is True,
        max_tokens=clamp_tokens(max_tokens) if is_count(max_tokens) else None,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def is_count(value: object) -> TypeGuard[int]:
    """A JSON number of tokens: a non-negative integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompt(document: dict[str, Any]) -> str | None:
    prompt = document.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    messages = document.get("messages")
    if isinstance(messages, list):
        lines = [_message_line(m) for m in messages if isinstance(m, dict)]
        return "".join(lines) or None
    return None


def _message_line(message: dict[str, Any]) -> str:
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    if not isinstance(content, str):
        content = ""
    return f"{role if isinstance(role, str) else ''}: {content}\n"
