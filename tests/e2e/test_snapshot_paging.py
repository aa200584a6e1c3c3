"""Snapshot paging from the index end to end: a real central, NATS and Postgres; the test
plays node A on the wire (it must choose A's node id before central holds A's keys).

Central holds 100,000 cold components of node X and 3,000 of node A, and 5 keys X
blocked. A's snapshot is exactly A's keys plus the blocked ones, in pages of at most
2,000; a change made between two page requests reaches A (a key already sent turns hot:
addressed to A live; a key A starts serving: in a later page).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from central.partitions.snapshot_index import SNAPSHOT_PAGE
from sync.messages import (
    KeyTotal,
    SnapshotRequest,
    UsageBatch,
    UsageEntry,
    decode_snapshot_page,
    decode_totals,
    encode_snapshot_request,
    encode_usage,
)
from sync.partitions import node_totals_subject
from sync.policy import build_policy
from sync.publisher import ensure_usage_stream
from sync.subjects import SNAPSHOT, usage_subject
from tests.support.cluster import HOUR_MS, Cluster, avoid_window_boundary, metric_value, wait_until
from tests.support.nats_server import NatsServer

PARTITION_TOTALS = "regionlimit.totals.part.*"  # sync/listener.py
POLICY = build_policy(limit=1000, duration="1h", algorithm="fixed_window")
OTHERS, MINE, BLOCKED = 100_000, 3_000, 5
PER_MESSAGE = 2_000


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path)
    try:
        yield system
    finally:
        system.close()


def key(owner: str, i: int) -> str:
    return f"{owner}{i:031x}"  # 32 hex digits


def batches(node_id: str, entries: list[UsageEntry], now: int) -> list[bytes]:
    return [encode_usage(UsageBatch(node_id, "hand", now, entries[i:i + PER_MESSAGE]))
            for i in range(0, len(entries), PER_MESSAGE)]


def test_a_snapshot_pages_exactly_the_nodes_keys_and_the_blocked_ones(cluster: Cluster
                                                                      ) -> None:
    central = cluster.central()
    avoid_window_boundary(HOUR_MS, span_s=300)
    now = int(time.time() * 1000)
    start = now - now % HOUR_MS

    def entry(k: str, admitted: int) -> UsageEntry:
        return UsageEntry("paging", k, start, admitted, 0, POLICY)

    theirs = [entry(key("b", i), 1) for i in range(OTHERS)]
    blocked = [entry(key("c", i), 1000) for i in range(BLOCKED)]
    mine = [entry(key("a", i), 1) for i in range(MINE)]
    payloads = (batches("x-1", theirs + blocked, now) + batches("a-1", mine, now))
    expected_entries = OTHERS + BLOCKED + MINE

    async def run() -> None:
        nc = await nats.connect(cluster.nats.url)
        js = nc.jetstream()
        await ensure_usage_stream(js)
        for payload in payloads:
            await js.publish(usage_subject("hand"), payload)
        def merged() -> float:
            try:  # central's loop is busy merging and committing 100,000 rows: be patient
                body = httpx.get(central.url + "/metrics", timeout=30).text
            except httpx.HTTPError:
                return 0
            return metric_value(body, "regionlimit_ingest_entries_total")

        # >=: a message redelivered while its commit was slow is merged again (no raise).
        await asyncio.to_thread(wait_until, lambda: merged() >= expected_entries and 1,
                                timeout=180, what="central to merge every entry")

        # A listens before it asks, as a node does (sync/listener.py).
        received: list[KeyTotal] = []
        raised = asyncio.Event()

        async def on_totals(msg: nats.aio.msg.Msg) -> None:
            received.extend(decode_totals(msg.data).totals)
            if any(t.total == 601 for t in received):
                raised.set()

        await nc.subscribe(node_totals_subject("a-1"), cb=on_totals)
        await nc.subscribe(PARTITION_TOTALS, cb=on_totals)

        async def page(cursor: int) -> tuple[list[KeyTotal], int | None]:
            reply = await nc.request(SNAPSHOT, encode_snapshot_request(
                SnapshotRequest("a-1", cursor)), timeout=30)
            got = decode_snapshot_page(reply.data)
            assert len(got.totals) <= SNAPSHOT_PAGE
            return got.totals, got.next_cursor

        snapshot, cursor = await page(0)
        assert len(snapshot) == SNAPSHOT_PAGE and cursor is not None
        sent_early = snapshot[0].key_hash

        # Between two pages: A starts serving a new key (cold), then B pushes a key A
        # already got past the share (hot: to A). Central merges in stream order, so once
        # the hot total reached A, the new key is in A's index.
        await js.publish(usage_subject("hand"), encode_usage(UsageBatch(
            "a-1", "hand", now + 1, [entry(key("d", 0), 1)])))
        await js.publish(usage_subject("hand"), encode_usage(UsageBatch(
            "b-1", "hand", now + 1, [entry(sent_early, 600)])))
        await asyncio.wait_for(raised.wait(), timeout=60)
        update = next(t for t in received if t.total == 601)
        assert (update.key_hash, update.components) == (sent_early, {"a-1": 1, "b-1": 600})

        pages = 1
        while cursor is not None:
            more, cursor = await page(cursor)
            snapshot += more
            pages += 1
        await nc.close()

        keys = [t.key_hash for t in snapshot]
        assert len(keys) == len(set(keys))
        assert set(keys) == ({e.key_hash for e in mine} | {e.key_hash for e in blocked}
                             | {key("d", 0)})
        assert pages == -(-(MINE + 1 + BLOCKED) // SNAPSHOT_PAGE)
        assert {t.key_hash: t.blocked_until for t in snapshot if t.blocked_until} == {
            e.key_hash: start + HOUR_MS for e in blocked}
        # Nothing else reached A live: cold keys travel nowhere (blocks go to everyone).
        assert {t.key_hash for t in received} <= {sent_early} | {e.key_hash for e in blocked}

    asyncio.run(run())
