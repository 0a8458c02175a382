"""Token counts of a request: estimated from its body, measured from its response.

- Estimate (at dispatch): input = prompt characters / 4 (rounded up; the usual
  rule of thumb for English text and BPE tokenizers), output = `max_tokens`,
  else `DEFAULT_OUTPUT_TOKENS`. None when the body said nothing usable.
- Both, estimated or measured, are clamped to 0..`contracts.MAX_TOKENS`.
- Measure (at completion): the response's `usage` object
  (`prompt_tokens`, `completion_tokens`), from a JSON body or, for a stream,
  from the last SSE `data:` event that carries one (OpenAI servers send it
  last when `stream_options.include_usage` is set). `UsageReader` keeps a
  JSON body (one that opens with `{`) whole while it stays within its limit;
  an event stream, and any body past the limit, only as its last chunks (at
  least `_TAIL_BYTES` of them), which is where the last SSE events are: the
  scan at the end costs the tail, not the stream's length.
"""

from __future__ import annotations

import json
from collections import deque
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

    __slots__ = ("_chunks", "_kept", "_limit", "_size", "_whole")

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._kept = 0
        self._limit = limit
        self._size = 0
        self._whole: bool | None = None
        """Kept whole (a JSON body within the limit); None until the first byte."""

    def add(self, chunk: bytes) -> None:
        if self._whole is None:
            opening = chunk.lstrip()[:1]
            if not opening:
                return  # whitespace before the first byte changes no JSON document
            self._whole = opening == b"{"
        self._size += len(chunk)
        self._chunks.append(chunk)
        self._kept += len(chunk)
        if self._whole and self._size <= self._limit:
            return
        self._whole = False
        chunks = self._chunks
        while self._kept - len(chunks[0]) >= _TAIL_BYTES:
            self._kept -= len(chunks.popleft())

    def usage(self) -> TokenCount | None:
        body = b"".join(self._chunks)
        if self._whole:
            whole = _loads(body)
            if whole is not None:
                return _usage_of(whole)
        return _last_event_usage(body)


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
