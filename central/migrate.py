"""Bring a ledger database to the newest schema, from code (no alembic.ini needed)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import NullPool

from central.database import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation would choke on a '%' in a password.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def run_migrations(url: str, *, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``; a no-op when already there.

    The whole upgrade is one transaction (Postgres and, with the engine's explicit BEGIN,
    SQLite), so a failed migration leaves the previous schema intact.
    """
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, revision)
    finally:
        await engine.dispose()


MIGRATION_LOCK = 0x726C5F6D69677261  # "rl_migra": one migration at a time per database


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Central pods migrate in an initContainer, several at once in a rollout: the
        # others wait here, then find the schema at head and do nothing.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


@cache
def head_revisions() -> frozenset[str]:
    """The revision(s) the shipped migrations end at (read from the files once)."""
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


async def schema_status(connection: AsyncConnection) -> str:
    """"ok" when the database is at the shipped head; otherwise what is wrong, for
    /readyz: a replica must not take traffic before `regionlimit central migrate` ran."""
    try:  # a failed query aborts the caller's transaction: use a connection of its own
        rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
        current = frozenset(str(row[0]) for row in rows)
    except DBAPIError:
        return "not migrated (run `regionlimit central migrate`)"
    if current == head_revisions():
        return "ok"
    found = ", ".join(sorted(current)) or "none"
    wanted = ", ".join(sorted(head_revisions()))
    return f"at revision {found}, needs {wanted} (run `regionlimit central migrate`)"
