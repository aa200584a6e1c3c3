"""Node side: totals and configuration from central, and the paged snapshot request.

Totals arrive on three kinds of subject (sync/interest.py): the node's own
(``regionlimit.totals.node.<id>``, addressed: keys it serves that are hot), the partition
subjects (blocked keys, for every node) and the shared ``regionlimit.totals`` (a central
of the previous release sends everything there). The callback is told whether a total
was addressed to this node, so the store can drop what it does not need."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import (
    ConfigUpdate,
    KeyTotal,
    SnapshotRequest,
    TotalsUpdate,
    decode_config,
    decode_snapshot_page,
    decode_totals,
    encode_snapshot_request,
)
from sync.partitions import node_totals_subject
from sync.subjects import CONFIG, PREFIX, SNAPSHOT, TOTALS

log = logging.getLogger("regionlimit.sync")
MAX_SNAPSHOT_PAGES = 10_000
PARTITION_TOTALS = f"{PREFIX}.totals.part.*"  # every partition's blocks, one subscription


class StateListener:
    def __init__(self, nc: Client, *, node_id: str,
                 on_totals: Callable[[TotalsUpdate, bool], None],
                 on_config: Callable[[ConfigUpdate], None],
                 on_malformed: Callable[[str], None]) -> None:
        self._nc = nc
        self._node_subject = node_totals_subject(node_id)
        self._on_totals = on_totals
        self._on_config = on_config
        self._on_malformed = on_malformed

    async def subscribe(self) -> None:
        await self._nc.subscribe(self._node_subject, cb=self._addressed_totals)
        await self._nc.subscribe(PARTITION_TOTALS, cb=self._shared_totals)
        await self._nc.subscribe(TOTALS, cb=self._shared_totals)
        await self._nc.subscribe(CONFIG, cb=self._config)

    async def _addressed_totals(self, msg: Msg) -> None:
        self._totals(msg, addressed=True)

    async def _shared_totals(self, msg: Msg) -> None:
        self._totals(msg, addressed=False)

    def _totals(self, msg: Msg, *, addressed: bool) -> None:
        try:
            update = decode_totals(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._on_malformed(str(exc))
            return
        self._on_totals(update, addressed)

    async def _config(self, msg: Msg) -> None:
        try:
            config = decode_config(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._on_malformed(str(exc))
            return
        self._on_config(config)

    async def fetch_snapshot(self, node_id: str, *, timeout: float
                             ) -> tuple[list[KeyTotal], ConfigUpdate | None]:
        """The totals central holds for this node (the keys it served, then the blocked
        ones), page by page (central walks its partitions behind the one subject);
        raises TimeoutError or NoResponders when no central leader answers."""
        totals: list[KeyTotal] = []
        config: ConfigUpdate | None = None
        cursor: int | None = 0
        for _ in range(MAX_SNAPSHOT_PAGES):
            if cursor is None:
                break
            reply = await self._nc.request(
                SNAPSHOT, encode_snapshot_request(SnapshotRequest(node_id, cursor)),
                timeout=timeout)
            try:
                page = decode_snapshot_page(reply.data)
            except (MalformedMessage, UnsupportedVersion) as exc:
                self._on_malformed(str(exc))
                raise TimeoutError("malformed snapshot page") from None
            totals.extend(page.totals)
            config = config or page.config
            cursor = page.next_cursor
        return totals, config
