"""Ending the service's background loops (scrapes, discovery, the fleet sync).

A cancellation can be lost. On Python 3.11, `asyncio.wait_for` -- called inside
every command by redis-py, among others -- returns its inner call's result and
swallows the CancelledError when the cancel lands in the very tick that call
completes (python/cpython#86296; 3.12's rewrite fixed it). The loop then runs
on, and a plain `task.cancel(); await task` never returns: the service hung on
SIGTERM in about one run of 30 of the fleet test that stops Redis. So the cancel
is repeated until the task has ended -- which also cuts short any cleanup a task
runs on cancellation that takes longer than RECANCEL_AFTER (the service's loops
clean up synchronously, or in the stop() that follows).

A loop that had crashed is logged, not raised: shutdown goes on to stop the rest.
"""

from __future__ import annotations

import asyncio

import structlog

RECANCEL_AFTER = 0.1
"""Seconds a cancelled task may take to end before it is cancelled again."""


async def cancel_and_wait(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel the tasks and return once every one has ended (None: nothing to end)."""
    given = [task for task in tasks if task is not None]
    while pending := [task for task in given if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=RECANCEL_AFTER)
    for task in given:
        if not task.cancelled() and (error := task.exception()) is not None:
            structlog.get_logger("extproc.tasks").error(
                "background loop had crashed", task=task.get_name(), exc_info=error
            )
