"""The consistent-mode authority: exact decisions, durable before the answer.

Every central replica serves the request subject in one queue group. Within a replica,
each key belongs to one of a few lanes; a lane decides in micro-batches: whatever
requests queued up while its previous transaction ran are decided in ONE transaction
(on the lane's own connection) that locks their keys' rows (SELECT ... FOR UPDATE, in key
order so lanes and replicas never deadlock), runs the same pure algorithms as the region
nodes, writes the new state and the usage buckets, and commits before any reply goes
out. Lanes let unrelated keys commit side by side instead of queueing behind each other.
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
LANES = 4  # per replica; each holds one database connection
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


def _state_columns(state: KeyState, now: int) -> dict[str, Any]:
    """A consistent_keys row's columns other than its key."""
    policy = state.policy
    return {**{name: getattr(state, name) for name in KEY_FIELDS},
            "level": str(state.level), "limit": policy.limit, "burst": policy.burst,
            "duration": policy.duration.text, "algorithm": policy.algorithm,
            "updated_at": now}


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
        self._insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)
        self._add_usage = bucket_upsert(dialect)

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
        """One serial batch loop on a connection it keeps (no pool checkout per batch)."""
        connection: AsyncConnection | None = None
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self._max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if connection is None or connection.closed:
                    try:
                        connection = await self._engine.connect()
                    except Exception as exc:
                        log.warning("authority has no database connection (%s)",
                                    type(exc).__name__)
                        self._metrics.authority_errors.inc()
                        await self._reply(batch, [None] * len(batch))
                        continue
                if not await self._answer(batch, connection):
                    with contextlib.suppress(Exception):
                        await connection.close()
                    connection = None
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

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

    async def _answer(self, batch: list[Pending], connection: AsyncConnection) -> bool:
        """Decide and reply; False when the connection should be replaced."""
        decisions: Sequence[ConsistentDecision | None]
        healthy = True
        try:
            async with connection.begin():
                decisions = await self.decide_on(connection, [p.request for p in batch])
        except Exception as exc:
            # The nodes fall back by each policy's on_unavailable at once, instead of
            # waiting for their timeout.
            log.warning("consistent batch of %d failed (%s)", len(batch), type(exc).__name__)
            self._metrics.authority_errors.inc()
            decisions, healthy = [None] * len(batch), False
        await self._reply(batch, decisions)
        return healthy

    @staticmethod
    async def _reply(batch: list[Pending], decisions: Sequence[ConsistentDecision | None]
                     ) -> None:
        for pending, decision in zip(batch, decisions, strict=True):
            with contextlib.suppress(nats.errors.Error):
                await pending.msg.respond(encode_consistent_decision(decision))

    async def decide(self, requests: Sequence[ConsistentRequest]) -> list[ConsistentDecision]:
        """Decide ``requests`` in arrival order, in one transaction of its own."""
        async with self._engine.begin() as connection:
            return await self.decide_on(connection, requests)

    async def decide_on(self, connection: AsyncConnection,
                        requests: Sequence[ConsistentRequest]) -> list[ConsistentDecision]:
        """Decide ``requests`` in arrival order inside the caller's transaction."""
        now = self._clock()
        keys = sorted({(r.namespace, r.key_hash) for r in requests})
        first_policy: dict[tuple[str, str], Policy] = {}
        for r in requests:
            first_policy.setdefault((r.namespace, r.key_hash), r.policy)
        table = consistent_keys
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
        return {"namespace": key[0], "key_hash": key[1],
                **_state_columns(KeyState(policy, start, end, now), now)}

    @staticmethod
    def _state_row(key: tuple[str, str], state: KeyState, now: int) -> dict[str, Any]:
        # Keys bound as k_*: the UPDATE's WHERE, not columns to set.
        return {"k_ns": key[0], "k_key": key[1], **_state_columns(state, now)}
