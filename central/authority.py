"""The consistent-mode authority: exact decisions, durable before the answer.

Every central replica serves the request subject in one queue group. A replica decides
in micro-batches: whatever requests queued up while the previous transaction ran are
decided in ONE transaction that locks their keys' rows (SELECT ... FOR UPDATE, in key
order so replicas never deadlock), runs the same pure algorithms as the region nodes,
writes the new state and the usage buckets, and commits before any reply goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy import bindparam, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from central.consistent_state import consistent_keys
from central.ledger import bucket_upsert
from central.metrics import CentralMetrics
from region_node.algorithms import ALGORITHMS
from region_node.algorithms.base import KeyState, advance
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import (
    ConsistentDecision,
    ConsistentRequest,
    decode_consistent_request,
    encode_consistent_decision,
)
from sync.policy import Policy, build_policy
from sync.subjects import CONSISTENT, CONSISTENT_QUEUE
from sync.windows import hour_start, window_bounds

log = logging.getLogger("regionlimit.authority")
Clock = Callable[[], int]
MAX_BATCH = 500
KEY_FIELDS = ("cur_start", "cur_end", "cur", "cur_denied", "prev", "level_at")


@dataclass(slots=True)
class Pending:
    request: ConsistentRequest
    msg: Msg


def _state_from_row(row: Any, now: int) -> KeyState:
    stored = build_policy(limit=row.limit, duration=row.duration, algorithm=row.algorithm,
                          burst=row.burst)
    state = KeyState(stored, row.cur_start, row.cur_end, now)
    state.cur, state.cur_denied, state.prev = row.cur, row.cur_denied, row.prev
    state.level, state.level_at = int(row.level), row.level_at
    return state


class Authority:
    def __init__(self, engine: AsyncEngine, *, clock: Clock, metrics: CentralMetrics,
                 max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._clock = clock
        self._metrics = metrics
        self._max_batch = max_batch
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        dialect = engine.dialect.name
        self._insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)
        self._add_usage = bucket_upsert(dialect)

    async def serve(self, nc: Client) -> None:
        """Answer consistent checks until cancelled."""
        sub = await nc.subscribe(CONSISTENT, queue=CONSISTENT_QUEUE, cb=self._receive)
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._answer(batch)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _receive(self, msg: Msg) -> None:
        try:
            request = decode_consistent_request(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._metrics.malformed.inc()
            log.warning("dropped a malformed consistent request: %s", exc)
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode_consistent_decision(None))
            return
        self._queue.put_nowait(Pending(request, msg))

    async def _answer(self, batch: list[Pending]) -> None:
        decisions: Sequence[ConsistentDecision | None]
        try:
            decisions = await self.decide([p.request for p in batch])
        except Exception as exc:
            # The nodes fall back by each policy's on_unavailable at once, instead of
            # waiting for their timeout.
            log.warning("consistent batch of %d failed (%s)", len(batch), type(exc).__name__)
            self._metrics.authority_errors.inc()
            decisions = [None] * len(batch)
        for pending, decision in zip(batch, decisions, strict=True):
            with contextlib.suppress(nats.errors.Error):
                await pending.msg.respond(encode_consistent_decision(decision))

    async def decide(self, requests: Sequence[ConsistentRequest]) -> list[ConsistentDecision]:
        """Decide ``requests`` in arrival order, in one transaction."""
        now = self._clock()
        keys = sorted({(r.namespace, r.key_hash) for r in requests})
        first_policy: dict[tuple[str, str], Policy] = {}
        for r in requests:
            first_policy.setdefault((r.namespace, r.key_hash), r.policy)
        table = consistent_keys
        async with self._engine.begin() as connection:
            fresh = [self._fresh_row(key, first_policy[key], now) for key in keys]
            await connection.execute(self._insert(table).on_conflict_do_nothing(), fresh)
            rows = (await connection.execute(
                select(table).where(tuple_(table.c.namespace, table.c.key_hash).in_(keys))
                .order_by(table.c.namespace, table.c.key_hash).with_for_update())).all()
            states = {(row.namespace, row.key_hash): _state_from_row(row, now) for row in rows}
            decisions = []
            usage: dict[tuple[str, str, str], list[int]] = {}
            for r in requests:
                state = states[(r.namespace, r.key_hash)]
                advance(state, r.policy, now, window_bounds)
                d = ALGORITHMS[r.policy.algorithm].decide(state, r.policy, now, r.cost)
                decisions.append(ConsistentDecision(d.allowed, d.remaining, d.reset_at,
                                                    d.retry_after_ms))
                counts = usage.setdefault((r.namespace, r.key_hash, r.region), [0, 0])
                counts[0 if d.allowed else 1] += r.cost
            await connection.execute(
                table.update().where((table.c.namespace == bindparam("k_ns"))
                                     & (table.c.key_hash == bindparam("k_key"))),
                [self._state_row(key, state, now) for key, state in states.items()])
            increments = [{"namespace": ns, "key_hash": key, "region": region,
                           "hour_start": hour_start(now), "admitted": a, "denied": d}
                          for (ns, key, region), (a, d) in usage.items() if a or d]
            if increments:
                await connection.execute(self._add_usage, increments)
        self._metrics.consistent_decisions.inc(len(requests))
        self._metrics.consistent_batch.observe(len(requests))
        return decisions

    @staticmethod
    def _fresh_row(key: tuple[str, str], policy: Policy, now: int) -> dict[str, Any]:
        start, end = window_bounds(policy.duration, now)
        state = KeyState(policy, start, end, now)
        return {"namespace": key[0], "key_hash": key[1],
                **{name: getattr(state, name) for name in KEY_FIELDS},
                "level": str(state.level), "limit": policy.limit, "burst": policy.burst,
                "duration": policy.duration.text, "algorithm": policy.algorithm,
                "updated_at": now}

    @staticmethod
    def _state_row(key: tuple[str, str], state: KeyState, now: int) -> dict[str, Any]:
        policy = state.policy
        return {"k_ns": key[0], "k_key": key[1],
                **{name: getattr(state, name) for name in KEY_FIELDS},
                "level": str(state.level), "limit": policy.limit, "burst": policy.burst,
                "duration": policy.duration.text, "algorithm": policy.algorithm,
                "updated_at": now}
