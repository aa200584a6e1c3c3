"""A leadership term that ends hands its usage back at once (issue 11).

The term's merges that are not durable must reach the next leader: its ingest naks every
message it holds unacked, so JetStream redelivers them now rather than after the ack
wait, and its fetch loop stops pulling even when a library swallowed the cancellation.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from central.migrate import run_migrations
from central.service import CentralService
from central.settings import CentralSettings
from sync.messages import UsageEntry
from sync.partitions import partition_token, partition_usage_filter
from sync.policy import build_policy
from sync.publisher import UsagePublisher
from sync.subjects import USAGE_CONSUMER, USAGE_STREAM
from sync.windows import window_bounds
from tests.support.async_wait import until
from tests.support.nats_server import NatsServer

FIXED = build_policy(limit=100, duration="1h", algorithm="fixed_window")


@pytest.mark.usefixtures("clean_env")
async def test_a_stepping_down_leader_naks_what_it_holds(
        nats_server: NatsServer, sqlite_url: str) -> None:
    await run_migrations(sqlite_url)
    # No checkpoint and no redelivery within the test: the only way the message can come
    # back to a consumer is the nak of the term that held it.
    settings = CentralSettings(nats_url=nats_server.url, admin_token="t",
                               identifier_secret="s", commit_interval="1h", ack_wait="1h")
    service = CentralService(settings, database_url=sqlite_url)
    await service.start()
    nc = await nats.connect(nats_server.url)
    try:
        await until(lambda: service.is_leader, "the replica to lead")
        now = int(time.time() * 1000)
        entry = UsageEntry("ns", "0123456789abcdef0123456789abcdef",
                           window_bounds(FIXED.duration, now)[0], 3, 0, FIXED)
        js = nc.jetstream()
        # The leader creates the stream after it reports leading: a publish before that
        # finds no stream (and stores nothing).
        for _ in range(3000):
            try:
                await js.stream_info(USAGE_STREAM)
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.01)
        # SQLite: one partition.
        await UsagePublisher(js, node_id="us-1", region="us", partitions=1).publish(
            now, [entry])
        await until(lambda: 0 in service.states and len(service.states[0].totals.windows) == 1,
                    "the leader to merge the usage")
        await service.stop()

        # The next leader's view: the same durable consumer.
        successor = await js.pull_subscribe(
            partition_usage_filter(0), durable=f"{USAGE_CONSUMER}-p{partition_token(0)}",
            stream=USAGE_STREAM)
        messages = await successor.fetch(1, timeout=30)
        assert [m.metadata.num_delivered for m in messages] == [2]
        await messages[0].ack()
    finally:
        await service.stop()
        await nc.close()
