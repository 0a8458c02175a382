"""`extproc top`: one frame against a live service."""

import asyncio
import os
import sys

import grpc

from extproc.tools.top import sparkline
from tests.conftest import StartService
from tests.support.extproc_client import running_and_held


def test_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 4, 8]) == "▁▅█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([]) == ""


async def test_once_prints_a_frame_of_the_live_service(start_service: StartService) -> None:
    service = await start_service(max_concurrency=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        running, waiting, _ = await running_and_held(channel, "team-running", "team-waiting")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc", "top", "--once", "--sort", "queued",
            "--address", f"127.0.0.1:{service.grpc_port}",
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "160"},
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        running.cancel()
        waiting.cancel()
    frame = output.decode()
    assert process.returncode == 0
    assert "in flight 1/1   queued 1   workloads 2" in frame
    rows = [line for line in frame.splitlines() if "team-" in line]
    assert [row.split()[1] for row in rows] == ["team-waiting", "team-running"]  # by queued
    assert "100%" in rows[1]  # the running workload holds the whole capacity
