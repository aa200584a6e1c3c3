"""One lease request's transaction: lock the key's row, update the grants, commit.

The same SQLAlchemy code serves Postgres and SQLite. The key row is created (when
missing) by an INSERT ... ON CONFLICT DO NOTHING before it is locked: on Postgres two
replicas creating it at once both go on to lock the one row; on SQLite the INSERT takes
the database's write lock at once, so the transaction never has to upgrade a read lock.
Lease requests are refills, not checks, so one transaction per request is plenty.

A windowed key (fixed_window) holds its window's budget; a token bucket key holds the
key's one global bucket (central/lease/bucket.py). Rows whose window ended, or whose
bucket refilled with every lease ended, are pruned in bounded batches (``prune``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from central.lease.bucket import Bucket, full_at, lease, new_bucket, under
from central.lease.grants import (
    DEFAULT_HORIZON_MS,
    Budget,
    Grant,
    acquire,
    give_back,
    reclaim,
    reclaimable,
)
from central.lease.state import lease_grants, lease_keys
from central.models import components
from sync.algorithms import ALGORITHMS
from sync.clock import Clock
from sync.messages import LeaseGrant, LeaseRequest
from sync.windows import NO_END, window_bounds

PRUNE_BATCH = 500
# Rows are pruned this long after their end: a replica whose clock is behind may still
# be answering requests of the window that ended.
PRUNE_GRACE_MS = 60_000


class WindowAhead(Exception):
    """Another replica's clock has moved the key to a later window than this one's."""


class LeaseTransactions:
    def __init__(self, engine: AsyncEngine, *, clock: Clock, ttl_ms: int,
                 reclaim_after_ms: int, horizon_ms: int = DEFAULT_HORIZON_MS) -> None:
        self._engine = engine
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._reclaim_after_ms = reclaim_after_ms
        self._horizon_ms = horizon_ms
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert

    async def handle(self, request: LeaseRequest) -> LeaseGrant:
        if not ALGORITHMS[request.policy.algorithm].lease_windows:
            return await self._bucket(request)
        return await self._window(request)

    async def _bucket(self, request: LeaseRequest) -> LeaseGrant:
        now = self._clock()
        policy = request.policy
        key = (request.namespace, request.key_hash)
        fresh = new_bucket(policy, now)
        async with self._engine.begin() as connection:
            row = await self._lock(connection, key, {
                "window_start": 0, "window_end": now, "limit": policy.limit, "seeded": 0,
                "updated_at": now, "tokens": fresh.level, "tokens_at": now,
                "unit": fresh.unit})
            if row.tokens is None or row.tokens_at is None or row.unit is None:
                # The key was windowed until now: those grants were not tokens.
                await connection.execute(delete(lease_grants).where(
                    *_key_filter(lease_grants, key)))
                bucket, grants = fresh, {}
            else:
                bucket = under(Bucket(row.tokens, row.tokens_at, policy.limit, row.unit,
                                      fresh.full), policy)
                grants = await _grants(connection, key)
            grant, dropped = lease(
                bucket, grants, request.node_id, op=request.op, seq=request.seq,
                used=request.used, want=request.want, demand=request.demand, now=now,
                ttl_ms=self._ttl_ms, horizon_ms=self._horizon_ms)
            if dropped:
                await connection.execute(delete(lease_grants).where(
                    *_key_filter(lease_grants, key), lease_grants.c.node_id.in_(dropped)))
            await connection.execute(lease_keys.update().where(
                *_key_filter(lease_keys, key)).values(
                window_start=0, window_end=full_at(bucket, grants), limit=policy.limit,
                seeded=0, updated_at=now, tokens=bucket.level, tokens_at=bucket.at,
                unit=bucket.unit))
            await self._write(connection, key, Budget(0, 0, grants))
            return LeaseGrant(grant.granted, 0, NO_END, self._ttl_ms, bucket.tokens)

    async def _lock(self, connection: AsyncConnection, key: tuple[str, str],
                    values: dict[str, int]) -> Any:
        """The key's row, created with ``values`` when missing, locked. Twice at most: a
        prune may delete the row between the insert and the lock."""
        for _ in range(2):
            await connection.execute(self._insert(lease_keys).values(
                namespace=key[0], key_hash=key[1], **values).on_conflict_do_nothing())
            row = (await connection.execute(
                select(lease_keys).where(*_key_filter(lease_keys, key)).with_for_update())
            ).first()
            if row is not None:
                return row
        raise LookupError("lease key row vanished twice")

    async def prune(self, *, batch: int = PRUNE_BATCH) -> int:
        """Delete up to ``batch`` keys, with their grants, whose window ended (or whose
        bucket refilled with every lease ended) ``PRUNE_GRACE_MS`` ago. Returns how many.
        Replicas pruning at once skip each other's rows (Postgres)."""
        now = self._clock()
        c = lease_keys.c
        chosen = select(c.namespace, c.key_hash).where(
            c.window_end <= now - PRUNE_GRACE_MS).limit(batch)
        if self._engine.dialect.name == "postgresql":
            chosen = chosen.with_for_update(skip_locked=True)
        # Keys first, in one statement: on SQLite it takes the write lock at once (a
        # select first would have to upgrade its read lock, and may find it taken).
        async with self._engine.begin() as connection:
            keys = [(r.namespace, r.key_hash) for r in await connection.execute(
                delete(lease_keys).where(tuple_(c.namespace, c.key_hash).in_(chosen))
                .returning(c.namespace, c.key_hash))]
            if keys:
                g = lease_grants.c
                await connection.execute(delete(lease_grants).where(
                    tuple_(g.namespace, g.key_hash).in_(keys)))
        return len(keys)

    async def _window(self, request: LeaseRequest) -> LeaseGrant:
        now = self._clock()
        start, end = window_bounds(request.policy.duration, now)
        key = (request.namespace, request.key_hash)
        seed = None
        async with self._engine.connect() as connection:
            known = (await connection.execute(
                select(lease_keys.c.window_start).where(*_key_filter(lease_keys, key)))).first()
            if known is None:
                seed = await _published(connection, key, start)
            await connection.rollback()
        async with self._engine.begin() as connection:
            row = await self._lock(connection, key, {
                "window_start": start, "window_end": end, "limit": request.policy.limit,
                "seeded": sum((seed or {}).values()), "updated_at": now})
            if row.window_start > start:
                raise WindowAhead(row.window_start)
            if (row.window_start, row.window_end) != (start, end):
                # A new window (or a new window length): the old grants are spent history.
                seeded = sum((await _published(connection, key, start)).values())
                await connection.execute(delete(lease_grants).where(
                    *_key_filter(lease_grants, key)))
                grants: dict[str, Grant] = {}
            else:
                seeded = row.seeded
                grants = await _grants(connection, key)
            budget = Budget(limit=request.policy.limit, seeded=seeded, grants=grants)
            expired = reclaimable(budget, now=now, reclaim_after_ms=self._reclaim_after_ms)
            if expired:
                reclaim(budget, await _published(connection, key, start), expired)
            grant = self._apply(budget, request, start, now)
            await connection.execute(lease_keys.update().where(
                *_key_filter(lease_keys, key)).values(
                window_start=start, window_end=end, limit=request.policy.limit,
                seeded=seeded, updated_at=now, tokens=None, tokens_at=None, unit=None))
            await self._write(connection, key, budget)
            return LeaseGrant(grant.granted, start, end, self._ttl_ms, budget.free)

    def _apply(self, budget: Budget, request: LeaseRequest, start: int, now: int) -> Grant:
        # ``used`` counts in the window the node names: from an older window it says
        # nothing about this one.
        used = request.used if request.window_start == start else 0
        if request.op == "return":
            if request.window_start != start:
                return budget.grants.get(request.node_id) or Grant()
            return give_back(budget, request.node_id, seq=request.seq, used=used, now=now,
                             keep=request.want)
        return acquire(budget, request.node_id, seq=request.seq, used=used,
                       want=request.want, demand=request.demand, now=now,
                       ttl_ms=self._ttl_ms, horizon_ms=self._horizon_ms)

    async def _write(self, connection: AsyncConnection, key: tuple[str, str],
                     budget: Budget) -> None:
        rows = [{"namespace": key[0], "key_hash": key[1], "node_id": node,
                 "granted": g.granted, "reported": g.reported, "expires_at": g.expires_at,
                 "seq": g.seq, "demand": g.demand}
                for node, g in budget.grants.items() if g.changed]
        if not rows:
            return
        statement = self._insert(lease_grants)
        await connection.execute(statement.on_conflict_do_update(
            index_elements=["namespace", "key_hash", "node_id"],
            set_={name: statement.excluded[name]
                  for name in ("granted", "reported", "expires_at", "seq", "demand")}),
            rows)


def _key_filter(table: Any, key: tuple[str, str]) -> tuple[Any, Any]:
    return table.c.namespace == key[0], table.c.key_hash == key[1]


async def _grants(connection: AsyncConnection, key: tuple[str, str]) -> dict[str, Grant]:
    rows = await connection.execute(select(lease_grants).where(*_key_filter(lease_grants, key)))
    return {r.node_id: Grant(r.granted, r.reported, r.expires_at, r.seq, r.demand)
            for r in rows}


async def _published(connection: AsyncConnection, key: tuple[str, str], window_start: int
                     ) -> dict[str, int]:
    """What each node's published usage says it admitted in the window (the ledger's
    components: a commit interval behind at most, and nothing of a killed node's last
    unpublished flush)."""
    c = components.c
    rows = await connection.execute(
        select(c.node_id, func.sum(c.admitted)).where(
            c.namespace == key[0], c.key_hash == key[1], c.window_start == window_start)
        .group_by(c.node_id))
    return {node: int(admitted) for node, admitted in rows}
