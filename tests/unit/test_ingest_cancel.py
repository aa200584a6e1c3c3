"""A cancelled ingest (or rollup) stops even when the fetch swallowed the cancellation (issue 11).

On Python 3.11, ``asyncio.wait_for`` (under nats.py's fetch) returns a message that
arrives as it is cancelled instead of raising: a deposed leader's fetch loop went on
pulling usage it never acked. The fetch here is a fake at that I/O seam which swallows
its cancellation the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import create_async_engine

from central.billing.rollups import RollupJob, RollupReport
from central.ingest import LeaderIngest
from central.ledger import LedgerStore
from central.metrics import CentralMetrics
from central.partitions.snapshot_index import SnapshotIndex
from central.totals import GlobalTotals, WindowKey


async def park(*, swallow: bool) -> None:
    """Wait until cancelled; with ``swallow``, return instead of raising, as
    ``asyncio.wait_for`` on Python 3.11 may when a result arrives with the cancel."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        if not swallow:
            raise


class SwallowingFetch:
    """A pull subscription whose fetch waits for messages and, cancelled the first time,
    returns what it has (nothing) instead of raising."""

    def __init__(self) -> None:
        self.calls = 0
        self.waiting = asyncio.Event()

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        self.calls += 1
        self.waiting.set()
        await park(swallow=self.calls == 1)
        return []


async def no_config() -> None:
    return None


async def test_a_swallowed_cancellation_still_stops_the_fetch_loop() -> None:
    index: SnapshotIndex[WindowKey] = SnapshotIndex()
    ingest = LeaderIngest(
        nc=cast(Client, None), js=cast(JetStreamContext, object()),
        ledger=cast(LedgerStore, None), totals=GlobalTotals(retention_ms=3_600_000,
                                                            observer=index),
        metrics=CentralMetrics("test"), clock=lambda: 0, commit_interval=1.0,
        tick_interval=1.0, config=no_config, snapshot_index=index)
    subscription = SwallowingFetch()
    consume = asyncio.create_task(ingest._consume(cast(Any, subscription)))
    await subscription.waiting.wait()
    consume.cancel()
    # A bound for a hang, not a measurement: the loop ends at its next turn.
    await asyncio.wait({consume}, timeout=10)
    assert consume.cancelled()
    assert subscription.calls == 1


class SwallowingRollup(RollupJob):
    """A rollup whose run, cancelled the first time, returns instead of raising (as a
    database call under ``wait_for`` may)."""

    def __init__(self) -> None:
        super().__init__(create_async_engine("sqlite+aiosqlite://"), hourly_retention_ms=1,
                         daily_retention_ms=1, interval_s=0.0)
        self.runs = 0
        self.running = asyncio.Event()

    async def run_once(self, now_ms: int) -> RollupReport:
        self.runs += 1
        self.running.set()
        await park(swallow=self.runs == 1)
        return RollupReport()


async def test_a_swallowed_cancellation_still_stops_the_rollup_loop() -> None:
    job = SwallowingRollup()
    loop = asyncio.create_task(job.run_forever(lambda: 0))
    await job.running.wait()
    loop.cancel()
    await asyncio.wait({loop}, timeout=10)  # a bound for a hang, not a measurement
    assert loop.cancelled()
    assert job.runs == 1
