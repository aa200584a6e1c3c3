"""The consistent-mode authority: exact decisions, durable before the answer.

Every central replica serves the request subject in one queue group. Within a replica,
each key belongs to one of a few lanes; a lane decides in micro-batches: whatever
requests queued up while its previous transaction ran are decided in ONE transaction
on the lane's own connection (central/consistent/tx.py), which commits before any reply
goes out. Lanes let unrelated keys commit side by side instead of queueing behind each
other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from central.consistent.tx import DecisionTransactions, decisions_for
from central.metrics import CentralMetrics
from sync.clock import Clock
from sync.errors import MalformedMessage, UnsupportedVersion
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


@dataclass(slots=True)
class Pending:
    request: ConsistentRequest
    msg: Msg


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
        self._queues: list[asyncio.Queue[Pending]] = [asyncio.Queue() for _ in range(count)]

    async def serve(self, nc: Client) -> None:
        """Answer consistent checks until cancelled."""
        sub = await nc.subscribe(CONSISTENT, queue=CONSISTENT_QUEUE, cb=self._receive)
        try:
            async with asyncio.TaskGroup() as group:
                for queue in self._queues:
                    group.create_task(self._lane(queue))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _lane(self, queue: asyncio.Queue[Pending]) -> None:
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

    async def _receive(self, msg: Msg) -> None:
        try:
            request = decode_consistent_request(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._metrics.malformed.inc()
            log.warning("dropped a malformed consistent request: %s", exc)
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode_consistent_decision(None))
            return
        lane = hash((request.namespace, request.key_hash)) % len(self._queues)
        self._queues[lane].put_nowait(Pending(request, msg))

    async def _answer(self, batch: list[Pending], transactions: DecisionTransactions
                      ) -> None:
        decisions: Sequence[ConsistentDecision | None]
        try:
            decisions = await transactions.decide([p.request for p in batch])
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
    async def _reply(batch: list[Pending], decisions: Sequence[ConsistentDecision | None]
                     ) -> None:
        for pending, decision in zip(batch, decisions, strict=True):
            with contextlib.suppress(nats.errors.Error):
                await pending.msg.respond(encode_consistent_decision(decision))
