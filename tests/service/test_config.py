"""Settings from a YAML file: precedence, `config show`, `config check` naming key and line."""

from pathlib import Path

import pytest
import yaml

from extproc.cli import main
from extproc.config import ConfigFile, load_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "extproc.yaml"
    path.write_text(text)
    return path


def test_flags_beat_env_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ConfigFile.read(
        write(tmp_path, "max-queue: 50\npolicy: fair-share\nqueue_timeout: 12\n")
    )
    monkeypatch.setenv("EXTPROC_MAX_QUEUE", "70")
    settings = load_settings({"policy": "fcfs"}, config)
    assert settings.policy == "fcfs"  # flag over file
    assert settings.max_queue == 70  # env over file
    assert settings.queue_timeout == 12  # file over default
    assert settings.max_concurrency == 0  # default


def test_config_show_prints_the_effective_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "max-concurrency: 8\nadmin-token: a-very-secret-token-value\n")
    assert main(["config", "show", "--config", str(path), "--max-queue", "9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["max-concurrency"], shown["max-queue"]) == (8, 9)
    assert shown["admin-token"] == "***"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policy: fcfs\n\nmax-queue: -3\n", "line 3: max-queue: Input should be greater than"),
        ("policy: fcfs\nmax-qeue: 3\n", "line 2: unknown setting 'max-qeue'"),
        ("policy: lottery\n", "line 1: policy: unknown policy 'lottery'"),
        ("- a list\n", "expected a mapping of settings"),
        ("policy: [unclosed\n", "while parsing"),
    ],
)
def test_config_check_names_the_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    assert main(["config", "check", str(write(tmp_path, text))]) == 2
    assert expected in capsys.readouterr().err


def test_serve_refuses_a_bad_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(write(tmp_path, "max-queue: -3\n"))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "extproc.yaml line 1" in lines[0]


def test_the_shipped_config_file_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(ROOT / "deploy" / "extproc.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
