"""The leader lease against a real Postgres (advisory lock) and on SQLite (always granted)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from central.database import make_engine
from central.leadership import LeaderLease, LeadershipLost
from central.ledger import BucketIncrement, ComponentRow, LedgerStore
from central.migrate import run_migrations

T0 = 1_795_399_200_000


def row(
    admitted: int, *, key_hash: str = "k1", algorithm: str | None = "fixed_window"
) -> ComponentRow:
    return ComponentRow(
        "api", key_hash, T0, "eu-a-1", "eu", T0 + 60_000, admitted, 0, 100, "1m",
        algorithm, None, T0 + admitted,  # type: ignore[arg-type]
    )  # fmt: skip


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll until ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def migrated_postgres(postgres_url: str) -> str:
    await run_migrations(postgres_url)
    return postgres_url


@pytest.fixture
async def engines(migrated_postgres: str) -> AsyncIterator[list[AsyncEngine]]:
    """Three engines on one database: two central replicas and an operator."""
    created = [make_engine(migrated_postgres) for _ in range(3)]
    try:
        yield created
    finally:
        for engine in created:
            await engine.dispose()


async def holder_pid(admin: AsyncEngine, lease: LeaderLease) -> int | None:
    async with admin.connect() as connection:
        result = await connection.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = :classid AND objid = :objid AND objsubid = 1"
                # Other databases on a shared server may have leaders of their own.
                " AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            ),
            {"classid": lease.key >> 32, "objid": lease.key & 0xFFFFFFFF},
        )
        pid = result.scalar_one_or_none()
        return None if pid is None else int(pid)


async def terminate(admin: AsyncEngine, pid: int) -> None:
    async with admin.connect() as connection:
        # The timeout makes the call wait until the backend is really gone.
        result = await connection.execute(
            text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
        )
        assert result.scalar_one() is True


async def test_only_one_replica_acquires(engines: list[AsyncEngine]) -> None:
    first, second = LeaderLease(engines[0]), LeaderLease(engines[1])
    try:
        assert await first.acquire() is True
        assert await second.acquire() is False
        assert await first.acquire() is True  # re-acquiring what one holds is a no-op
        assert await first.check() is True
        assert await second.check() is False
        assert first.held and not second.held
        assert first.connection is not None and second.connection is None
    finally:
        await first.release()
        await second.release()


async def test_release_hands_the_lease_over(engines: list[AsyncEngine]) -> None:
    first, second = LeaderLease(engines[0]), LeaderLease(engines[1])
    try:
        assert await first.acquire()
        waiting = asyncio.create_task(second.wait_acquired(poll_interval=0.02))
        await first.release()
        await asyncio.wait_for(waiting, timeout=10)
        assert second.held and await second.check()
        assert not first.held and await first.check() is False
        assert await first.acquire() is False
    finally:
        await first.release()
        await second.release()


async def test_a_closed_holder_connection_frees_the_lease(engines: list[AsyncEngine]) -> None:
    first, second = LeaderLease(engines[0]), LeaderLease(engines[1])
    try:
        assert await first.acquire()
        assert first.connection is not None
        await first.connection.invalidate()  # the socket closes, as when a replica dies
        # The server notices the closed session asynchronously: poll.
        await eventually(second.acquire)
        assert await first.check() is False
    finally:
        await first.release()
        await second.release()


async def test_a_killed_session_loses_the_lease_and_its_writes_fail(
    engines: list[AsyncEngine],
) -> None:
    leader_engine, standby_engine, admin = engines
    leader = LeaderLease(leader_engine)
    standby = LeaderLease(standby_engine)
    ledger = LedgerStore(leader_engine, lease=leader)
    try:
        assert await leader.acquire()
        await ledger.write([row(1)], [])
        pid = await holder_pid(admin, leader)
        assert pid is not None

        await terminate(admin, pid)

        # The deposed leader's write fails, even though SQLAlchemy could reconnect.
        with pytest.raises(LeadershipLost):
            await ledger.write([row(5)], [BucketIncrement("api", "k1", "eu", T0, 5, 0)])
        with pytest.raises(LeadershipLost):
            await ledger.write([row(6)], [])
        assert await leader.check() is False
        assert await standby.acquire() is True

        reader = LedgerStore(admin)
        assert [r.admitted for r in await reader.load_components(window_end_after=0)] == [1]
        assert await reader.usage_totals("api") == {}
    finally:
        await leader.release()
        await standby.release()


async def test_check_notices_a_killed_session(engines: list[AsyncEngine]) -> None:
    leader_engine, _, admin = engines
    leader = LeaderLease(leader_engine)
    try:
        assert await leader.acquire()
        pid = await holder_pid(admin, leader)
        assert pid is not None
        await terminate(admin, pid)
        assert await leader.check() is False
        assert not leader.held
        with pytest.raises(LeadershipLost):
            await LedgerStore(leader_engine, lease=leader).write([row(1)], [])
        # Losing it is not final: the same replica may become leader again.
        assert await leader.acquire() is True
        assert await holder_pid(admin, leader) not in (None, pid)
    finally:
        await leader.release()


async def test_writes_are_fenced_by_the_lock_not_by_the_connection(
    engines: list[AsyncEngine],
) -> None:
    """If the lock goes away while the session lives on, writes must fail too."""
    leader_engine, _, admin = engines
    leader = LeaderLease(leader_engine)
    try:
        assert await leader.acquire()
        connection = leader.connection
        assert connection is not None
        async with connection.begin():
            await connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": leader.key})
        with pytest.raises(LeadershipLost):
            await LedgerStore(leader_engine, lease=leader).write([row(1)], [])
        assert await LedgerStore(admin).load_components(window_end_after=0) == []
        assert not leader.held
    finally:
        await leader.release()


async def test_a_failed_batch_keeps_the_lease(engines: list[AsyncEngine]) -> None:
    leader_engine, _, admin = engines
    leader = LeaderLease(leader_engine)
    ledger = LedgerStore(leader_engine, lease=leader)
    try:
        assert await leader.acquire()
        # The refused row is quarantined in the fenced transaction; the rest commits.
        assert await ledger.write([row(1), row(2, key_hash="k2", algorithm=None)], []) == 1
        assert await leader.check() is True
        await ledger.write([row(3)], [])
        rows = await LedgerStore(admin).load_components(window_end_after=0)
        assert [(r.key_hash, r.admitted) for r in rows] == [("k1", 3)]
    finally:
        await leader.release()


async def test_writes_without_the_lease_are_refused(engines: list[AsyncEngine]) -> None:
    lease = LeaderLease(engines[0])
    with pytest.raises(LeadershipLost):
        await LedgerStore(engines[0], lease=lease).write([row(1)], [])
    assert await lease.check() is False
    await lease.release()  # releasing what one does not hold is a no-op


async def test_wait_acquired_retries_while_postgres_is_unreachable(migrated_postgres: str) -> None:
    # Port 1 refuses connections: every attempt fails, none raises out of wait_acquired.
    engine = make_engine("postgresql://postgres@127.0.0.1:1/none")
    lease = LeaderLease(engine)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(lease.wait_acquired(poll_interval=0.01), timeout=0.5)
        assert not lease.held
    finally:
        await engine.dispose()


async def test_sqlite_lease_is_always_granted(sqlite_url: str) -> None:
    await run_migrations(sqlite_url)
    engine = make_engine(sqlite_url)
    first, second = LeaderLease(engine), LeaderLease(engine)
    try:
        assert await first.acquire() and await second.acquire()
        assert await first.check() and first.connection is None
        await LedgerStore(engine, lease=first).write([row(4)], [])
        rows = await LedgerStore(engine).load_components(window_end_after=0)
        assert [r.admitted for r in rows] == [4]
        await first.release()
        assert await first.check() is False
        with pytest.raises(LeadershipLost):
            await LedgerStore(engine, lease=first).write([row(5)], [])
    finally:
        await engine.dispose()
