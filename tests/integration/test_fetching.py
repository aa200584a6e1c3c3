"""fetch_available (central/fetching.py) against a real nats-server: a quiet consumer's
first message comes back without waiting for a full batch, and what the server already
holds comes with it."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from central.fetching import fetch_available
from tests.support.nats_server import NatsServer

# Far longer than the fetch should take; a fetch that waited for its batch would take all
# of WAIT and trip the outer bound (nats.py's fetch(n) does: it waits for n or the timeout).
WAIT = 60.0
BOUND = 30.0


async def test_one_message_is_returned_without_waiting_for_a_batch(
        nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="QUIET", subjects=["quiet.>"]))
        sub = await js.pull_subscribe("quiet.>", durable="c", stream="QUIET",
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        await js.publish("quiet.a", b"1")
        first = await asyncio.wait_for(fetch_available(sub, 500, wait=WAIT), BOUND)
        assert [m.data for m in first] == [b"1"]

        for i in range(2, 5):
            await js.publish("quiet.a", str(i).encode())
        held = await asyncio.wait_for(fetch_available(sub, 500, wait=WAIT), BOUND)
        assert [m.data for m in held] == [b"2", b"3", b"4"]

        # A message published while the fetch waits ends the wait.
        waiting = asyncio.ensure_future(fetch_available(sub, 500, wait=WAIT))
        await asyncio.sleep(0.2)  # let the pull request reach the server (either way works)
        await js.publish("quiet.a", b"5")
        late = await asyncio.wait_for(waiting, BOUND)
        assert [m.data for m in late] == [b"5"]
    finally:
        await nc.close()
