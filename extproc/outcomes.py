"""How a request leaves the flow-control queue, and the one place that maps it to HTTP."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

DROPPED_REASON_HEADER = "x-workload-dropped-reason"


class Outcome(enum.Enum):
    """Every exit from `FlowController.enqueue_and_wait` is exactly one of these."""

    DISPATCHED = "dispatched"
    REJECTED_QUEUE_FULL = "queue-full"
    REJECTED_WORKLOAD_LIMIT = "workload-limit"
    REJECTED_SHED = "shed"
    EVICTED_QUEUE_TIMEOUT = "queue-timeout"
    EVICTED_CLIENT_GONE = "client-gone"
    REJECTED_SHUTDOWN = "shutdown"
    REJECTED_NO_ENDPOINT = "no-endpoint"
    """Endpoint picking is on and no ready endpoint is allowed for the request."""
    REJECTED_INTERNAL = "internal-error"
    """A policy, admission, capacity or pool hook raised on this request: it was refused
    and everything it took given back (`Ticket.detail` names the hook)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """An HTTP answer that ends the request in Envoy, before any backend sees it."""

    status: int
    reason: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    retry_after: int | None = None

    def headers(self) -> list[tuple[str, str]]:
        headers = [(DROPPED_REASON_HEADER, self.reason), ("content-type", self.content_type)]
        if self.retry_after is not None:
            headers.append(("retry-after", str(self.retry_after)))
        return headers


_FLOW_REJECTIONS = {
    Outcome.REJECTED_QUEUE_FULL: (429, "the queue is full; retry later"),
    Outcome.REJECTED_WORKLOAD_LIMIT: (429, "this workload has all the requests it may queue"),
    Outcome.REJECTED_SHED: (429, "the backend is saturated and this criticality is shed"),
    Outcome.EVICTED_QUEUE_TIMEOUT: (503, "waited too long in the queue for capacity"),
    Outcome.REJECTED_SHUTDOWN: (503, "the flow-control service is shutting down"),
    Outcome.REJECTED_NO_ENDPOINT: (503, "no ready endpoint is eligible for this request"),
    Outcome.REJECTED_INTERNAL: (500, "the flow controller failed on this request"),
    # Nobody is left to read it; defined so every outcome has an answer.
    Outcome.EVICTED_CLIENT_GONE: (499, "the client went away while queued"),
}


def rejection_for(outcome: Outcome, retry_after: int = 1, detail: str = "") -> Rejection:
    """The response for a request the queue did not dispatch."""
    status, text = _FLOW_REJECTIONS[outcome]
    if outcome is Outcome.REJECTED_NO_ENDPOINT:
        # The gateway's answer to a client: JSON, naming what was missing.
        body = {"error": "no_eligible_endpoint", "detail": detail or text}
        return Rejection(
            status=status,
            reason=outcome.value,
            body=json.dumps(body).encode() + b"\n",
            content_type="application/json",
            retry_after=retry_after,
        )
    if detail and outcome is Outcome.REJECTED_INTERNAL:
        text = f"{text} ({detail})"
    return Rejection(
        status=status,
        reason=outcome.value,
        body=f"{outcome.value}: {text}\n".encode(),
        retry_after=retry_after if status in (429, 503) else None,
    )


def registry_full(retry_after: int = 1) -> Rejection:
    """429 for a new workload when the registry tracks all it may (--on-registry-full reject)."""
    return Rejection(
        status=429,
        reason="registry-full",
        body=b"registry-full: too many workloads are tracked; retry later\n",
        retry_after=retry_after,
    )


def workload_not_allowed(workload_id: str) -> Rejection:
    """403 for a workload the operator's table does not serve (`allow: false`)."""
    body = {"error": "workload_not_allowed", "workload_id": workload_id}
    return Rejection(
        status=403,
        reason="not-allowed",
        body=json.dumps(body).encode() + b"\n",
        content_type="application/json",
    )


def invalid_request(header: str, detail: str) -> Rejection:
    """400 for unusable workload headers; the JSON body names the header and the problem."""
    body = {"error": "invalid_workload_context", "header": header, "detail": detail}
    return Rejection(
        status=400,
        reason="invalid-workload-context",
        body=json.dumps(body).encode() + b"\n",
        content_type="application/json",
    )
