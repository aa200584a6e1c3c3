"""The consistent-mode authority: exact decisions, durable before the answer.

Every central replica serves the request subject in one queue group. Within a replica,
each key belongs to one of a few lanes; a lane decides in micro-batches: whatever
requests queued up while its previous transaction ran are decided in ONE transaction
on the lane's own connection (central/consistent/tx.py), which commits before any reply
goes out. Lanes let unrelated keys commit side by side instead of queueing behind each
other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from central.consistent.tx import DecisionTransactions, decisions_for
from central.lanes import Lane, LaneServer
from central.metrics import CentralMetrics
from sync.clock import Clock
from sync.messages import (
    ConsistentDecision,
    ConsistentRequest,
    decode_consistent_request,
    encode_consistent_decision,
)
from sync.subjects import CONSISTENT, CONSISTENT_QUEUE

log = logging.getLogger("regionlimit.authority")
MAX_BATCH = 500
LANES = 4  # per replica; each holds one database connection


class Authority:
    def __init__(self, engine: AsyncEngine, *, clock: Clock, metrics: CentralMetrics,
                 max_batch: int = MAX_BATCH, lanes: int | None = None) -> None:
        self._engine = engine
        self._clock = clock
        self._metrics = metrics
        self._max_batch = max_batch
        dialect = engine.dialect.name
        # SQLite has one writer at a time: more lanes would only wait on its lock.
        count = lanes if lanes is not None else (LANES if dialect == "postgresql" else 1)
        self._server: LaneServer[ConsistentRequest] = LaneServer(
            subject=CONSISTENT, queue_group=CONSISTENT_QUEUE, lanes=count,
            decode=decode_consistent_request, refusal=encode_consistent_decision(None),
            what="consistent", metrics=metrics, log=log)

    async def serve(self, nc: Client) -> None:
        """Answer consistent checks until cancelled."""
        await self._server.serve(nc, self._lane)

    async def _lane(self, queue: Lane[ConsistentRequest]) -> None:
        """One serial batch loop on a connection of its own, kept between batches."""
        transactions = decisions_for(self._engine, self._clock)
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self._max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                await self._answer(batch, transactions)
        finally:
            await transactions.close()

    async def _answer(self, batch: list[tuple[ConsistentRequest, Msg]],
                      transactions: DecisionTransactions) -> None:
        decisions: Sequence[ConsistentDecision | None]
        try:
            decisions = await transactions.decide([request for request, _ in batch])
            self._metrics.consistent_decisions.inc(len(batch))
            self._metrics.consistent_batch.observe(len(batch))
        except Exception as exc:
            # The nodes fall back by each policy's on_unavailable at once, instead of
            # waiting for their timeout. The transactions reconnect on the next batch.
            log.warning("consistent batch of %d failed (%s)", len(batch), type(exc).__name__)
            self._metrics.authority_errors.inc()
            decisions = [None] * len(batch)
        await self._reply(batch, decisions)

    @staticmethod
    async def _reply(batch: list[tuple[ConsistentRequest, Msg]],
                     decisions: Sequence[ConsistentDecision | None]) -> None:
        for (_, msg), decision in zip(batch, decisions, strict=True):
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode_consistent_decision(decision))
