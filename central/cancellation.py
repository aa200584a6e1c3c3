"""Loops of a leadership term end once their task is cancelled, even if a library
swallowed the CancelledError: on Python 3.11, ``asyncio.wait_for`` (under nats.py's fetch,
asyncpg's timeouts) returns a result that arrives as it is cancelled, and a deposed
leader's loop then went on working for a term it no longer holds (issue 11)."""

from __future__ import annotations

import asyncio


def is_cancelling() -> bool:
    """Whether the current task is being cancelled (maybe swallowed below us)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_if_cancelled() -> None:
    if is_cancelling():
        raise asyncio.CancelledError
