"""Where the endpoints come from: a static list, or DNS names re-resolved periodically.

Each source reports the whole set it sees (`EndpointPool.update`), so a
vanished endpoint leaves the pool at the next report. A DNS lookup that fails
keeps the last set it found (a resolver hiccup must not empty the pool); a
name that resolves to nothing empties its share -- the resolver's "no such
name" or "no address" answer (gaierror EAI_NONAME, EAI_NODATA) is that
answer, not a failure. Kubernetes InferencePools
are watched in `kubernetes`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence

import structlog

from extproc.addresses import format_address, parse_address
from extproc.pool.pool import EndpointPool
from extproc.tasks import cancel_and_wait

_NO_RECORDS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
"""getaddrinfo's answers for a name with no records (not a failed lookup)."""

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(name, port) -> the IP addresses of its A/AAAA records."""


def add_static(pool: EndpointPool, addresses: Sequence[str]) -> None:
    pool.update("static", dict.fromkeys(addresses, True))


async def resolve(name: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


class DnsDiscovery:
    """Every A/AAAA record of NAME, as NAME's endpoints on PORT, every `interval` seconds."""

    def __init__(
        self, pool: EndpointPool, name_port: str, interval: float, resolver: Resolver = resolve
    ) -> None:
        self._pool = pool
        self._name, self._port = parse_address(name_port)
        self._source = f"dns:{name_port}"
        self._interval = interval
        self._resolver = resolver
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.synced = asyncio.Event()
        """Set once a resolution was published."""
        self._log = structlog.get_logger("extproc.pool")

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def refresh(self) -> None:
        try:
            hosts = await self._resolver(self._name, self._port)
        except socket.gaierror as error:
            if error.errno not in _NO_RECORDS:
                self._failed(error)
                return
            hosts = []
        except (OSError, UnicodeError) as error:  # UnicodeError: a name IDNA refuses
            self._failed(error)
            return
        self._failing = False
        self._pool.update(self._source, {format_address(h, self._port): True for h in hosts})
        self.synced.set()

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            self._log.warning("endpoint DNS lookup failed", name=self._name, error=str(error))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
