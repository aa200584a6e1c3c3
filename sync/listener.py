"""Node side: totals and configuration from central, and the paged snapshot request."""

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
from sync.subjects import CONFIG, SNAPSHOT, TOTALS

log = logging.getLogger("regionlimit.sync")
MAX_SNAPSHOT_PAGES = 10_000


class StateListener:
    def __init__(self, nc: Client, *, on_totals: Callable[[TotalsUpdate], None],
                 on_config: Callable[[ConfigUpdate], None],
                 on_malformed: Callable[[str], None]) -> None:
        self._nc = nc
        self._on_totals = on_totals
        self._on_config = on_config
        self._on_malformed = on_malformed

    async def subscribe(self) -> None:
        await self._nc.subscribe(TOTALS, cb=self._totals)
        await self._nc.subscribe(CONFIG, cb=self._config)

    async def _totals(self, msg: Msg) -> None:
        try:
            update = decode_totals(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._on_malformed(str(exc))
            return
        self._on_totals(update)

    async def _config(self, msg: Msg) -> None:
        try:
            config = decode_config(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._on_malformed(str(exc))
            return
        self._on_config(config)

    async def fetch_snapshot(self, node_id: str, *, timeout: float
                             ) -> tuple[list[KeyTotal], ConfigUpdate | None]:
        """All of central's live totals, page by page; raises TimeoutError or NoResponders
        when no central leader answers."""
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
