"""Database URLs and async engines for the central ledger (Postgres or SQLite)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# How long a SQLite writer waits for the file lock before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5_000

_POSTGRES_NAMES = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})
_SQLITE_NAMES = frozenset({"sqlite", "sqlite+aiosqlite"})


def normalize_url(url: str) -> URL:
    """Map the accepted URL spellings onto the async drivers (asyncpg, aiosqlite).

    Operators paste libpq-style URLs (``postgres://``, ``?sslmode=require``); asyncpg
    takes ``ssl`` instead of ``sslmode`` as a keyword, so that one is renamed too.
    """
    parsed = make_url(url)
    name = parsed.drivername
    if name in _POSTGRES_NAMES:
        parsed = parsed.set(drivername="postgresql+asyncpg")
        if "sslmode" in parsed.query and "ssl" not in parsed.query:
            query = dict(parsed.query)
            query["ssl"] = query.pop("sslmode")
            parsed = parsed.set(query=query)
        return parsed
    if name in _SQLITE_NAMES:
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(
        f"unsupported database URL scheme {name!r}: use postgresql://, postgres://, "
        "postgresql+asyncpg://, sqlite:/// or sqlite+aiosqlite:///"
    )


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


COMMAND_TIMEOUT_S = 30.0


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url``; extra keyword arguments go to ``create_async_engine``."""
    normalized = normalize_url(url)
    if normalized.get_backend_name() == "postgresql":
        # A pooled connection may have died with a Postgres restart; ping before reuse so
        # the ingest loop gets a fresh connection instead of one failed commit.
        kwargs.setdefault("pool_pre_ping", True)
        # A statement that hangs on a silent network must fail (and be retried) rather
        # than hold the leader's commit, and its unacked messages, forever.
        kwargs.setdefault("connect_args", {"command_timeout": COMMAND_TIMEOUT_S})
        return create_async_engine(normalized, **kwargs)
    engine = create_async_engine(normalized, **kwargs)
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and real transactions on SQLite.

    The sqlite3 module's legacy mode neither emits BEGIN before DDL nor before SELECT, so
    a migration or a read-then-write would not be one transaction. SQLAlchemy's documented
    recipe: switch the driver's own BEGIN off and emit BEGIN from the ``begin`` event.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets readers (admin API, billing) proceed while the ingest commits.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # synchronous stays at its default (FULL): the ingest acks JetStream messages
            # after the commit, so a commit must survive a power loss too.
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")
