"""The operator's workload table: validation, what it makes of a request, reloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.context import WorkloadContext
from extproc.flowcontrol.admission import WorkloadLimits
from extproc.workloads import Workloads, WorkloadsFileError, WorkloadTable

TABLE = """\
default: {max_criticality: 3, max_queued: 5}
team-a: {weight: 4, max_in_flight: 2, criticality: 4}
batch: {criticality: 1, max_criticality: 2}
"""


def table(tmp_path: Path, text: str = TABLE) -> Path:
    path = tmp_path / "workloads.yaml"
    path.write_text(text)
    return path


def claim(workload: str, criticality: int) -> WorkloadContext:
    return WorkloadContext(workload, criticality, claimed=True)


def test_entries_and_default(tmp_path: Path) -> None:
    workloads = Workloads(table(tmp_path))
    assert workloads.limits("team-a") == WorkloadLimits(4.0, 2, None)
    assert workloads.limits("someone") == WorkloadLimits(None, None, 5)
    assert workloads.weight("team-a") == 4.0
    assert workloads.weight("someone") is None


@pytest.mark.parametrize(
    ("context", "criticality", "clamped"),
    [
        (claim("someone", 5), 3, True),
        (claim("someone", 2), 2, False),
        (WorkloadContext("someone"), 3, False),  # nothing claimed: the default
        (WorkloadContext("team-a"), 4, False),  # nothing claimed: team-a's own default
        (claim("team-a", 5), 5, False),  # listed: default's bound does not apply
        (WorkloadContext("batch"), 1, False),
        (claim("batch", 5), 2, True),
    ],
)
def test_criticality_defaults_and_clamps(
    tmp_path: Path, context: WorkloadContext, criticality: int, clamped: bool
) -> None:
    admission = Workloads(table(tmp_path)).admit(context)
    assert admission.allowed
    assert (admission.context.criticality, admission.clamped) == (criticality, clamped)


def test_allow_false_on_default_serves_only_listed_ids(tmp_path: Path) -> None:
    workloads = Workloads(table(tmp_path, "default: {allow: false}\nteam-a: {}\n"))
    assert workloads.admit(WorkloadContext("team-a")).allowed
    assert not workloads.admit(WorkloadContext("stranger")).allowed


def test_no_table_limits_nothing() -> None:
    workloads = Workloads(None)
    assert workloads.limits("x") == WorkloadLimits()
    assert workloads.admit(claim("x", 5)).context.criticality == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("team-a: {weight: 0}", "team-a.weight: Input should be greater than or equal to 0.001"),
        ("team-a: {wieght: 2}", "team-a.wieght: Extra inputs are not permitted"),
        ("team-a: {max_criticality: 7}", "team-a.max_criticality"),
        ("team-a: {criticality: 4, max_criticality: 2}", "criticality 4 is above max_criticality"),
        ("team-a: {max_in_flight: 0}", "team-a.max_in_flight"),
        ("- a\n- b\n", "expected a mapping"),
        ("team-a: [1\n", "while parsing"),
        ('"bad\\u0000id": {}', "control characters"),
    ],
)
def test_bad_files_are_refused_with_the_entry_named(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(WorkloadsFileError, match=r"workloads\.yaml") as error:
        WorkloadTable.read(table(tmp_path, text))
    assert message in str(error.value)


def test_reload_takes_good_edits_and_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = table(tmp_path)
    workloads = Workloads(path)
    changes: list[int] = []
    workloads.on_change(lambda: changes.append(1))
    assert not workloads.reload_if_changed()  # unchanged
    path.write_text("team-a: {weight: 9}\n")
    assert workloads.reload_if_changed()
    assert workloads.weight("team-a") == 9.0
    path.write_text("team-a: {weight: -1}\n")
    assert not workloads.reload_if_changed()
    assert (workloads.errors, workloads.weight("team-a")) == (1, 9.0)
    assert not workloads.reload_if_changed()  # the same bad bytes are not counted twice
    assert workloads.errors == 1
    path.write_text("team-a: {weight: 2}\n")  # same size as the good edit before
    assert workloads.reload_if_changed()
    assert (workloads.weight("team-a"), workloads.reloads, len(changes)) == (2.0, 2, 2)
