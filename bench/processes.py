"""Start the bench's own processes (processors, the demo model server) on free loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.support.process import free_port


@asynccontextmanager
async def processors(
    command: list[str] | None, replicas: int
) -> AsyncIterator[tuple[list[int], list[int]]]:
    """Start `replicas` processors; yields (ports, pids)."""
    ports = [free_port() for _ in range(replicas)]
    if command is None:
        yield ports, []
        return
    started = [
        await asyncio.create_subprocess_exec(
            *[c.replace("{address}", f"127.0.0.1:{port}") for c in command],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for port in ports
    ]
    for port in ports:
        await wait_for_port(port)
    try:
        yield ports, [p.pid for p in started]
    finally:
        for process in started:
            process.terminate()
            await process.wait()


async def wait_for_port(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def stop_all(*started: asyncio.subprocess.Process) -> None:
    """Terminate the bench's own processes and wait for each."""
    for process in started:
        process.terminate()
        await process.wait()
