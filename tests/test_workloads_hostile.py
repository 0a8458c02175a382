"""The workloads file against hostile YAML (issue 23 cases 5 and 7): ids stay exactly as
written, duplicates and unusable files are refused with the line named, and one bad edit
never stops the reloading."""

from pathlib import Path

import pytest

from extproc.context import WorkloadContext
from extproc.workloads import Workloads, WorkloadsFileError, WorkloadTable


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workloads.yaml"
    path.write_text(text)
    return path


def test_ids_are_kept_exactly_as_written(tmp_path: Path) -> None:
    """YAML 1.1 read `0042`, `12:30`, `on`, `no` as 34, 750, True, False."""
    text = "default: {allow: false}\n0042: {}\n12:30: {weight: 2}\non: {}\nno: {}\nnull: {}\n"
    table = WorkloadTable.read(write(tmp_path, text))
    assert set(table.entries) == {"default", "0042", "12:30", "on", "no", "null"}
    for workload_id in ("0042", "on", "no", "null"):
        assert table.admit(WorkloadContext(workload_id)).allowed
    assert not table.admit(WorkloadContext("34")).allowed
    assert table.spec("12:30").weight == 2.0


def test_values_keep_their_yaml_meaning(tmp_path: Path) -> None:
    table = WorkloadTable.read(write(tmp_path, "team-a: {allow: no, weight: 1.5e0}\n"))
    assert table.spec("team-a").allow is False
    assert table.spec("team-a").weight == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("team-a: {}\nteam-b: {}\nteam-a: {weight: 2}\n", "line 3: duplicate key 'team-a'"),
        ("team-a: {weight: 1, weight: 2}\n", "line 1: duplicate key 'weight'"),
        ("? [a, b]\n: {}\n", "line 1: a key must be a plain string"),
        ("team-a: {weight: .nan}\n", "team-a.weight"),
        ("team-a: {weight: .inf}\n", "team-a.weight"),
        ("team-a: {weight: 1e-9}\n", "team-a.weight"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
        ("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 3000)), "nest"),
    ],
)
def test_unusable_files_are_refused_naming_the_key_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(WorkloadsFileError, match=r"workloads\.yaml") as error:
        WorkloadTable.read(write(tmp_path, text))
    assert message in str(error.value)


def test_one_bad_edit_never_stops_the_reloading(tmp_path: Path) -> None:
    """Issue 23 case 7: a deeply nested file raised RecursionError and killed the task."""
    path = write(tmp_path, "team-a: {weight: 1}\n")
    workloads = Workloads(path)
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert not workloads.reload_if_changed()
    assert (workloads.errors, workloads.weight("team-a")) == (1, 1.0)
    path.write_text("team-a: {weight: 3}\n")
    assert workloads.reload_if_changed()
    assert workloads.weight("team-a") == 3.0


def test_a_listener_that_raises_does_not_stop_the_reloading(tmp_path: Path) -> None:
    path = write(tmp_path, "team-a: {weight: 1}\n")
    workloads = Workloads(path)
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("listener")

    workloads.on_change(broken)
    path.write_text("team-a: {weight: 2}\n")
    workloads.reload_if_changed()
    path.write_text("team-a: {weight: 4}\n")
    workloads.reload_if_changed()
    assert (workloads.weight("team-a"), len(calls)) == (4.0, 2)
