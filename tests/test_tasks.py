"""Ending background loops when a cancellation is lost on its way (python/cpython#86296)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from structlog.testing import capture_logs

from extproc.tasks import cancel_and_wait


def syncing_loop(replies: list[asyncio.Future[None]]) -> asyncio.Task[None]:
    """A loop like the fleet sync's: a command awaited through wait_for (as redis-py
    does), then the interval's sleep."""

    async def loop() -> None:
        while True:
            reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, 10)
            await asyncio.sleep(0.05)

    return asyncio.create_task(loop())


async def test_a_cancel_that_lands_as_the_reply_does_is_repeated_until_the_loop_ends() -> None:
    replies: list[asyncio.Future[None]] = []
    task = syncing_loop(replies)
    await asyncio.sleep(0)  # the loop now awaits its first reply
    replies[0].set_result(None)  # the reply lands in the tick of the cancel
    stopping = asyncio.create_task(cancel_and_wait(task))
    try:
        ended, _ = await asyncio.wait({stopping}, timeout=5)  # lost: it would never end
        assert ended == {stopping}
        assert task.cancelled()
    finally:
        for leftover in (stopping, task):
            leftover.cancel()


async def test_the_race_really_loses_a_single_cancel_on_this_python() -> None:
    """What the repetition is for: one cancel, landing with the reply, leaves the loop
    running (on 3.11; 3.12's wait_for no longer loses it)."""
    replies: list[asyncio.Future[None]] = []
    task = syncing_loop(replies)
    await asyncio.sleep(0)
    replies[0].set_result(None)
    task.cancel()
    await asyncio.sleep(0.01)
    lost = not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lost == (sys.version_info < (3, 12))


async def test_every_task_ends_and_a_crashed_one_is_logged_not_raised() -> None:
    """Raised, it would skip the rest of the service's shutdown (servers, fleet leave)."""

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def crashed() -> None:
        raise RuntimeError("loop bug")

    sleeping, failing = asyncio.create_task(forever()), asyncio.create_task(crashed())
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await cancel_and_wait(sleeping, None, failing)
    assert sleeping.cancelled()
    (crashed_log,) = logs
    assert crashed_log["event"] == "background loop had crashed"
    assert str(crashed_log["exc_info"]) == "loop bug"
