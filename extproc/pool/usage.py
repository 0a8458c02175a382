"""Token counts of a request: estimated from its body, measured from its response.

- Estimate (at dispatch): input = prompt characters / 4 (rounded up; the usual
  rule of thumb for English text and BPE tokenizers), output = `max_tokens`,
  else `DEFAULT_OUTPUT_TOKENS`. None when the body said nothing usable.
- Both, estimated or measured, are clamped to 0..`contracts.MAX_TOKENS`.
- Measure (at completion): the response's `usage` object
  (`prompt_tokens`, `completion_tokens`), from a JSON body or, for a stream,
  from the last SSE `data:` event that carries one (OpenAI servers send it
  last when `stream_options.include_usage` is set). `UsageReader` keeps the
  whole body while it stays within its limit, and beyond that only a bounded
  tail, which is enough for the last SSE events.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.contracts import TokenCount, clamp_tokens
from extproc.pool.body import InferenceRequest, is_count

CHARS_PER_TOKEN = 4
DEFAULT_OUTPUT_TOKENS = 256
_TAIL_BYTES = 64 * 1024


def estimate(request: InferenceRequest) -> TokenCount | None:
    if request.prompt is None and request.max_tokens is None:
        return None
    prompt = request.prompt or ""
    output = request.max_tokens if request.max_tokens is not None else DEFAULT_OUTPUT_TOKENS
    return counted(-(-len(prompt) // CHARS_PER_TOKEN), output)


def counted(input_tokens: int, output_tokens: int) -> TokenCount:
    """A token count from outside, within the declared range (`contracts.MAX_TOKENS`)."""
    return TokenCount(clamp_tokens(input_tokens), clamp_tokens(output_tokens))


class UsageReader:
    """A response body's chunks, read for `usage` once the body ends."""

    __slots__ = ("_chunks", "_limit", "_size", "_tail")

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._tail = b""
        self._limit = limit
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._limit:
            self._chunks.append(chunk)
            return
        if self._chunks:
            self._tail = b"".join(self._chunks)
            self._chunks = []
        self._tail = (self._tail + chunk)[-_TAIL_BYTES:]

    def usage(self) -> TokenCount | None:
        if self._chunks:
            body = b"".join(self._chunks)
            whole = _loads(body)
            if whole is not None:
                return _usage_of(whole)
            return _last_event_usage(body)
        return _last_event_usage(self._tail)


def _last_event_usage(body: bytes) -> TokenCount | None:
    for line in reversed(body.splitlines()):
        if not line.startswith(b"data:"):
            continue
        event = _loads(line[5:].strip())
        found = _usage_of(event) if event is not None else None
        if found is not None:
            return found
    return None


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _usage_of(document: Any) -> TokenCount | None:
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (is_count(prompt) and is_count(completion)):
        return None
    return counted(prompt, completion)
