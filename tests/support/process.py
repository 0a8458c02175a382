"""`extproc serve` as a real child process, for tests that kill and restart it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections import deque
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


class ServeProcess:
    def __init__(self, *flags: str) -> None:
        self._flags = flags
        self._process: asyncio.subprocess.Process | None = None
        self.admin = ""
        # The last log lines, for the failure report when the process will not stop.
        self._tail: deque[bytes] = deque(maxlen=40)

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc", "serve", "--admin-listen", "127.0.0.1:0",
            "--log-format", "json", *self._flags,
            stderr=asyncio.subprocess.PIPE, env={**os.environ},
        )  # fmt: skip
        assert self._process.stderr is not None
        while True:
            line = await asyncio.wait_for(self._process.stderr.readline(), 30)
            if not line:
                raise RuntimeError("extproc serve exited before serving")
            event = json.loads(line)
            if event.get("event") == "serving":
                self.admin = event["admin"]
                break
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        while line := await self._process.stderr.readline():
            self._tail.append(line)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def workloads(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{self.admin}/v1/workloads") as reply,
        ):
            return (await reply.json())["workloads"]  # type: ignore[no-any-return]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    async def kill(self) -> None:
        assert self._process is not None
        self._process.kill()
        await self._process.wait()

    async def terminate(self) -> int:
        assert self._process is not None
        if self._process.returncode is None:
            self._process.terminate()
        try:
            return await asyncio.wait_for(self._process.wait(), 30)
        except TimeoutError:
            await self.kill()
            tail = b"".join(self._tail).decode(errors="replace")
            raise AssertionError(
                f"extproc serve ignored SIGTERM for 30 s; its last log:\n{tail}"
            ) from None


async def top_frame(grpc_port: int, *flags: str, columns: int = 200) -> str:
    """One frame of `extproc top --once` against the service on `grpc_port`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "top", "--once", *flags,
        "--address", f"127.0.0.1:{grpc_port}",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": str(columns)},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    return output.decode()
