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
