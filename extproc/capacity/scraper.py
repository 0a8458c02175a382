"""Scrape each model server's Prometheus metrics on a fixed interval and feed the gate.

One task per endpoint, so a slow endpoint delays only its own readings, and the
next scrape starts only when the last one ended. A scrape that fails, lacks the
waiting series, or takes so long that its reading would be stale on arrival
counts as an error; the gate decides when errors make an endpoint stale. (A
slow answer is still news: on a loaded host a 150 ms scrape every 100 ms is
better than none.)
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from extproc.capacity.saturation import (
    MetricsCapacity,
    MetricsError,
    Reading,
    SaturationOptions,
    parse_reading,
)
from extproc.tasks import cancel_and_wait

MAX_PAGE_BYTES = 8 << 20
"""A vLLM page is ~100 KB; a larger one is a misconfigured URL, not read into memory."""


class Scraper:
    def __init__(self, gate: MetricsCapacity, interval: float) -> None:
        self._gate = gate
        self._interval = interval
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self._gate.options.stale_after, 0.05))
        self._session = aiohttp.ClientSession(timeout=timeout)
        # One round before serving, so the first requests meet real readings (or,
        # if the endpoints fail, the static limit) rather than an empty gate.
        await asyncio.gather(*(self.scrape(url) for url in self._gate.urls))
        self._tasks = [asyncio.create_task(self._scrape_forever(url)) for url in self._gate.urls]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape_forever(self, url: str) -> None:
        due = time.monotonic()
        while True:
            due = max(due + self._interval, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            await self.scrape(url)

    async def scrape(self, url: str) -> None:
        assert self._session is not None
        self._gate.begin_scrape(url)
        try:
            reading = await read_metrics(self._session, url, self._gate.options)
        except SCRAPE_ERRORS as error:
            self._gate.fail_scrape(url, str(error) or type(error).__name__)
            return
        self._gate.end_scrape(url, reading)


SCRAPE_ERRORS = (aiohttp.ClientError, TimeoutError, MetricsError, UnicodeDecodeError)
"""What a failed scrape raises: the endpoint's readings stop being fresh, nothing more."""


async def read_metrics(
    session: aiohttp.ClientSession, url: str, options: SaturationOptions
) -> Reading:
    """One scrape of a model server's Prometheus page; raises one of SCRAPE_ERRORS."""
    async with session.get(url) as response:
        if response.status != 200:
            raise MetricsError(f"HTTP {response.status}")
        text = await _read_page(response)
    return parse_reading(text, options)


async def _read_page(response: aiohttp.ClientResponse) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise MetricsError(f"metrics page larger than {MAX_PAGE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks).decode()
