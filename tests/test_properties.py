"""Property tests (hypothesis) on every parser and hook that takes outside input (issue 23).

Each example drives the real parsers, flow controller, fair-share policy and endpoint pool
on the virtual clock, and checks the invariants after every step: every count back to
zero at the end, slots whole (never more taken than the gate allows, never negative),
virtual time and counters finite, and backlogged workloads' counters within the module's
stated bound (2U, U the largest single charge; a check of the counters, not of the
service each workload got -- the fallback's unit mixing has its own deterministic test
in tests/flowcontrol). Whatever a parser refuses, it refuses
with a named error, never another exception."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.capacity.saturation import MetricsError, SaturationOptions, parse_reading
from extproc.clock import VirtualClock
from extproc.config import Settings, describe_error, load_settings
from extproc.context import ContextError, ContextParser, WorkloadContext
from extproc.contracts import MAX_TOKENS, PickRequest
from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket
from extproc.outcomes import Outcome, rejection_for
from extproc.pool.body import parse
from extproc.pool.pool import EndpointPool
from extproc.pool.usage import UsageReader, estimate
from extproc.service import epp
from extproc.workloads import Workloads, WorkloadsFileError, WorkloadTable
from tests.pool.support import make_pool
from tests.service.test_epp import with_subset
from tests.support.extproc_client import workload_headers

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
WORKLOADS = ["a", "b", "c"]
ENDPOINTS = ["10.0.0.1:8000", "10.0.0.2:8000"]

huge = st.sampled_from([10**400, 10**300, 2**64, 2**53 + 1, MAX_TOKENS + 1, -1, 0])
number = st.one_of(st.integers(), huge, st.floats(allow_nan=True, allow_infinity=True))
json_value = st.one_of(st.none(), st.booleans(), number, st.text(max_size=20))


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """Mostly OpenAI-shaped JSON with hostile numbers; sometimes any bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=100))
    document: dict[str, Any] = {}
    for key in ("prompt", "max_tokens", "max_completion_tokens", "messages", "stream"):
        if draw(st.booleans()):
            document[key] = draw(json_value)
    if draw(st.booleans()):
        document["messages"] = [{"role": "user", "content": draw(st.text(max_size=50))}]
    if draw(st.booleans()):
        document["max_tokens"] = draw(huge)
    return json.dumps(document).encode()


@st.composite
def usage_streams(draw: st.DrawFn) -> list[bytes]:
    """A response body in chunks: JSON or SSE events, usage numbers of any size."""
    usage = {
        "prompt_tokens": draw(st.one_of(number, huge)),
        "completion_tokens": draw(st.one_of(number, huge)),
    }
    if draw(st.booleans()):
        body = json.dumps({"usage": usage}).encode()
    else:
        events = [b'data: {"choices": []}\n\n'] * draw(st.integers(0, 3))
        body = b"".join([*events, b"data: " + json.dumps({"usage": usage}).encode(), b"\n\n"])
        body += b"data: [DONE]\n\n"
    if draw(st.integers(0, 5)) == 0:
        body = draw(st.binary(max_size=80))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    return [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]


class Run:
    """One example's controller, with the invariants checked after every step."""

    def __init__(self, cost: str, pooled: bool, usage_limit: int) -> None:
        self.clock = VirtualClock()
        self.policy = FairSharePolicy(cost, fallback_after=3)  # type: ignore[arg-type]
        self.pool: EndpointPool | None = (
            make_pool(self.clock, ENDPOINTS, max_in_flight=1) if pooled else None
        )
        self.flow = FlowController(
            self.policy,
            self.clock,
            max_concurrency=2,
            max_queue=4,
            queue_timeout=5.0,
            pool=self.pool,
        )
        self.tickets: list[Ticket] = []
        self.usage_limit = usage_limit

    def enqueue(self, workload: str, criticality: int, body: bytes, subset: Any) -> Ticket:
        request = parse(body)
        tokens = estimate(request)
        if tokens is not None:
            assert 0 <= tokens.input <= MAX_TOKENS
            assert 0 <= tokens.output <= MAX_TOKENS
        pick = PickRequest(request.prompt, subset) if self.pool is not None else None
        ticket = self.flow.enqueue(FlowRequest(workload, criticality, pick, tokens))
        self.tickets.append(ticket)
        if ticket.outcome not in (None, Outcome.DISPATCHED):
            rejection_for(ticket.outcome, detail=ticket.detail)  # every outcome has an answer
        return ticket

    def complete(self, index: int, chunks: list[bytes], first_byte: bool) -> None:
        held = [t for t in self.tickets if t.outcome is Outcome.DISPATCHED]
        if not held:
            return
        ticket = held[index % len(held)]
        if first_byte:
            ticket.first_byte()
        reader = UsageReader(self.usage_limit)
        for chunk in chunks:
            reader.add(chunk)
        usage = reader.usage()
        if usage is not None:
            assert 0 <= usage.input <= MAX_TOKENS
            assert 0 <= usage.output <= MAX_TOKENS
        ticket.usage(usage)
        ticket.close()
        self.tickets.remove(ticket)

    def check(self) -> None:
        flow, policy = self.flow, self.policy
        holding = sum(t.outcome is Outcome.DISPATCHED for t in self.tickets)
        assert flow.in_flight == holding <= 2
        assert flow.queued == sum(t.outcome is None for t in self.tickets)
        assert math.isfinite(policy._virtual_time)
        assert all(math.isfinite(c) for c in policy._counters.values())
        if self.pool is not None:
            in_flight = sum(e.in_flight for e in self.pool.status().endpoints)
            assert in_flight == holding

    def finish(self) -> None:
        for ticket in self.tickets:
            ticket.close()
        self.clock.advance(60)
        assert (self.flow.in_flight, self.flow.queued) == (0, 0)
        assert not self.policy._in_flight
        assert not self.policy._queued
        assert not self.policy._charged
        if self.pool is not None:
            assert all(e.in_flight == 0 for e in self.pool.status().endpoints)


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("enqueue"),
            st.sampled_from(WORKLOADS),
            st.integers(1, 5),
            request_bodies(),
            st.one_of(st.none(), st.frozensets(st.sampled_from([*ENDPOINTS, "1.2.3.4:1"]))),
        ),
        st.tuples(st.just("complete"), st.integers(0, 9), usage_streams(), st.booleans()),
        st.tuples(st.just("advance"), st.floats(0, 10)),
    ),
    max_size=30,
)


@FAST
@given(
    cost=st.sampled_from(["requests", "occupancy", "tokens"]),
    pooled=st.booleans(),
    usage_limit=st.sampled_from([16, 4096]),
    script=steps,
)
def test_any_bodies_and_usage_keep_every_count_and_counter_whole(
    cost: str, pooled: bool, usage_limit: int, script: list[tuple[Any, ...]]
) -> None:
    run = Run(cost, pooled, usage_limit)
    for step in script:
        if step[0] == "enqueue":
            run.enqueue(*step[1:])
        elif step[0] == "complete":
            run.complete(*step[1:])
        else:
            run.clock.advance(step[1])
        run.check()
    run.finish()


@FAST
@given(
    weights=st.lists(st.sampled_from([1e-3, 0.5, 1.0, 5.0, 1e3]), min_size=2, max_size=3),
    sizes=st.lists(
        st.tuples(request_bodies(), usage_streams(), st.floats(0, 5)), min_size=1, max_size=40
    ),
)
def test_backlogged_workloads_stay_within_the_stated_bound(
    weights: list[float], sizes: list[tuple[bytes, list[bytes], float]]
) -> None:
    """fair_share's guarantee: while backlogged, counters differ by at most 2U, U the
    largest single charge (each charge measured here as its counter's move, estimate plus
    correction, one request at a time), whatever the bodies, usage and service times."""
    named = {f"w{i}": w for i, w in enumerate(weights)}
    clock = VirtualClock()
    policy = FairSharePolicy("tokens", workload_weight=named.get, fallback_after=3)
    flow = FlowController(policy, clock, max_concurrency=1, queue_timeout=None)
    tickets = {name: [] for name in named}  # type: dict[str, list[Ticket]]
    largest = 0.0
    last = {name: policy.counter(name) for name in named}
    """Each workload's counter before its request in flight was charged."""
    for body, chunks, seconds in sizes * 3:
        for name in named:
            while len(tickets[name]) < 2:
                tokens = estimate(parse(body))
                tickets[name].append(flow.enqueue(FlowRequest(name, 3, tokens=tokens)))
        name, ticket = next(
            (n, t) for n, queue in tickets.items() for t in queue if t.outcome is not None
        )
        clock.advance(seconds)
        reader = UsageReader(4096)
        for chunk in chunks:
            reader.add(chunk)
        ticket.usage(reader.usage())
        ticket.close()
        tickets[name].remove(ticket)
        # A completed request's whole charge (estimate plus correction), and the estimate
        # charged to the one just dispatched: each is a single charge.
        largest = max(largest, abs(policy.counter(name) - last[name]))
        last[name] = policy.counter(name)
        largest = max(largest, *(abs(policy.counter(n) - last[n]) for n in named))
        counters = [policy.counter(n) for n in named]
        assert all(math.isfinite(c) for c in counters)
        assert max(counters) - min(counters) <= 2 * largest + 1e-6 * max(1.0, largest)
    for queue in tickets.values():
        for ticket in queue:
            ticket.close()
    assert (flow.in_flight, flow.queued) == (0, 0)


# -- the other surfaces: a value, or a named error -----------------------------------------

yaml_key = st.one_of(
    st.sampled_from(["0042", "12:30", "on", "no", "null", "~", "1e3", "default", "<<"]),
    st.text(max_size=12),
)
yaml_entry = st.dictionaries(
    st.sampled_from(["weight", "criticality", "max_criticality", "max_in_flight", "allow", "x"]),
    json_value,
    max_size=3,
)


@FAST
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.dictionaries(yaml_key, yaml_entry, max_size=4).map(
            lambda d: yaml.safe_dump(d, default_flow_style=True)
        ),
        st.lists(
            st.sampled_from(["a: {}\n", "a: {weight: 1}\n", "[", "{", "- x\n", "&x a: *x\n"])
        ).map("".join),
    )
)
def test_any_workloads_file_gives_a_table_or_a_named_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "workloads.yaml"
    path.write_text(text)
    message = str(path)
    try:
        table = WorkloadTable.read(path)
    except WorkloadsFileError as error:
        message = str(error)
    else:
        assert all(isinstance(key, str) for key in table.entries)
    assert str(path) in message
    workloads = Workloads(None)
    workloads.path = path
    workloads.reload_if_changed()  # never raises, whatever the file holds


FLAGS = [
    "criticality_weights",
    "endpoints",
    "endpoints_dns",
    "max_concurrency",
    "max_queue",
    "queue_timeout",
    "shed_below",
    "scorers",
    "listen",
]


@FAST
@given(
    flag=st.sampled_from(FLAGS),
    value=st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ["nan,1,1,1,1", "inf", "::1:80", "a..b:80", "[::1]:80", "1e400", "-1", "1\n2"]
        ),
    ),
)
def test_any_flag_value_gives_settings_or_one_line(flag: str, value: str) -> None:
    try:
        loaded = load_settings({flag: value}, use_env=False)
    except ValidationError as error:
        line = describe_error(error)
        assert "\n" not in line
        assert f"--{flag.replace('_', '-')}" in line or "invalid settings" in line
    else:
        assert isinstance(loaded, Settings)


@FAST
@given(
    hint=st.one_of(
        st.text(max_size=60),
        st.lists(
            st.one_of(st.sampled_from([*ENDPOINTS, "", " ", "[::1]:1"]), st.text()), max_size=5
        ),
    )
)
def test_any_subset_hint_is_read_and_never_leaks(hint: str | list[str]) -> None:
    subset = epp.subset_hint(with_subset(workload_headers("a"), hint))
    assert subset is None or all(isinstance(item, str) and item for item in subset)
    clock = VirtualClock()
    pool = make_pool(clock, ENDPOINTS, max_in_flight=1)
    flow = FlowController(FairSharePolicy(), clock, pool=pool, queue_timeout=1.0)
    tickets = [flow.enqueue(FlowRequest("a", 3, PickRequest(None, subset))) for _ in range(3)]
    for ticket in tickets:
        if ticket.outcome is Outcome.REJECTED_NO_ENDPOINT:
            assert ticket.detail
        assert ticket.outcome is not Outcome.REJECTED_INTERNAL
        ticket.close()
    clock.advance(2)
    assert (flow.in_flight, flow.queued) == (0, 0)
    assert all(e.in_flight == 0 for e in pool.status().endpoints)


@FAST
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.lists(
            st.tuples(
                st.sampled_from(["vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "x"]),
                st.one_of(
                    st.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "-1", "0", "3"]),
                    st.text(max_size=8),
                ),
            ),
            max_size=4,
        ).map(lambda lines: "".join(f"{name} {value}\n" for name, value in lines)),
    )
)
def test_any_scrape_text_gives_a_reading_in_range_or_a_named_error(text: str) -> None:
    try:
        reading = parse_reading(text, SaturationOptions())
    except MetricsError as error:
        message = str(error)
    else:
        message = "read"
        values = (reading.waiting, reading.kv_cache_usage, reading.running)
        assert all(v is None or (math.isfinite(v) and v >= 0) for v in values)
    assert message


@FAST
@given(
    raw=st.one_of(
        st.binary(max_size=60),
        st.dictionaries(st.sampled_from(["workload_id", "criticality"]), json_value).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_any_workload_context_is_admitted_or_refused_and_never_leaks(raw: bytes) -> None:
    try:
        context = ContextParser("default").parse({"x-workload-context": [raw]})
    except ContextError as error:
        refused: ContextError | None = error
    else:
        refused = None
    if refused is not None:
        assert refused.detail  # refused with the problem named
        return
    assert isinstance(context, WorkloadContext)
    flow = FlowController(FairSharePolicy(), VirtualClock(), max_concurrency=1)
    admitted = Workloads(None).admit(context).context
    ticket = flow.enqueue(FlowRequest(admitted.workload_id, admitted.criticality))
    assert ticket.outcome is Outcome.DISPATCHED
    ticket.close()
    assert (flow.in_flight, flow.queued) == (0, 0)
