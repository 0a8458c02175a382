import pytest

from extproc.context import (
    FAIRNESS_ID_HEADER,
    WORKLOAD_CONTEXT_HEADER,
    ContextError,
    ContextParser,
    WorkloadContext,
)

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
        ({FAIRNESS_ID_HEADER: [b""]}, "must not be empty"),
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
        parse({FAIRNESS_ID_HEADER: [b""]})
    assert caught.value.header == FAIRNESS_ID_HEADER


def test_missing_headers_rejected_when_no_default() -> None:
    with pytest.raises(ContextError, match="missing"):
        parse({}, default=None)


def test_invalid_default_workload_refused() -> None:
    with pytest.raises(ContextError):
        ContextParser("bad\nid")


@pytest.mark.parametrize("reserved", ["overflow", "other", "default"])
@pytest.mark.parametrize("header", [CTX, FAIRNESS_ID_HEADER])
def test_reserved_ids_are_refused(reserved: str, header: str) -> None:
    value = f'{{"workload_id": "{reserved}"}}' if header == CTX else reserved
    with pytest.raises(ContextError, match="is reserved") as error:
        parse({header: [value.encode()]})
    assert error.value.header == header


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
