"""sync/gc_freeze.py freezes what survives a young collection; central's metrics time
full collections."""

from __future__ import annotations

import asyncio
import gc

from central.metrics import CentralMetrics
from sync.gc_freeze import freeze_survivors_forever
from tests.support.async_wait import until


async def test_survivors_are_frozen_at_each_interval() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    task = asyncio.create_task(freeze_survivors_forever(0.01))
    try:
        await until(lambda: gc.get_freeze_count() > 0, "a freeze")
    finally:
        task.cancel()
        gc.unfreeze()


def full_pauses(metrics: CentralMetrics) -> float:
    value = metrics.registry.get_sample_value("regionlimit_gc_full_pause_seconds_count")
    return value or 0.0


def test_full_collections_are_timed_and_untracking_stops_it() -> None:
    metrics = CentralMetrics("test")
    automatic = gc.isenabled()
    gc.disable()  # only the collections below, none the allocator triggers
    metrics.track_gc_pauses()
    try:
        gc.collect(2)
        gc.collect(1)  # a young collection is not a full one
        assert full_pauses(metrics) == 1
        metrics.untrack_gc_pauses()
        gc.collect(2)
        assert full_pauses(metrics) == 1
    finally:
        metrics.untrack_gc_pauses()
        if automatic:
            gc.enable()
