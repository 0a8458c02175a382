import pytest

from extproc.context import (
    FAIRNESS_ID_HEADER,
    MAX_ID_BYTES,
    WORKLOAD_CONTEXT_HEADER,
    ContextError,
    ContextParser,
    WorkloadContext,
)
from extproc.objectives import OBJECTIVE_HEADER, ObjectiveTable

CTX = WORKLOAD_CONTEXT_HEADER


def parse(headers: dict[str, list[bytes]], default: str | None = "default") -> WorkloadContext:
    return ContextParser(default).parse(headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({CTX: [b'{"workload_id": "team-a", "criticality": 5}']}, WorkloadContext("team-a", 5)),
        ({CTX: [b'{"workload_id": "team-a"}']}, WorkloadContext("team-a", 3)),
        ({CTX: [b'{"workload_id": "a", "criticality": 1, "extra": [1]}']}, WorkloadContext("a", 1)),
        ({CTX: ['{"workload_id": "équipe-β"}'.encode()]}, WorkloadContext("équipe-β", 3)),
        ({CTX: [b'{"workload_id": "' + b"x" * 128 + b'"}']}, WorkloadContext("x" * 128, 3)),
        ({FAIRNESS_ID_HEADER: [b"tenant-7"]}, WorkloadContext("tenant-7", 3)),
        # The workload-context header wins over the fairness id.
        (
            {CTX: [b'{"workload_id": "a", "criticality": 2}'], FAIRNESS_ID_HEADER: [b"b"]},
            WorkloadContext("a", 2),
        ),
        ({}, WorkloadContext("default", 3)),
        ({"x-other": [b"1"]}, WorkloadContext("default", 3)),
    ],
)
def test_valid_headers(headers: dict[str, list[bytes]], expected: WorkloadContext) -> None:
    assert parse(headers) == expected


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({CTX: [b"{not json"]}, "not valid JSON"),
        ({CTX: [b""]}, "not valid JSON"),
        ({CTX: [b"\xff\xfe"]}, "not valid UTF-8"),
        ({CTX: [b'["workload_id"]']}, "must be a JSON object"),
        ({CTX: [b'{"criticality": 3}']}, "workload_id must be a string"),
        ({CTX: [b'{"workload_id": 42}']}, "workload_id must be a string"),
        ({CTX: [b'{"workload_id": ""}']}, "must not be empty"),
        ({CTX: [b'{"workload_id": "' + b"x" * 129 + b'"}']}, "longer than 128 bytes"),
        ({CTX: [('{"workload_id": "' + "é" * 65 + '"}').encode()]}, "longer than 128 bytes"),
        ({CTX: [b'{"workload_id": "a\\nb"}']}, "control characters"),
        ({CTX: [b'{"workload_id": "a\\u0000"}']}, "control characters"),
        ({CTX: [b'{"workload_id": "\\ud800"}']}, "not valid Unicode"),
        ({CTX: [b'{"workload_id": "a", "criticality": 0}']}, "from 1 to 5, got 0"),
        ({CTX: [b'{"workload_id": "a", "criticality": 6}']}, "from 1 to 5, got 6"),
        ({CTX: [b'{"workload_id": "a", "criticality": "5"}']}, "must be an integer"),
        ({CTX: [b'{"workload_id": "a", "criticality": 2.5}']}, "must be an integer"),
        ({CTX: [b'{"workload_id": "a", "criticality": true}']}, "must be an integer"),
        ({CTX: [b'{"workload_id": "a", "criticality": null}']}, "must be an integer"),
        ({CTX: [b'{"workload_id": "a", "criticality": NaN}']}, "must be an integer"),
        ({CTX: [b"[" * 1000 + b"]" * 1000]}, "longer than 1024 bytes"),
        ({CTX: [b"[" * 500 + b"]" * 500]}, "must be a JSON object"),
        ({CTX: [b'{"workload_id": "a"}', b'{"workload_id": "b"}']}, "sent 2 times"),
        ({FAIRNESS_ID_HEADER: [b"a\tb"]}, "control characters"),
        ({FAIRNESS_ID_HEADER: [b"y" * 129]}, "longer than 128 bytes"),
    ],
)
def test_invalid_headers_name_the_problem(headers: dict[str, list[bytes]], problem: str) -> None:
    with pytest.raises(ContextError) as caught:
        parse(headers)
    assert problem in caught.value.detail
    assert caught.value.header in (CTX, FAIRNESS_ID_HEADER)


def test_fairness_header_errors_name_that_header() -> None:
    with pytest.raises(ContextError) as caught:
        parse({FAIRNESS_ID_HEADER: [b"a\x00b"]})
    assert caught.value.header == FAIRNESS_ID_HEADER


@pytest.mark.parametrize("values", [[b""], [b"tenant-a", b"tenant-b"], [b"a", b"a"], [b"", b""]])
@pytest.mark.parametrize(("default", "flow"), [("default", "default"), (None, "default-flow")])
def test_an_empty_or_repeated_fairness_id_is_the_default_flow(
    values: list[bytes], default: str | None, flow: str
) -> None:
    assert parse({FAIRNESS_ID_HEADER: values}, default) == WorkloadContext(flow, 3)


@pytest.mark.parametrize(
    ("sent", "workload"),
    [
        ("overflow", "~overflow"),
        ("other", "~other"),
        ("default", "~default"),
        ("~overflow", "~~overflow"),
        ("~", "~~"),
        ("tenant~1", "tenant~1"),
        ("default-flow", "default-flow"),
    ],
)
def test_a_reserved_fairness_id_is_escaped_one_to_one(sent: str, workload: str) -> None:
    assert parse({FAIRNESS_ID_HEADER: [sent.encode()]}) == WorkloadContext(workload, 3)


def test_default_flow_is_reserved_when_it_is_the_default() -> None:
    escaped = parse({FAIRNESS_ID_HEADER: [b"default-flow"]}, default=None)
    assert escaped == WorkloadContext("~default-flow", 3)


def test_missing_headers_rejected_when_no_default() -> None:
    with pytest.raises(ContextError, match="missing"):
        parse({}, default=None)


def test_invalid_default_workload_refused() -> None:
    with pytest.raises(ContextError):
        ContextParser("bad\nid")


@pytest.mark.parametrize("reserved", ["overflow", "other", "default"])
def test_reserved_ids_are_refused(reserved: str) -> None:
    with pytest.raises(ContextError, match="is reserved") as error:
        parse({CTX: [f'{{"workload_id": "{reserved}"}}'.encode()]})
    assert error.value.header == CTX


def objective_parser(unknown: list[str]) -> ContextParser:
    table = ObjectiveTable(on_unknown=lambda: unknown.append("x"))
    table.replace({"batch": -1, "standard": None, "zero": 0, "chat": 5, "critical": 10})
    return ContextParser(objectives=table)


@pytest.mark.parametrize(
    ("objective", "criticality"),
    [(b"batch", 1), (b"standard", 3), (b"zero", 3), (b"chat", 4), (b"critical", 5)],
)
def test_the_objective_named_decides_the_criticality(objective: bytes, criticality: int) -> None:
    unknown: list[str] = []
    parser = objective_parser(unknown)
    assert OBJECTIVE_HEADER in parser.headers
    for headers in (
        {FAIRNESS_ID_HEADER: [b"t"], OBJECTIVE_HEADER: [objective]},
        {CTX: [b'{"workload_id": "t"}'], OBJECTIVE_HEADER: [objective]},
    ):
        context = parser.parse(headers)
        assert (context.workload_id, context.criticality) == ("t", criticality)
        assert context.claimed
    assert unknown == []


def test_a_claimed_criticality_wins_and_an_unknown_objective_is_default_and_counted() -> None:
    unknown: list[str] = []
    parser = objective_parser(unknown)
    claimed = {CTX: [b'{"workload_id": "t", "criticality": 2}'], OBJECTIVE_HEADER: [b"critical"]}
    assert parser.parse(claimed) == WorkloadContext("t", 2)
    assert parser.parse({OBJECTIVE_HEADER: [b"no-such"]}) == WorkloadContext("default", 3)
    assert not parser.parse({OBJECTIVE_HEADER: [b"no-such"]}).claimed
    assert len(unknown) == 2
    for odd in ([b""], [b"chat", b"batch"], [b"\xff"]):  # no objective named: not counted
        assert parser.parse({OBJECTIVE_HEADER: odd}) == WorkloadContext("default", 3)
    assert len(unknown) == 2
    # Without a table (no --inference-pool) the header is not read.
    assert OBJECTIVE_HEADER not in ContextParser().headers
    assert ContextParser().parse({OBJECTIVE_HEADER: [b"batch"]}) == WorkloadContext("default", 3)


def test_a_renamed_default_workload_is_reserved_and_default_is_free() -> None:
    parser = ContextParser("anonymous")
    assert parser.parse({CTX: [b'{"workload_id": "default"}']}) == WorkloadContext("default")
    with pytest.raises(ContextError, match="reserved"):
        parser.parse({CTX: [b'{"workload_id": "anonymous"}']})


IDENTITY = "x-tenant-id"


def identified(headers: dict[str, list[bytes]], default: str | None = "default") -> WorkloadContext:
    return ContextParser(default, identity_header="X-Tenant-Id").parse(headers)


def test_identity_header_decides_the_workload_and_the_client_only_its_criticality() -> None:
    forged = {CTX: [b'{"workload_id": "tenant-b", "criticality": 5}'], IDENTITY: [b"tenant-a"]}
    context = identified(forged)
    assert (context.workload_id, context.criticality, context.claimed) == ("tenant-a", 5, True)
    fairness = {FAIRNESS_ID_HEADER: [b"tenant-b"], IDENTITY: [b"tenant-a"]}
    assert identified(fairness) == WorkloadContext("tenant-a", 3)
    assert not identified(fairness).claimed
    assert ContextParser(identity_header="X-Tenant-Id").headers >= {IDENTITY, CTX}


def test_identity_header_missing_is_the_default_workload_or_refused() -> None:
    assert identified({CTX: [b'{"criticality": 2}']}) == WorkloadContext("default", 2)
    with pytest.raises(ContextError, match="the gateway did not set x-tenant-id") as error:
        identified({FAIRNESS_ID_HEADER: [b"tenant-b"]}, default=None)
    assert error.value.header == IDENTITY


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({IDENTITY: [b"a", b"b"]}, "sent 2 times"),
        ({IDENTITY: [b"overflow"]}, "reserved"),
        ({IDENTITY: [b""]}, "must not be empty"),
        ({IDENTITY: [b"a"], CTX: [b'{"criticality": 9}']}, "criticality must be from 1 to 5"),
        ({IDENTITY: [b"a"], CTX: [b"[]"]}, "must be a JSON object"),
    ],
)
def test_identity_header_errors(headers: dict[str, list[bytes]], problem: str) -> None:
    with pytest.raises(ContextError, match=problem):
        identified(headers)


def test_an_escaped_fairness_id_must_still_fit_the_id_limit() -> None:
    longest = "~" + "a" * (MAX_ID_BYTES - 1)
    with pytest.raises(ContextError, match=f"longer than {MAX_ID_BYTES} bytes"):
        parse({FAIRNESS_ID_HEADER: [longest.encode()]})
    fits = "~" + "a" * (MAX_ID_BYTES - 2)
    assert parse({FAIRNESS_ID_HEADER: [fits.encode()]}).workload_id == "~" + fits
