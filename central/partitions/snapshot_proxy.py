"""The snapshot subject nodes ask (``regionlimit.snapshot``), answered by walking the
partitions' own snapshot subjects in turn.

A node does not need to know the partition count to restart: the holder of partition 0
answers each page by asking one partition's leader for the same page. The cursor it
hands out carries the partition: ``inner * MAX_PARTITIONS + partition``, so cursor 0
still means "from the start" and a node only echoes it, as before.
"""

from __future__ import annotations

import contextlib
import logging

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from central.metrics import CentralMetrics
from central.partitions.snapshot_index import SNAPSHOT_PAGE
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import (
    ConfigUpdate,
    KeyTotal,
    SnapshotPage,
    SnapshotRequest,
    decode_snapshot_page,
    decode_snapshot_request,
    encode_snapshot_page,
    encode_snapshot_request,
)
from sync.partitions import MAX_PARTITIONS, partition_snapshot_subject

log = logging.getLogger("regionlimit.central")
PARTITION_TIMEOUT_S = 1.5


def split_cursor(cursor: int) -> tuple[int, int]:
    """(partition, that partition's own cursor) of a proxy cursor."""
    inner, partition = divmod(cursor, MAX_PARTITIONS)
    return partition, inner


def join_cursor(partition: int, inner: int) -> int:
    return inner * MAX_PARTITIONS + partition


def read_snapshot_request(data: bytes, metrics: CentralMetrics) -> SnapshotRequest | None:
    """A snapshot request, or None (counted and logged) when it cannot be read."""
    try:
        return decode_snapshot_request(data)
    except (MalformedMessage, UnsupportedVersion) as exc:
        metrics.malformed.inc()
        log.warning("dropped a malformed snapshot request: %s", exc)
        return None


class SnapshotProxy:
    def __init__(self, nc: Client, *, partitions: int, metrics: CentralMetrics) -> None:
        self._nc = nc
        self._partitions = partitions
        self._metrics = metrics

    async def answer(self, msg: Msg) -> None:
        request = read_snapshot_request(msg.data, self._metrics)
        if request is None:
            return
        partition, inner = split_cursor(request.cursor)
        if partition >= self._partitions:
            return  # a cursor from a central with more partitions: the node starts over
        # Fill one page from as many partitions as it takes, so a node makes as few
        # requests as before partitioning (sparse partitions cost round trips here, on
        # loopback to the replicas, not across the node's WAN).
        totals: list[KeyTotal] = []
        config: ConfigUpdate | None = None
        next_cursor: int | None = request.cursor
        while next_cursor is not None and len(totals) < SNAPSHOT_PAGE:
            partition, inner = split_cursor(next_cursor)
            try:
                reply = await self._nc.request(
                    partition_snapshot_subject(partition),
                    encode_snapshot_request(SnapshotRequest(
                        request.node_id, inner, SNAPSHOT_PAGE - len(totals))),
                    timeout=PARTITION_TIMEOUT_S)
                page = decode_snapshot_page(reply.data)
            except (nats.errors.Error, TimeoutError, MalformedMessage,
                    UnsupportedVersion) as exc:
                # No answer: the node asks again (its snapshot waits; checks never do).
                log.warning("snapshot: partition %d did not answer (%s)", partition,
                            type(exc).__name__)
                return
            totals += page.totals
            config = config or page.config
            if page.next_cursor is not None:
                next_cursor = join_cursor(partition, page.next_cursor)
            elif partition + 1 < self._partitions:
                next_cursor = join_cursor(partition + 1, 0)
            else:
                next_cursor = None
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(encode_snapshot_page(SnapshotPage(totals, next_cursor, config)))
