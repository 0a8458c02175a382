"""The ext_proc stream handler: one gRPC stream per HTTP request, three tracking points.

Envoy opens `ExternalProcessor.Process` for every HTTP request. The request is
held simply by not answering the message that carries the decision yet. Each
direction's body mode (NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL,
FULL_DUPLEX_STREAMED) is read apart from what Envoy sends (`protocol_config`
on the stream's first message), never from configuration. The request's mode
decides which message's answer carries the decision (*dispatched*, or the
rejection), and whether the pick reads the prompt:
- NONE (bundled envoy.yaml: bodies not sent, response trailers mark the last
  byte) and STREAMED: the `request_headers` answer. The body comes, if at all,
  only after it, so the pick has no prompt (no prefix affinity, no token
  estimate); STREAMED body chunks are answered one by one, unchanged.
- BUFFERED and BUFFERED_PARTIAL (Envoy AI Gateway's `buffered` annotation,
  kgateway): Envoy sends the body, whole (or up to its buffer limit), as ONE
  `request_body` message only after the headers are answered, and holds the
  request headers until that message is answered. So the headers get a plain
  CONTINUE at once, the body is read for the prompt, and the `request_body`
  answer carries the decision: its CommonResponse's header mutation (which
  Envoy applies to the request headers it still holds -- the API documents this
  for BUFFERED; BUFFERED_PARTIAL measured alike end to end with Envoy 1.40) and
  the ProcessingResponse's `dynamic_metadata`. No body mutation: the body goes
  on as it came. A request with no body (headers with end_of_stream) is
  answered at its headers; should trailers come instead of a body message,
  their answer carries the decision as metadata alone (trailers carry no
  request header mutation).
- FULL_DUPLEX_STREAMED (what InferencePool gateways configure by default):
  Envoy sends the headers and every body chunk without waiting. The handler
  reads the request body (up to `max_body_bytes`, for the prompt and the token
  estimate), and the `request_headers` answer carries the decision; then it
  hands every body chunk back itself as a `streamed_response`, in order.
The response's mode only decides how its body is answered: a full-duplex body
is echoed chunk by chunk (SSE keeps streaming), STREAMED chunks and a BUFFERED
body get plain answers (unchanged), NONE sends none. Bytes are never altered.

Per stream, in order:
1. `request_headers`: read the workload context (a bad one is answered 400 at
   once and never tracked) and apply the operator's workloads table (an id it
   does not allow: 403, never tracked; a criticality above the workload's
   bound: clamped), then *new* (`workload_handle_new_request`). A new
   workload the full registry cannot take is answered 429 `registry-full`, or
   tracked as the shared `overflow` workload. In the buffered modes the headers
   are answered CONTINUE and the one body message read. In full-duplex mode the body is
   read first (until its end, or until it passes `max_body_bytes`), with no
   hold sent: Envoy (1.40, measured end to end) runs no message timeout while
   a full-duplex body arrives -- a body 1 s slow behind a 0.2 s timeout went
   through -- and a hold per request cost ~50 us of processor CPU
   (bench/ablation-pool.md). Then enqueue, with the prompt and the gateway's
   subset hint when picking endpoints. When the queue cannot decide at once,
   a lone `override_message_timeout` goes out, so Envoy's short message
   timeout (meant to catch a hung processor) does not fire while the request
   waits its turn: one hold per stream at most.
2. The queue decides. DISPATCHED -> *dispatched*
   (`workload_handle_dispatched_request` with the queue wait) and, in the
   answer to the message named above for the request's mode, CONTINUE with
   `x-workload-id` and `x-workload-queue-wait-ms` added upstream and, when
   picking, the Endpoint Picker Protocol answer (`epp`). Anything else -> an
   ImmediateResponse from `outcomes` (429/503 with a dropped-reason header:
   queue-full, workload-limit, shed, queue-timeout, shutdown, no-endpoint).
   With neither body sent, when the capacity gate learns from latency (`adaptive`),
   the answer also asks Envoy (`mode_override`) for this response's headers,
   whose arrival is the dispatch-to-first-byte sample.
3. *completed* (`workload_handle_completed_request`), exactly once per tracked
   request: at response headers with end_of_stream, at response trailers, at a
   response body with end_of_stream, or -- in `finally` -- when the stream
   ends or is cancelled for any reason. Per endpoint, `Ticket.close` (in the
   same place) gives the request back to the endpoint it was accounted to,
   which `Ticket.served` moves to the endpoint the data plane reports (read up
   to the response's first message, which is also the first byte). With
   fair-share's `tokens` cost, a response that completes first reports its
   `usage` (read from the response body in any mode that sends it; None
   with NONE).

Await points and cancellation. Envoy resets the stream when the client goes
away or the backend resets, and grpc.aio raises `CancelledError` in this
handler wherever it is suspended; `finally` then completes the request, and
`Ticket.close` evicts it if it was still queued or gives back its slot.
- `_Stream.next` (reading the next message, including the full-duplex body
  read before enqueueing): cancelled, the read is abandoned with the stream.
  The stream ending instead (None) ends the handler.
- `_read_buffered` (the one buffered body message): cancelled or ended, the
  request is counted out never having been enqueued. Should a response message
  come instead (Envoy answered the request itself: 413 for a BUFFERED body over
  its buffer limit), the request is counted out at once, never enqueued, and
  the reply passed on.
- The response body's loop (`_Stream.rest`: grpc's request iterator itself,
  entered after the answered response headers of a dispatched request whose
  response body is full-duplex, with no read in flight): a middle chunk is
  echoed (and read for `usage`) with nothing else done, as the null
  processor does, since nothing else can happen at one; every other message
  is answered as before. Cancelled or ended there, `finally` as everywhere.
- `Ticket.wait` outside full-duplex: the ticket leaves the queue (or, if the queue
  released it in that instant, gives its slot to the next request).
- The full-duplex hold, `asyncio.wait` on the ticket and the next message at
  once: Envoy keeps sending body chunks while the request is held, and the
  handler keeps taking them (buffered for the echo) as long as the buffered
  bytes stay within twice `max_body_bytes`; past that it stops reading, so gRPC
  flow control pushes back on Envoy and the client instead of this process
  buffering without bound (a client going away still arrives as a cancel).
  The bound per held stream is therefore twice `max_body_bytes` buffered here
  plus what gRPC accepts into its flow-control window before pushing back
  (the HTTP/2 stream window, which gRPC's BDP probing grows), not the former
  alone: measured on loopback with `max_body_bytes` 1000, a held stream's
  writer got about 5.4 MB accepted before it was pushed back. A
  stream that ends while held ends the handler. Cancelled there, the hold
  cancels its task on `Ticket.wait` and `finally` cancels the pending read; a
  ticket the queue released in that instant is recorded as client-gone (its
  answer never went out) and `finally` frees its slot.
- `yield` (the buffered modes' early CONTINUE, the hold, the answer, the echo):
  cancelled at one, `finally`
  completes the request.
Nowhere else does this handler await, so no path skips the `finally`. And when
grpc.aio ends the RPC without finalising the generator (a failed write leaves it
suspended at a `yield`), the RPC's done-callback completes the request;
completion is idempotent, so whichever runs second does nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2

from extproc.context import OVERFLOW_WORKLOAD, ContextError, ContextParser, WorkloadContext
from extproc.contracts import Clock, Datastore, PickRequest, RegistryFull
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.log import RequestLog
from extproc.outcomes import (
    Outcome,
    Rejection,
    invalid_request,
    registry_full,
    rejection_for,
    workload_not_allowed,
)
from extproc.pool.body import DEFAULT_MAX_BODY_BYTES, UNKNOWN, BodyBuffer, InferenceRequest
from extproc.pool.usage import UsageReader, estimate
from extproc.service import epp
from extproc.service.metrics import Metrics
from extproc.workloads import Workloads

WORKLOAD_ID_HEADER = "x-workload-id"
QUEUE_WAIT_HEADER = "x-workload-queue-wait-ms"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SEND = processing_mode_pb2.ProcessingMode.SEND
_NO_BODY = processing_mode_pb2.ProcessingMode.NONE
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED = frozenset(
    (
        processing_mode_pb2.ProcessingMode.BUFFERED,
        processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
    )
)

# Answers for the phases this service passes through unchanged (bodies not full-duplex,
# and trailers in any mode).
_PASS_THROUGH = {
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}
# A held request's unanswered body chunks are buffered up to this many times
# --max-body-bytes; past that the handler stops reading until the answer.
_HELD_BUFFER_LIMITS = 2
_REQUEST_HEADERS_CONTINUE = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_HEADER_MUTABLE = frozenset(("request_headers", "request_body"))
"""The answers whose header mutation reaches the request headers."""


class _Exchange:
    """One HTTP request's state, private to its stream."""

    __slots__ = (
        "answer_at",
        "answered",
        "body",
        "completed",
        "duplex",
        "echo",
        "echo_bytes",
        "no_bodies",
        "request_done",
        "responded",
        "response_duplex",
        "response_mode",
        "started",
        "steered",
        "subset",
        "ticket",
        "usage",
        "workload",
    )

    def __init__(self) -> None:
        self.workload: WorkloadContext | None = None
        self.ticket: Ticket | None = None
        self.started = 0.0
        self.completed = False
        self.answered = False
        """The request headers' answer was handed to grpc."""
        self.duplex = False
        """The request body comes full-duplex (read, held, echoed)."""
        self.response_duplex = False
        """The response body comes full-duplex (echoed); Envoy sets each direction's
        mode apart."""
        self.response_mode = _NO_BODY
        """The response body's mode (protocol_config)."""
        self.no_bodies = True
        """Neither body is sent (trailer mode): the only mode a `mode_override` (which
        replaces the whole mode) leaves as it was configured."""
        self.answer_at = "request_headers"
        """The request message whose answer carries the queue's decision: the
        buffered body's (or, with no body message, its trailers') in the buffered
        modes."""
        self.subset: frozenset[str] | None = None
        self.body: BodyBuffer | None = None
        self.echo: list[Any] = []
        """Full-duplex: answers for request body chunks (and trailers) that arrived
        before the request headers were answered, in arrival order."""
        self.echo_bytes = 0
        self.request_done = False
        """The request's last body chunk (or its trailers) has arrived."""
        self.usage: UsageReader | None = None
        """Full-duplex with the `tokens` cost: the response body, read for `usage`."""
        self.responded = False
        """A response message has been observed."""
        self.steered = False
        """The subset came from the conformance suite's selection header."""


class _Stream:
    """The request messages of one stream, with at most one read in flight.

    A read can be started as a task (`pending`) so the handler can wait for it
    and the queue at once; that task is never cancelled while the stream
    lives (cancelling a read of grpc.aio's request iterator would end the
    stream), only carried over to the next `next`.
    """

    __slots__ = ("_iterator", "_pending")

    def __init__(self, messages: AsyncIterator[Any]) -> None:
        self._iterator = messages.__aiter__()
        self._pending: asyncio.Future[Any] | None = None

    async def next(self) -> Any:
        """The next message; None once Envoy has closed its side."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return await pending
        return await self._read()

    async def _read(self) -> Any:
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            return None

    def pending(self) -> asyncio.Future[Any]:
        """The next message's read, started now if not yet started."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
        return self._pending

    def idle(self) -> bool:
        """No read in flight."""
        return self._pending is None

    def rest(self) -> AsyncIterator[Any]:
        """The remaining messages, read straight from grpc (no read may be in flight)."""
        assert self._pending is None
        return self._iterator

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        datastore: Datastore,
        flow: FlowController,
        parser: ContextParser,
        clock: Clock,
        metrics: Metrics,
        *,
        hold_timeout: float,
        overflow_when_full: bool = True,
        workloads: Workloads | None = None,
        pick_endpoints: bool = False,
        conformance_hooks: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        count_tokens: bool = False,
        request_log: RequestLog | None = None,
    ) -> None:
        self._datastore = datastore
        self._workloads = workloads or Workloads(None)
        self._context_headers = parser.headers
        self._overflow_when_full = overflow_when_full
        self._flow = flow
        self._parser = parser
        self._clock = clock
        self._metrics = metrics
        self._pick = pick_endpoints
        self._conformance = pick_endpoints and conformance_hooks
        self._max_body = max_body_bytes
        self._count_tokens = count_tokens
        self._log = request_log or RequestLog()
        # Endpoints learn their slots from first bytes, as the latency-driven gates do.
        self._first_byte = flow.capacity.wants_first_byte or flow.pool is not None
        seconds, fraction = divmod(hold_timeout, 1.0)
        self._hold = pb.ProcessingResponse(
            override_message_timeout=duration_pb2.Duration(
                seconds=int(seconds), nanos=int(fraction * 1e9)
            )
        )

    # One generator, read top to bottom: splitting it would add an async generator
    # layer to every response chunk (the per-chunk cost, bench/README.md).
    async def Process(  # noqa: PLR0912
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        exchange = _Exchange()
        # grpc.aio does not always finalise a generator suspended at a `yield` (a failed
        # write): the RPC's end completes the request too, whichever comes first.
        context.add_done_callback(lambda _: self._complete(exchange))
        stream = _Stream(request_iterator)
        try:
            while (message := await stream.next()) is not None:
                phase = message.WhichOneof("request")
                if phase == "request_headers":
                    response = self._admit(message, exchange)
                    if response is None:
                        if exchange.answer_at != "request_headers":
                            # A buffered body comes only once the headers are answered.
                            yield _REQUEST_HEADERS_CONTINUE
                            awaited = await self._read_buffered(stream, exchange)
                            if awaited is None:
                                return
                            if exchange.answer_at.startswith("response"):
                                # Envoy answered the request itself before its body came
                                # (413: the body passed its buffer limit): nothing to queue.
                                self._complete(exchange)
                                yield self._reply(awaited, exchange.answer_at, exchange)
                                continue
                        elif not await self._read_body(stream, exchange):
                            return
                        response = self._enqueue(exchange)
                    if response is None:
                        yield self._hold
                        if not await self._wait(stream, exchange):
                            return
                        response = self._answer(exchange)
                    exchange.answered = True
                    yield response
                    for echoed in _take_echo(exchange):
                        yield echoed
                    continue
                answer = self._after_headers(message, exchange)
                if answer is not None:
                    yield answer
                if phase == "response_headers" and _relays(exchange, stream):
                    # The response body, dispatched and under way: the null processor's
                    # loop, with only the usage read added for a middle chunk. Anything
                    # else is answered as above.
                    usage = exchange.usage
                    async for message in stream.rest():
                        # (a message is never falsy)
                        answer = _middle_chunk(message, usage) or self._after_headers(
                            message, exchange
                        )
                        if answer is not None:
                            yield answer
                    return
        finally:
            stream.close()
            self._complete(exchange)

    def _after_headers(self, message: Any, exchange: _Exchange) -> Any:
        """The answer to a message once the request headers were answered; None for none."""
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            return _REQUEST_HEADERS_CONTINUE  # a second one: passed on, never counted twice
        if not phase:
            return None
        self._observe(message, phase, exchange)
        return self._reply(message, phase, exchange)

    def _reply(self, message: Any, phase: str, exchange: _Exchange) -> Any:
        """The answer to a message after the decision's: passed on, or with the hooks on,
        the response headers' with the conformance suite's served report."""
        if self._conformance and phase == "response_headers":
            return epp.served_report(message)
        return _pass_on(message, phase, exchange)

    def _observe(self, message: Any, phase: str, exchange: _Exchange) -> None:
        """Bookkeeping for a message after the request headers: served endpoint,
        first byte, completion.

        The served endpoint and the first byte are read up to the response's first
        message only: by then the data plane has chosen the endpoint (and reports it
        there), and that message is the first byte."""
        ticket = exchange.ticket
        if ticket is None:
            return
        if self._pick and not exchange.responded:
            served = epp.served_endpoint(message)
            if served is not None:
                ticket.served(served)
        if phase.startswith("response"):
            if not exchange.responded:
                exchange.responded = True
                if self._first_byte and _from_backend(message):
                    ticket.first_byte()
            if exchange.usage is not None and phase == "response_body":
                exchange.usage.add(message.response_body.body)
            if _ends_response(message, phase):
                if self._count_tokens:
                    usage = exchange.usage.usage() if exchange.usage else None
                    self._metrics.count_usage(usage)
                    ticket.usage(usage)
                self._complete(exchange)

    def _admit(self, message: Any, exchange: _Exchange) -> Any:
        """Track the request; an answer when it ends here, None to go on."""
        if exchange.workload is not None:
            # A second request_headers on one stream is a protocol error; pass it on
            # rather than count one HTTP request twice.
            return _REQUEST_HEADERS_CONTINUE
        headers = message.request_headers
        modes = message.protocol_config
        exchange.duplex = modes.request_body_mode == _FULL_DUPLEX
        exchange.response_mode = modes.response_body_mode
        exchange.response_duplex = modes.response_body_mode == _FULL_DUPLEX
        exchange.no_bodies = modes.request_body_mode == modes.response_body_mode == _NO_BODY
        try:
            workload = self._parser.parse(_context_headers(headers.headers, self._context_headers))
        except ContextError as error:
            self._log(outcome="invalid-workload-context", error=str(error))
            self._metrics.record("invalid-workload-context", None, rejected=True)
            return _immediate(invalid_request(error.header, error.detail))
        admission = self._workloads.admit(workload)
        if not admission.allowed:
            self._log(workload=workload.workload_id, outcome="not-allowed")
            self._metrics.record("not-allowed", None, rejected=True)
            return _immediate(workload_not_allowed(workload.workload_id))
        if admission.clamped:
            self._metrics.clamped.inc()
        workload = admission.context
        exchange.started = self._clock.now()
        try:
            self._datastore.workload_handle_new_request(workload.workload_id)
        except RegistryFull:
            if not self._overflow_when_full:
                self._log(workload=workload.workload_id, outcome="registry-full")
                self._metrics.record("registry-full", None, rejected=True)
                return _immediate(registry_full())
            workload = WorkloadContext(OVERFLOW_WORKLOAD, workload.criticality)
            self._datastore.workload_handle_new_request(OVERFLOW_WORKLOAD)
        exchange.workload = workload
        if self._pick:
            exchange.subset = epp.subset_hint(message)
            if self._conformance and (selection := epp.test_selection(message)) is not None:
                exchange.subset, exchange.steered = selection, True
        # Trailer mode reads no body: nothing to wait for before enqueueing.
        exchange.request_done = not exchange.duplex or bool(headers.end_of_stream)
        if modes.request_body_mode in _BUFFERED and not headers.end_of_stream:
            exchange.answer_at = "request_body"
        if exchange.duplex or exchange.answer_at != "request_headers":
            exchange.body = BodyBuffer(self._max_body)
        return None

    async def _read_body(self, stream: _Stream, exchange: _Exchange) -> bool:
        """Full-duplex: take body chunks until the body ends or passes the limit.

        False when the stream ended first."""
        while not exchange.request_done and self._may_read(exchange, 1):
            message = await stream.next()
            if message is None:
                return False
            self._take(message, exchange)
        return True

    async def _read_buffered(self, stream: _Stream, exchange: _Exchange) -> Any:
        """Buffered modes: take the body, one message, which Envoy sends once the headers
        are answered and holds until its own answer. The message; None when the stream
        ended first."""
        message = await stream.next()
        if message is None:
            return None
        phase = message.WhichOneof("request")
        if phase == "request_body" and exchange.body is not None:
            exchange.body.add(message.request_body.body)
        # Should anything but the body come (trailers, no body message), its answer
        # carries the decision instead; a response message means Envoy ended the request.
        exchange.answer_at = phase or "request_body"
        return message

    def _may_read(self, exchange: _Exchange, limits: int) -> bool:
        return exchange.echo_bytes <= limits * self._max_body

    def _take(self, message: Any, exchange: _Exchange) -> None:
        """Full-duplex, before the answer: keep a request body chunk (or trailers) for
        the echo, and read the chunk as part of the body."""
        phase = message.WhichOneof("request")
        if phase == "request_body":
            chunk = message.request_body
            exchange.echo.append(_streamed(phase, chunk))
            exchange.echo_bytes += len(chunk.body)
            if exchange.body is not None:
                exchange.body.add(chunk.body)
            exchange.request_done = bool(chunk.end_of_stream or chunk.end_of_stream_without_message)
        elif phase == "request_trailers":
            exchange.echo.append(_PASS_THROUGH[phase])
            exchange.request_done = True
        # Nothing else can precede the answer; anything that does is ignored.

    def _enqueue(self, exchange: _Exchange) -> Any:
        """Enqueue; the answer when decided at once, None to hold."""
        workload = exchange.workload
        assert workload is not None
        request = exchange.body.read() if exchange.body is not None else UNKNOWN
        # The body is read once; keep no copy of it beyond the echo.
        exchange.body = None
        exchange.ticket = self._flow.enqueue(
            FlowRequest(
                workload.workload_id,
                workload.criticality,
                pick=self._pick_request(request, exchange),
                tokens=estimate(request) if self._count_tokens else None,
            )
        )
        if self._count_tokens and exchange.response_mode != _NO_BODY:
            exchange.usage = UsageReader(self._max_body)
        return None if exchange.ticket.outcome is None else self._answer(exchange)

    def _pick_request(self, request: InferenceRequest, exchange: _Exchange) -> PickRequest | None:
        if not self._pick:
            return None
        return PickRequest(prompt=request.prompt, subset=exchange.subset)

    async def _wait(self, stream: _Stream, exchange: _Exchange) -> bool:
        """Hold until the queue decides; False when the stream ended first."""
        ticket = exchange.ticket
        assert ticket is not None
        if not exchange.duplex:
            # Nothing will arrive before the answer: Envoy resetting the stream is the
            # only other event, and it arrives as a cancel.
            await ticket.wait()
            return True
        waiting = asyncio.ensure_future(ticket.wait())
        try:
            while not waiting.done():
                if not self._may_read(exchange, _HELD_BUFFER_LIMITS):
                    await waiting
                    break
                read = stream.pending()
                await asyncio.wait((waiting, read), return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    message = await stream.next()
                    if message is None:
                        return False
                    self._take(message, exchange)
            return True
        finally:
            waiting.cancel()

    def _answer(self, exchange: _Exchange) -> Any:
        ticket, workload = exchange.ticket, exchange.workload
        assert ticket is not None
        assert workload is not None
        if ticket.outcome is Outcome.DISPATCHED:
            self._datastore.workload_handle_dispatched_request(
                workload.workload_id, ticket.wait_time
            )
            return _dispatched(
                exchange.answer_at,
                workload.workload_id,
                ticket.wait_time,
                self._first_byte and exchange.no_bodies,
                ticket.endpoints,
            )
        assert ticket.outcome is not None
        self._complete(exchange)
        rejection = rejection_for(ticket.outcome, detail=ticket.detail)
        if exchange.steered and ticket.outcome is Outcome.REJECTED_NO_ENDPOINT:
            # Upstream answers a pick its filters left empty 429 (resource exhausted),
            # and the conformance suite expects that for a selection matching nothing.
            rejection = dataclasses.replace(rejection, status=429)
        return _immediate(rejection)

    def _complete(self, exchange: _Exchange) -> None:
        workload, ticket = exchange.workload, exchange.ticket
        if workload is None or exchange.completed:
            return
        exchange.completed = True
        exchange.echo.clear()
        try:
            if ticket is not None:
                ticket.close()
        finally:  # a policy error in close must not leak the registry's count
            self._datastore.workload_handle_completed_request(workload.workload_id)
        outcome = ticket.outcome if ticket and ticket.outcome else Outcome.EVICTED_CLIENT_GONE
        if outcome is Outcome.DISPATCHED and not exchange.answered:
            # Released in the instant the stream ended: nothing was forwarded.
            outcome = Outcome.EVICTED_CLIENT_GONE
        wait = ticket.wait_time if ticket else 0.0
        rejected = outcome not in (Outcome.DISPATCHED, Outcome.EVICTED_CLIENT_GONE)
        self._metrics.record(outcome.value, wait, rejected)
        self._log(
            workload=workload.workload_id,
            criticality=workload.criticality,
            outcome=outcome.value,
            queue_wait_ms=round(wait * 1000, 3),
            duration_ms=round((self._clock.now() - exchange.started) * 1000, 3),
        )


def _take_echo(exchange: _Exchange) -> list[Any]:
    """Full-duplex: the body chunks held back until the answer, if it let the request go."""
    echo, exchange.echo = exchange.echo, []
    ticket = exchange.ticket
    return echo if ticket is not None and ticket.outcome is Outcome.DISPATCHED else []


def _context_headers(header_map: Any, wanted: frozenset[str]) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for header in header_map.headers:
        if header.key in wanted:
            found.setdefault(header.key, []).append(header.raw_value or header.value.encode())
    return found


def _from_backend(message: Any) -> bool:
    """False for Envoy's own replies (connect failure, upstream timeout): their latency
    says nothing about the backend. Envoy says which through the `response.code_details`
    attribute (envoy/envoy.yaml asks for it); without it, assume the backend."""
    for attributes in message.attributes.values():
        details = attributes.fields.get("response.code_details")
        if details is not None:
            return bool(details.string_value == "via_upstream")
    return True


def _pass_on(message: Any, phase: str, exchange: _Exchange) -> Any:
    """The answer to a message after the request headers': a body chunk handed back
    when its direction is full-duplex (each direction has its own mode), else the
    plain answer."""
    if (phase == "request_body" and exchange.duplex) or (
        phase == "response_body" and exchange.response_duplex
    ):
        return _streamed(phase, getattr(message, phase))
    return _PASS_THROUGH[phase]


def _relays(exchange: _Exchange, stream: _Stream) -> bool:
    """After the response headers: whether the response body may take the tight loop
    (dispatched, still under way, its body full-duplex, no read in flight)."""
    return (
        exchange.response_duplex
        and exchange.ticket is not None
        and not exchange.completed
        and stream.idle()
    )


def _ends_response(message: Any, phase: str) -> bool:
    if phase == "response_trailers":
        return True
    if phase in ("response_headers", "response_body"):
        return bool(getattr(message, phase).end_of_stream)
    return False


def _dispatched(
    phase: str, workload_id: str, wait_time: float, first_byte: bool, endpoints: tuple[str, ...]
) -> Any:
    """The answer that lets the request go, to the `phase` message: request headers,
    or a buffered body (whose header mutations Envoy applies to the request headers
    it still holds). Trailers carry no request header mutation: metadata alone."""
    # Filling one message through add() is 4x cheaper than building the nested
    # messages and passing them in (measured: 2.4 us against 9.4 us).
    response = pb.ProcessingResponse()
    answer = getattr(response, phase)
    if phase not in _HEADER_MUTABLE:
        answer.SetInParent()
        if endpoints:
            epp.destination_metadata(response, ",".join(endpoints))
        return response
    headers = answer.response.header_mutation.set_headers
    _set(headers.add(), WORKLOAD_ID_HEADER, workload_id)
    _set(headers.add(), QUEUE_WAIT_HEADER, f"{wait_time * 1000:.3f}")
    if endpoints:
        destination = ",".join(endpoints)
        _set(headers.add(), epp.DESTINATION_HEADER, destination)
        epp.destination_metadata(response, destination)
    if first_byte:
        # The override replaces the whole mode: keep the trailers that mark completion.
        response.mode_override.response_header_mode = _SEND
        response.mode_override.response_trailer_mode = _SEND
    return response


def _streamed(phase: str, chunk: Any) -> Any:
    """Full-duplex: hand a body chunk back to Envoy unchanged."""
    response = pb.ProcessingResponse()
    streamed = getattr(response, phase).response.body_mutation.streamed_response
    streamed.body = chunk.body
    streamed.end_of_stream = chunk.end_of_stream
    streamed.end_of_stream_without_message = chunk.end_of_stream_without_message
    return response


def _middle_chunk(message: Any, usage: UsageReader | None) -> Any:
    """The echo of a response body chunk that ends nothing (read for usage on the way);
    None for any other message."""
    if message.WhichOneof("request") != "response_body":
        return None
    chunk = message.response_body
    if chunk.end_of_stream or chunk.end_of_stream_without_message:
        return None
    if usage is not None:
        usage.add(chunk.body)
    response = pb.ProcessingResponse()
    response.response_body.response.body_mutation.streamed_response.body = chunk.body
    return response


def _set(option: Any, key: str, value: str) -> None:
    option.header.key = key
    option.header.raw_value = value.encode()
    option.append_action = _OVERWRITE


def _immediate(rejection: Rejection) -> Any:
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = rejection.status
    for key, value in rejection.headers():
        _set(immediate.headers.set_headers.add(), key, value)
    immediate.body = rejection.body
    immediate.details = f"workload_extproc_{rejection.reason.replace('-', '_')}"
    return response
