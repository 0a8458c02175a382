"""The `extproc` command: settings from flags and env, one-line errors, a real serve process."""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.cli import main
from extproc.config import Settings


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max-queue", "-5"], "--max-queue=-5"),
        (["--queue-timeout", "soon"], "--queue-timeout=soon"),
        (["--policy", "lottery"], "--policy=lottery"),
        (["--listen", "9002"], "--listen=9002"),
        (["--log-format", "xml"], "--log-format=xml"),
        (["--wait-ema-alpha", "1.5"], "--wait-ema-alpha=1.5"),
    ],
)
def test_invalid_flag_stops_with_one_clear_line(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"extproc: invalid setting {named}")


def test_invalid_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXTPROC_MAX_CONCURRENCY", "lots")
    assert main(["serve"]) == 2
    assert "EXTPROC_MAX_CONCURRENCY" in capsys.readouterr().err


def test_flags_beat_environment_beat_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_MAX_QUEUE", "7")
    monkeypatch.setenv("EXTPROC_POLICY", "fcfs")
    settings = Settings(policy="workload-aware")  # what a --policy flag passes
    assert (settings.max_queue, settings.policy, settings.max_concurrency) == (
        7,
        "workload-aware",
        0,
    )


def test_every_setting_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text


async def test_serve_process_answers_health_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "serve",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json",
        stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        event = json.loads(line)
        assert event["event"] == "serving"
        async with grpc.aio.insecure_channel(event["grpc"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_readme_documents_every_flag() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme, name


def test_config_show_prints_the_workloads_table_and_a_bad_one_stops_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "workloads.yaml"
    path.write_text("default: {allow: false}\nteam-a: {weight: 2, max_queued: 9}\n")
    assert main(["config", "show", "--workloads", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "workloads-table:" in shown
    assert "max_queued: 9" in shown
    assert "allow: false" in shown
    path.write_text("team-a: {max_queued: -1}\n")
    assert main(["serve", "--workloads", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("extproc: invalid setting --workloads=")
    assert "team-a.max_queued: Input should be greater than or equal to 0" in error
