"""Scrape every endpoint's Prometheus page on a fixed interval, following membership.

One task per endpoint (a slow one delays only its own readings), started
and stopped as discovery adds and removes endpoints. Reading and parsing
are the metrics gate's (`capacity.scraper.read_metrics`). A scrape that
cannot connect (or whose URL cannot be formed) counts towards the endpoint
being dead; any other failure
only lets its readings go stale.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog

from extproc.capacity.scraper import SCRAPE_ERRORS, read_metrics
from extproc.contracts import Clock
from extproc.pool.pool import EndpointPool
from extproc.tasks import cancel_and_wait


class EndpointScraper:
    def __init__(self, pool: EndpointPool, clock: Clock, interval: float, path: str) -> None:
        self._pool = pool
        self._clock = clock
        self._interval = interval
        self._path = path
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._log = structlog.get_logger("extproc.pool")
        pool.on_update(self.sync)

    async def start(self) -> None:
        stale_after = self._pool.options.saturation.stale_after
        # A slow answer is still news, as long as it is not stale on arrival.
        timeout = aiohttp.ClientTimeout(total=max(stale_after, 0.05))
        self._session = aiohttp.ClientSession(timeout=timeout)
        # One round before serving, so the first picks meet real readings.
        await asyncio.gather(*(self.scrape(a) for a in self._pool.addresses))
        self.sync()

    def sync(self) -> None:
        """Scrape exactly the endpoints discovery lists now."""
        if self._session is None:
            return
        listed = set(self._pool.addresses)
        for address in list(self._tasks):
            if address not in listed:
                self._tasks.pop(address).cancel()
        for address in listed - self._tasks.keys():
            self._tasks[address] = asyncio.create_task(self._scrape_forever(address))

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        await cancel_and_wait(*tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape_forever(self, address: str) -> None:
        due = time.monotonic()
        while True:
            due = max(due + self._interval, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            await self.scrape(address)

    async def scrape(self, address: str) -> None:
        session, endpoint = self._session, self._pool.endpoint(address)
        if session is None or endpoint is None:
            return
        url = f"http://{address}{self._path}"  # "ip:port" or "[ipv6]:port", as listed
        endpoint.begin_scrape()
        was_ready = endpoint.ready(self._clock.now())
        try:
            reading = await read_metrics(session, url, endpoint.options.saturation)
        except SCRAPE_ERRORS as error:
            text = str(error) or type(error).__name__
            # A URL that cannot even be formed can never connect either.
            unreachable = isinstance(error, (aiohttp.ClientConnectorError, aiohttp.InvalidURL))
            if endpoint.fail_scrape(self._clock.now(), text, unreachable=unreachable):
                self._log.warning("endpoint scrape failed", endpoint=address, error=text)
        else:
            if endpoint.end_scrape(reading):
                self._log.info("endpoint scrape recovered", endpoint=address)
        if endpoint.ready(self._clock.now()) != was_ready:
            self._log.info("endpoint readiness", endpoint=address, ready=not was_ready)
            self._pool.membership_changed()
        if endpoint.failing:
            self._pool.wake()  # going stale may open room (in flight counts alone)
        else:
            self._pool.scraped(endpoint)
