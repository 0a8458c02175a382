"""The request log's fast JSON line is the line structlog's chain would write."""

from __future__ import annotations

import io
import json
import re

import pytest
import structlog

from extproc.log import RequestLog, configure_logging

FIELDS = {
    "workload": 'tenant "a" \u00fcn\u00efc\u00f6de\n',
    "criticality": 2,
    "outcome": "dispatched",
    "queue_wait_ms": 0.125,
    "duration_ms": 1.5,
}


def _lines(log_format: str, level: str, write: object) -> list[str]:
    sink = io.StringIO()
    configure_logging(log_format, level)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
    try:
        write()  # type: ignore[operator]
    finally:
        structlog.reset_defaults()
    return sink.getvalue().splitlines()


def test_the_json_line_matches_structlogs_key_for_key() -> None:
    ours = _lines("json", "info", lambda: RequestLog()(**FIELDS))
    theirs = _lines("json", "info", lambda: structlog.get_logger().info("request", **FIELDS))
    assert len(ours) == len(theirs) == 1
    mine, reference = json.loads(ours[0]), json.loads(theirs[0])
    assert list(mine) == list(reference)  # same keys, same order
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", mine.pop("timestamp"))
    reference.pop("timestamp")
    assert mine == reference
    # Byte for byte but the timestamp: same separators, same escaping.
    strip = re.compile(r'"timestamp": "[^"]*"')
    assert strip.sub("", ours[0]) == strip.sub("", theirs[0])


def test_an_unencodable_value_falls_back_to_its_repr_as_structlog_does() -> None:
    lines = _lines("json", "info", lambda: RequestLog()(workload=object.__new__(object)))
    assert json.loads(lines[0])["workload"].startswith("<object object")


@pytest.mark.parametrize("level", ["warning", "error"])
def test_levels_above_info_silence_it(level: str) -> None:
    assert _lines("json", level, lambda: RequestLog()(**FIELDS)) == []


def test_the_console_format_goes_through_structlog() -> None:
    lines = _lines("console", "info", lambda: RequestLog()(**FIELDS))
    assert len(lines) == 1
    assert "request" in lines[0]
    assert "outcome" in lines[0]
    assert "{" not in lines[0]  # not JSON
