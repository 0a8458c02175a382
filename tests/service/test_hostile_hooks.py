"""Issue 23 through the real stream handler: a hostile max_tokens or usage never leaks a
slot, and a hook that raises answers that one request 500, by the outcomes module."""

from collections.abc import AsyncIterator
from typing import Any

from extproc.contracts import QueuedRequest
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.outcomes import DROPPED_REASON_HEADER
from extproc.service.app import Service
from tests.conftest import StartService
from tests.support.extproc_client import (
    duplex_headers,
    request_body,
    response_body,
    response_headers,
)
from tests.support.rpc_context import RpcContext

HUGE = b"1" + b"0" * 400


async def exchange(service: Service, workload: str, body: bytes, answer: bytes) -> list[Any]:
    """One full-duplex HTTP request: its body, then the backend's answer."""
    messages = [
        duplex_headers(workload),
        request_body(body, end_of_stream=True),
        response_headers(end_of_stream=False),
        response_body(answer, end_of_stream=True),
    ]

    async def stream() -> AsyncIterator[Any]:
        for message in messages:
            yield message

    return [m async for m in service.ext_proc.Process(stream(), RpcContext())]


def counts_are_back_to_zero(service: Service, *workloads: str) -> None:
    assert (service.flow.in_flight, service.flow.queued) == (0, 0)
    for workload in workloads:
        metrics = service.registry.get_metrics(workload)
        assert metrics is not None
        assert metrics.active_requests == 0


async def test_huge_max_tokens_and_usage_leak_nothing(start_service: StartService) -> None:
    service = await start_service(policy="fair-share", fair_share_cost="tokens", max_concurrency=1)
    body = b'{"prompt": "hi", "max_tokens": ' + HUGE + b"}"
    usage = b'{"usage": {"prompt_tokens": ' + HUGE + b', "completion_tokens": ' + HUGE + b"}}"
    answers = await exchange(service, "hostile", body, usage)
    assert not any(a.HasField("immediate_response") for a in answers)
    counts_are_back_to_zero(service, "hostile")
    answers = await exchange(service, "next", b'{"prompt": "hi"}', b"{}")
    assert not any(a.HasField("immediate_response") for a in answers)
    counts_are_back_to_zero(service, "hostile", "next")


class Broken(FairSharePolicy):
    def on_dispatch(self, item: QueuedRequest) -> None:
        if item.workload_id == "bad":
            raise OverflowError("int too large to convert to float")
        super().on_dispatch(item)


async def test_a_hook_that_raises_answers_500_and_the_service_keeps_serving(
    start_service: StartService,
) -> None:
    service = await start_service(max_concurrency=1)
    service.flow._policy = Broken("requests")
    answers = await exchange(service, "bad", b"{}", b"{}")
    immediate = answers[0].immediate_response
    assert immediate.status.code == 500
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    assert headers[DROPPED_REASON_HEADER] == b"internal-error"
    assert b"policy.on_dispatch raised OverflowError" in immediate.body
    answers = await exchange(service, "good", b"{}", b"{}")
    assert not any(a.HasField("immediate_response") for a in answers)
    counts_are_back_to_zero(service, "bad", "good")
