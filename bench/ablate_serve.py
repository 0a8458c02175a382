"""`extproc serve` with chosen per-request steps switched off, for bench/ablation.py.

Usage: ablate_serve.py STEPS -- serve arguments...   (STEPS: comma-separated, or "none")

Each step is switched off by replacing the one function that does it, after
import and before the server starts, so the shipped code carries no switches:
  log       the per-request log line
  metrics   Prometheus outcome counters and wait histogram
  registry  the three tracking points in the Workload Registry
  queue     the flow controller (enqueue -> decided at once, no heap, no policy)
  mutation  the header mutation on the dispatched answer (a plain CONTINUE instead)
  handler   the whole stream handler (the null processor's loop inside our server)
  pick      pool mode: the pick (the first endpoint, charged, without scoring)
  gc        Python's cyclic garbage collector (gc.freeze() after start-up, then off)
Per response chunk (bench/chunks.py):
  usage     the tokens cost's read of the response body for `usage` (none found)
  served    the served-endpoint check (the data plane's report never read)
  firstbyte the first-byte check on response messages (never sampled)
  echo      the echo's answer built per chunk (one prebuilt answer, empty body)
  reuse     design B: a middle chunk's echo fills one reused answer instead of a new one
            (renewed every 64 KiB: a protobuf arena keeps every body set into it)
Never used by the service itself; a measuring instrument only.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from null_processor import NullProcessor  # bench/ is this script's directory

from extproc import cli
from extproc.contracts import QueuedRequest
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome
from extproc.pool.pool import EndpointPool
from extproc.pool.usage import UsageReader
from extproc.registry.datastore import RegistryDatastore
from extproc.service import epp
from extproc.service import extproc as handler_module
from extproc.service.metrics import Metrics


def _no_log() -> None:
    original = handler_module.ExternalProcessorService.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._log = lambda **fields: None

    handler_module.ExternalProcessorService.__init__ = init  # type: ignore[method-assign]


def _no_metrics() -> None:
    Metrics.record = lambda self, outcome, queue_wait, rejected: None  # type: ignore[method-assign]


def _no_registry() -> None:
    for name in (
        "workload_handle_new_request",
        "workload_handle_dispatched_request",
        "workload_handle_completed_request",
    ):
        setattr(RegistryDatastore, name, lambda self, *args: None)


def _no_queue() -> None:
    def enqueue(self: FlowController, request: FlowRequest) -> Ticket:
        ticket = Ticket(self, QueuedRequest(request.workload_id, request.criticality, 0.0, 0))
        ticket.outcome = Outcome.DISPATCHED
        return ticket

    FlowController.enqueue = enqueue  # type: ignore[method-assign]


def _no_mutation() -> None:
    plain = handler_module._REQUEST_HEADERS_CONTINUE
    handler_module._dispatched = lambda *args: plain  # type: ignore[assignment]


def _no_handler() -> None:
    handler_module.ExternalProcessorService.Process = NullProcessor.Process  # type: ignore[method-assign]


def _no_pick() -> None:
    def pick(self: EndpointPool, request: Any) -> tuple[str, ...]:
        endpoint = self._ordered[0]
        endpoint.on_dispatch()
        return (endpoint.address,)

    EndpointPool.pick = pick  # type: ignore[method-assign]


def _no_usage() -> None:
    UsageReader.add = lambda self, chunk: None  # type: ignore[method-assign]
    UsageReader.usage = lambda self: None  # type: ignore[method-assign]


def _no_served() -> None:
    epp.served_endpoint = lambda message: None


def _no_first_byte() -> None:
    handler_module._from_backend = lambda message: False


def _no_echo_build() -> None:
    # The request body is still echoed (the backend must see it); the response's
    # chunks come back empty, with their end_of_stream.
    build = handler_module._streamed
    answers = {end: _prebuilt(end) for end in (False, True)}

    def streamed(phase: str, chunk: Any) -> Any:
        if phase == "response_body":
            return answers[chunk.end_of_stream]
        return build(phase, chunk)

    handler_module._streamed = streamed
    middle_chunk = getattr(handler_module, "_middle_chunk", None)
    if middle_chunk is not None:  # the response loop's own echo of a middle chunk

        def prebuilt_middle_chunk(message: Any, usage: Any) -> Any:
            return middle_chunk(message, usage) and answers[False]

        handler_module._middle_chunk = prebuilt_middle_chunk


def _reuse_echo() -> None:
    # Safe only because grpc.aio serialises an answer before the generator resumes.
    state: dict[str, Any] = {"taken": 1 << 20}
    original = handler_module._middle_chunk

    def middle_chunk(message: Any, usage: Any) -> Any:
        if message.WhichOneof("request") != "response_body":
            return None
        chunk = message.response_body
        if chunk.end_of_stream or chunk.end_of_stream_without_message:
            return None
        if usage is not None:
            usage.add(chunk.body)
        body = chunk.body
        if state["taken"] > 65536:
            answer = pb.ProcessingResponse()
            state["answer"] = answer
            state["body"] = answer.response_body.response.body_mutation.streamed_response
            state["taken"] = 0
        state["taken"] += len(body)
        state["body"].body = body
        return state["answer"]

    assert original is not None
    handler_module._middle_chunk = middle_chunk


def _prebuilt(end: bool) -> Any:
    answer = pb.ProcessingResponse()
    answer.response_body.response.body_mutation.streamed_response.end_of_stream = end
    return answer


def _long_switch() -> None:
    # Not a step: the GIL's switch interval 10x longer (50 ms), to test whether
    # grpc-core's threads preempting the handler is what amplifies its cost.
    sys.setswitchinterval(0.05)


def _no_gc() -> None:
    gc.freeze()
    gc.disable()


STEPS: dict[str, Callable[[], None]] = {
    "log": _no_log,
    "metrics": _no_metrics,
    "registry": _no_registry,
    "queue": _no_queue,
    "mutation": _no_mutation,
    "handler": _no_handler,
    "pick": _no_pick,
    "gc": _no_gc,
    "switch": _long_switch,
    "usage": _no_usage,
    "served": _no_served,
    "firstbyte": _no_first_byte,
    "echo": _no_echo_build,
    "reuse": _reuse_echo,
}


def main(argv: list[str]) -> int:
    steps, separator, serve = argv[0], argv[1], argv[2:]
    assert separator == "--", "usage: ablate_serve.py STEPS -- serve arguments"
    for step in filter(None, steps.split(",")):
        if step != "none":
            STEPS[step]()
    return cli.main(["serve", *serve])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
