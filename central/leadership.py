"""Who among the central replicas is the leader: the one that ingests usage.

On Postgres the lease is a session-level advisory lock held on one dedicated
connection, which does nothing but hold the lock and answer probes, so a slow ledger
write can never make a probe late. Writes run on pooled connections and are fenced by a
**term** (table ``partition_leases``): on taking the lock, the new leader raises the
term of its partition and keeps the new value; each write transaction first reads the
term ``FOR SHARE`` and checks that the lock's session still holds the lock, and aborts
with ``LeadershipLost`` unless both hold. The row lock makes the two exclude each other:
the new leader's raise waits for an old leader's write in flight, and every later write
of the old leader sees a higher term. A deposed leader (its session killed, its network
cut, its lock released) therefore fails its writes instead of committing next to the new
leader's.

A session survives a frozen leader (SIGSTOP, a VM pause: the kernel keeps the TCP session
alive) and, for minutes, a partition. So the lease is also renewed: the holder polls it
every second (check()), which Postgres records as the session's last state change. A
standby that finds the lock held by a session idle for longer than ``stale_after``
terminates that session (pg_terminate_backend; same database role), which frees the lock
and fences the old leader. On a partition, the lease session's TCP keepalives and
tcp_user_timeout (set per session) make Postgres drop it within seconds as well; a write
transaction left open by a frozen leader ends after ``stale_after`` idle
(idle_in_transaction_session_timeout), so it cannot hold the term's row lock forever.

On SQLite there is nothing to coordinate with: the lease is always granted. SQLite
therefore supports exactly one central replica; run Postgres for more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

# pg advisory lock key of the leader lease ("rl_leadr"); advisory locks are scoped to the
# database, so two deployments on different databases of one server do not interfere.
LEADER_LOCK_KEY = 0x726C5F6C65616472

_HOLDS_LOCK = text(
    """
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory'
          AND pid = COALESCE(:pid, pg_backend_pid())
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = :classid AND objid = :objid AND objsubid = 1
          AND granted
    )
    """
)

# The term of a partition's lease, read under a share lock by every write (see above).
_TERM_FOR_SHARE = text(
    "SELECT term FROM partition_leases WHERE partition = :partition FOR SHARE")
_RAISE_TERM = text(
    """
    INSERT INTO partition_leases (partition, term) VALUES (:partition, 1)
    ON CONFLICT (partition) DO UPDATE SET term = partition_leases.term + 1
    RETURNING term
    """
)

# The holder's session: its lock, its backend and how long since it last did anything.
_HOLDER = text(
    """
    SELECT a.pid, EXTRACT(EPOCH FROM (clock_timestamp() - a.state_change)) AS idle_s
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = :classid AND l.objid = :objid AND l.objsubid = 1
      AND l.granted
      AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
    """
)


def _keepalive_settings(stale_after: float) -> dict[str, int]:
    """Per-session TCP settings: Postgres drops a lease session whose peer vanished
    (partition, dead host) after about ``stale_after`` seconds instead of hours."""
    idle = max(1, int(stale_after / 2))
    return {"tcp_keepalives_idle": idle, "tcp_keepalives_interval": 1,
            "tcp_keepalives_count": max(1, int(stale_after) - idle),
            "tcp_user_timeout": int(stale_after * 1000)}


def partition_lock_key(partition: int) -> int:
    """The advisory lock of one partition's lease: partition 0 keeps the key of the
    unpartitioned releases' single leader, so the two can never lead it side by side."""
    return LEADER_LOCK_KEY + partition


# Partitions whose lease is taken, and how long each holder's session has been silent.
_TAKEN = text(
    """
    SELECT l.objid, a.state,
           EXTRACT(EPOCH FROM (clock_timestamp() - a.state_change)) AS idle_s
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = :classid AND l.objsubid = 1 AND l.granted
    """
)


async def claimable_partitions(engine: AsyncEngine, partitions: int, *,
                               stale_after: float) -> set[int]:
    """Partitions whose lease is free, or held by a session silent for ``stale_after``
    (a frozen holder, which acquire() deposes): worth trying, one query for all."""
    if engine.dialect.name != "postgresql":
        return set(range(partitions))
    base = partition_lock_key(0)
    async with engine.connect() as connection:
        rows = (await connection.execute(
            _TAKEN, {"classid": (base >> 32) & 0xFFFFFFFF})).all()
    taken = set()
    for row in rows:
        partition = int(row.objid) - (base & 0xFFFFFFFF)
        silent = row.state != "active" and float(row.idle_s or 0) >= stale_after
        if 0 <= partition < partitions and not silent:
            taken.add(partition)
    return set(range(partitions)) - taken


class LeadershipLost(RuntimeError):
    """The lease is not (or no longer) held; the caller must stop acting as leader."""


class LeaderLease:
    """A non-blocking, pollable leader lease (see the module docstring).

    All use of the held connection (acquire, probe, release) is serialized by an
    internal mutex: one asyncpg connection runs one operation at a time. Writes do not
    use it (see ``transaction``).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        key: int = LEADER_LOCK_KEY,
        partition: int = 0,
        lock_engine: AsyncEngine | None = None,
        check_timeout: float = 5.0,
        stale_after: float = 10.0,
    ) -> None:
        self._engine = engine
        # The lock's own session: from an unpooled engine when one replica holds many
        # partitions, so held leases never exhaust the write pool.
        self._lock_engine = lock_engine or engine
        self._key = key
        self._partition = partition
        self._term = 0
        self._holder_pid = 0
        self._check_timeout = check_timeout
        self._stale_after = stale_after
        self._exclusive = engine.dialect.name == "postgresql"
        self._connection: AsyncConnection | None = None
        # The asyncpg connection under ``_connection``, to close its socket without
        # awaiting anything when the server stops answering.
        self._driver_connection: Any = None
        self._granted = False
        self._mutex = asyncio.Lock()

    @property
    def key(self) -> int:
        return self._key

    @property
    def held(self) -> bool:
        """Whether the lease was acquired and not known to be lost (no I/O; see check())."""
        return self._granted

    @property
    def connection(self) -> AsyncConnection | None:
        """The lock-holding connection (Postgres, while held); None otherwise.

        Prefer ``transaction()``: it serializes use of the connection and fences writes.
        """
        return self._connection

    async def acquire(self) -> bool:
        """Try once, without waiting for the current holder; True when held afterwards.

        Database errors propagate (the caller decides whether to retry).
        """
        async with self._mutex:
            if self._granted:
                return True
            if not self._exclusive:
                self._granted = True
                return True
            connection = await self._lock_engine.connect()
            try:
                async with connection.begin():
                    got = await self._try_lock(connection)
                    if not got and await self._depose_stale_holder(connection):
                        got = await self._try_lock(connection)
                    if got:
                        for name, value in _keepalive_settings(self._stale_after).items():
                            # set_config(..., false): for the session, not the transaction
                            await connection.execute(
                                text("SELECT set_config(:name, :value, false)"),
                                {"name": name, "value": str(value)})
                        # Waits for a deposed leader's write in flight (it holds the
                        # term's row FOR SHARE), but not forever.
                        await connection.execute(
                            text("SELECT set_config('lock_timeout', :ms, true)"),
                            {"ms": str(int(self._stale_after * 2000))})
                        term = (await connection.execute(
                            _RAISE_TERM, {"partition": self._partition})).scalar_one()
                        pid = (await connection.execute(
                            text("SELECT pg_backend_pid()"))).scalar_one()
                if got:
                    raw = await connection.get_raw_connection()
            except BaseException:
                # Closing the session for good also frees a lock taken just before.
                await _discard(connection)
                raise
            if not got:
                await connection.close()
                return False
            # A session-level advisory lock outlives the transaction that took it, so the
            # connection sits idle (not "idle in transaction") while it holds the lease.
            self._driver_connection = raw.driver_connection
            self._connection = connection
            self._term, self._holder_pid = int(term), int(pid)
            self._granted = True
            log.info("leader lease acquired (advisory lock %#x, term %d)", self._key,
                     self._term)
            return True

    async def wait_acquired(self, poll_interval: float = 1.0) -> None:
        """Return once the lease is held; retry every ``poll_interval`` seconds.

        Database errors while trying (Postgres down or restarting) are logged and retried,
        since waiting for leadership is exactly what a standby replica does.
        """
        while True:
            try:
                if await self.acquire():
                    return
            except (DBAPIError, OSError, TimeoutError) as exc:
                log.warning("leader lease: database unavailable, retrying: %s", exc)
            await asyncio.sleep(poll_interval)

    async def check(self) -> bool:
        """Whether the lease is still held: the session is alive and holds the lock.

        Any failure (dead connection, no answer within ``check_timeout``) counts as lost;
        the connection is then dropped and the lease must be acquired again.
        """
        async with self._mutex:
            if not self._granted:
                return False
            connection = self._connection
            if connection is None:
                return True
            probe = asyncio.ensure_future(self._probe(connection))
            done, _ = await asyncio.wait({probe}, timeout=self._check_timeout)
            if not done:
                # A cancelled query would still wait for its rollback on a silent
                # network; closing the socket makes every pending operation fail now.
                log.warning("leader lease lost: no answer within %ss", self._check_timeout)
                self._terminate()
            try:
                held = await probe
            except (DBAPIError, OSError) as exc:
                if done:
                    log.warning("leader lease lost: %s", exc)
                else:  # the probe failed because the socket was closed above: said so
                    log.debug("lease probe ended by the closed connection: %s", exc)
                held = False
            if not held:
                await self._lose()
            return held

    async def _probe(self, connection: AsyncConnection) -> bool:
        async with connection.begin():
            return await self._holds_lock(connection)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits only while the lease is held.

        On Postgres it runs on a pooled connection (never queued behind a probe, nor a
        probe behind it) after reading the partition's term FOR SHARE and checking that
        the lock's session still holds the lock. Raises LeadershipLost when the lease is
        not held, the term moved on or the lock is gone. Errors of the caller's
        statements (constraint violations, a lost pooled connection) roll back and
        propagate unchanged, leaving the lease held.
        """
        if not self._granted:
            raise LeadershipLost("leader lease not held")
        if not self._exclusive:
            async with self._engine.begin() as own:
                yield own
            return
        term, pid = self._term, self._holder_pid
        try:
            async with self._engine.begin() as connection:
                # A frozen leader must not keep the term's row locked for ever.
                await connection.execute(
                    text("SELECT set_config('idle_in_transaction_session_timeout', :ms,"
                         " true)"), {"ms": str(int(self._stale_after * 1000))})
                current = (await connection.execute(
                    _TERM_FOR_SHARE, {"partition": self._partition})).scalar_one_or_none()
                if current != term:
                    raise LeadershipLost(f"lease term is {current}, this leader's is {term}")
                if not await self._holds_lock(connection, pid=pid):
                    raise LeadershipLost("advisory lock no longer held by the lease session")
                yield connection
        except LeadershipLost:
            async with self._mutex:
                if self._granted and self._term == term:
                    await self._lose()
            raise

    async def release(self) -> None:
        """Give the lease up (unlock, return the connection); a no-op when not held."""
        async with self._mutex:
            connection = self._connection
            self._connection = None
            self._driver_connection = None
            self._granted = False
            if connection is None:
                return
            try:
                async with connection.begin():
                    await connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": self._key}
                    )
            except (DBAPIError, OSError):
                # Closing the session releases the lock anyway; make sure it is closed
                # rather than returned to the pool still holding it.
                await _discard(connection)
                return
            await connection.close()
            log.info("leader lease released")

    async def _try_lock(self, connection: AsyncConnection) -> bool:
        result = await connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key})
        return bool(result.scalar_one())

    async def _depose_stale_holder(self, connection: AsyncConnection) -> bool:
        """Terminate the holder's session if it has not renewed the lease (any statement)
        for ``stale_after`` seconds; True when it is gone and the lock can be taken."""
        result = await connection.execute(
            _HOLDER,
            {"classid": (self._key >> 32) & 0xFFFFFFFF, "objid": self._key & 0xFFFFFFFF})
        holder = result.first()
        if holder is None or float(holder.idle_s) < self._stale_after:
            return False
        log.warning("leader lease: holder session %d silent for %.1fs; terminating it",
                    holder.pid, float(holder.idle_s))
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"),
                                 {"pid": int(holder.pid)})
        return True  # the lock is freed as the backend exits: soon, not necessarily yet

    async def _holds_lock(self, connection: AsyncConnection, *, pid: int | None = None
                          ) -> bool:
        """Whether the session ``pid`` (default: this connection's) holds the lock."""
        # pg_locks shows a bigint advisory key as classid = high 32 bits, objid = low
        # 32 bits, objsubid = 1.
        result = await connection.execute(
            _HOLDS_LOCK,
            {"classid": (self._key >> 32) & 0xFFFFFFFF, "objid": self._key & 0xFFFFFFFF,
             "pid": pid},
        )
        return bool(result.scalar_one())

    def _terminate(self) -> None:
        driver = self._driver_connection
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.terminate()

    async def _lose(self) -> None:
        connection = self._connection
        self._connection = None
        self._driver_connection = None
        self._granted = False
        if connection is not None:
            await _discard(connection)


async def _discard(connection: AsyncConnection) -> None:
    """Close a connection for good: never back into the pool, where a lock could linger."""
    with contextlib.suppress(Exception):
        await connection.invalidate()
    with contextlib.suppress(Exception):
        await connection.close()
