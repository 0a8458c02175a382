"""A real redis-server (Debian's package) on an ephemeral loopback port, in a private
directory, that tests can stop and start again with its data (saved on shutdown)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from .process import free_port


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server: `apt-get install redis-server` (.ci/run does)")
        self._process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._dir),
            "--save", "3600 1", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except (RedisError, OSError):
                    await asyncio.sleep(0.025)
            raise RuntimeError("redis-server did not answer")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM: Redis saves its data and exits; `start` loads it again."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
                raise AssertionError("redis-server ignored SIGTERM for 10 s") from None

    async def close(self) -> None:
        await self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
