"""Pulling from a JetStream consumer without holding back what already arrived.

nats.py's ``fetch(n, timeout)`` returns once it has ``n`` messages or once ``timeout``
is over: on a quiet consumer (one partition's share of the usage) the first message then
waited up to the whole timeout, which put convergence p99 near a second. Here the wait
ends with the first message, and whatever else the server holds comes right after it.
"""

from __future__ import annotations

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from central.cancellation import is_cancelling

DRAIN_S = 0.02  # the longest a batch waits for more once it has a message


async def fetch_available(sub: JetStreamContext.PullSubscription, most: int, *,
                          wait: float) -> list[Msg]:
    """Up to ``most`` messages, as soon as there is one; raises TimeoutError (nats' or
    asyncio's) when none came within ``wait`` seconds."""
    messages = await sub.fetch(1, timeout=wait)
    # A cancel swallowed by the first fetch: hand back what came, start nothing more
    # (the caller's loop stops at its next turn, central/cancellation.py).
    if most > 1 and not is_cancelling():
        try:
            messages += await sub.fetch(most - 1, timeout=DRAIN_S)
        except (nats.errors.TimeoutError, TimeoutError):
            pass
    return messages
