"""A TCP proxy between a Redis client and a real redis-server that injects faults
into script calls (EVALSHA/EVAL), one decision per call from a seeded random:

- drop: the reply never reaches the client (it times out; the call did run);
- delay: the request reaches Redis late -- after the client gave up on it
  and, typically, after it sent its next call on a new connection;
- duplicate: the request also reaches Redis a second time, on a side
  connection (a replay, as a retry would make); the client sees one reply;
- cut: the connection is closed after the request reached Redis, before the
  reply;
and a partition (`cut_off`), during which nothing passes at all.

Other commands (connection setup, SCRIPT LOAD) pass untouched, so every fault
hits the protocol under test. Messages are framed with a minimal RESP2 parser,
so a fault applies to exactly one call and one reply, and per-connection order
is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from .process import free_port

FAULTS = ("drop", "delay", "duplicate", "cut")


@dataclass
class Faults:
    rate: float = 0.0
    """Probability that a script call meets one fault, chosen evenly among `kinds`."""
    kinds: tuple[str, ...] = FAULTS
    delay: tuple[float, float] = (0.6, 1.2)
    """Seconds a delayed request waits: beyond the client's 0.5 s timeout."""
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def pick(self) -> str | None:
        if self._random.random() >= self.rate:
            return None
        kind = self._random.choice(self.kinds)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind

    def delay_seconds(self) -> float:
        return self._random.uniform(*self.delay)


def message_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """The end of the RESP2 message at `start`, or None while it is incomplete."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, header = buffer[start : start + 1], bytes(buffer[start + 1 : line_end])
    after = line_end + 2
    if kind in (b"+", b"-", b":"):
        return after
    if kind == b"$":
        length = int(header)
        if length < 0:
            return after
        end = after + length + 2
        return end if len(buffer) >= end else None
    if kind == b"*":
        position: int | None = after
        for _ in range(max(int(header), 0)):
            assert position is not None
            position = message_end(buffer, position)
            if position is None:
                return None
        return position
    raise ValueError(f"not RESP2: {bytes(buffer[start : start + 20])!r}")


def _is_script_call(message: bytes) -> bool:
    return message[:40].upper().find(b"EVAL") >= 0


class FaultyProxy:
    def __init__(self, upstream_port: int, faults: Faults) -> None:
        self.upstream_port = upstream_port
        self.faults = faults
        self.port = free_port()
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_connections()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    def partition(self, cut_off: bool) -> None:
        """Cut off (every connection closed, nothing passes) or heal."""
        self.cut_off = cut_off
        if cut_off:
            self._drop_connections()

    def _drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.cut_off:
            client_w.transport.abort()  # a blackhole would only be slower
            return
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, upstream_w}
        fates: asyncio.Queue[str | None] = asyncio.Queue()
        self._spawn(self._requests(client_r, upstream_w, client_w, fates))
        self._spawn(self._replies(upstream_r, client_w, upstream_w, fates))

    async def _requests(
        self,
        client: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        client_w: asyncio.StreamWriter,
        fates: asyncio.Queue[str | None],
    ) -> None:
        buffer = bytearray()
        try:
            while chunk := await client.read(65536):
                buffer += chunk
                while (end := message_end(buffer)) is not None:
                    message = bytes(buffer[:end])
                    del buffer[:end]
                    fate = self.faults.pick() if _is_script_call(message) else None
                    if fate == "delay":
                        # Held back while the client gives up; then it still lands.
                        await asyncio.sleep(self.faults.delay_seconds())
                    if self.cut_off:
                        return
                    fates.put_nowait(fate)
                    upstream.write(message)
                    await upstream.drain()
                    if fate == "duplicate":
                        self._spawn(self._replay(message))
        except (ConnectionError, OSError):
            pass
        finally:
            # Anything already sent is left to run; only then is the link closed.
            with contextlib.suppress(ConnectionError, OSError):
                await upstream.drain()
                upstream.write_eof()
            client_w.transport.abort()

    async def _replies(
        self,
        upstream: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream_w: asyncio.StreamWriter,
        fates: asyncio.Queue[str | None],
    ) -> None:
        buffer = bytearray()
        try:
            while chunk := await upstream.read(65536):
                buffer += chunk
                while (end := message_end(buffer)) is not None:
                    message = bytes(buffer[:end])
                    del buffer[:end]
                    fate = await fates.get()
                    if fate in {"drop", "delay"}:
                        continue  # the client has (or will have) given up on it
                    if fate == "cut" or self.cut_off:
                        client.transport.abort()
                        return
                    client.write(message)
                    await client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            client.transport.abort()
            upstream_w.transport.abort()
            self._writers.discard(client)
            self._writers.discard(upstream_w)

    async def _replay(self, message: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            writer.write(message)
            await writer.drain()
            buffer = bytearray()
            while message_end(buffer) is None and (chunk := await reader.read(65536)):
                buffer += chunk
        finally:
            writer.transport.abort()
