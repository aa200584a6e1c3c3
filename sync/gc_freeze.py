"""Long-lived state out of the garbage collector's reach, periodically.

A node's counters and central's key-windows arrive by the thousand a second and live for
their window. Left to the collector, they made full collections of 0.1-0.5 s every few
seconds at a million keys (measured in central: 39 pauses, 6.6 s in 2.5 minutes), each
one a stall of the event loop that answers checks, flushes, ingests and ticks: the tail
of convergence. Every ``interval``, the young generations are collected and what
survived is frozen (``gc.freeze``), so full collections only walk what is new. Cyclic
garbage that is already old at a freeze is kept until ``gc.unfreeze`` (central calls it
when it claims partitions); the young collection first keeps that small.
"""

from __future__ import annotations

import asyncio
import gc

FREEZE_INTERVAL_S = 10.0


async def freeze_survivors_forever(interval: float = FREEZE_INTERVAL_S) -> None:
    while True:
        await asyncio.sleep(interval)
        gc.collect(1)
        gc.freeze()
