"""Bring a ledger database to the newest schema, from code (no alembic.ini needed)."""

from __future__ import annotations

from dataclasses import dataclass
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
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revisions() -> frozenset[str]:
    """The revision(s) the shipped migrations end at (read from the files once)."""
    return frozenset(_scripts().get_heads())


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    ready: bool
    detail: str


async def schema_status(connection: AsyncConnection) -> SchemaStatus:
    """Whether this image may serve on the database's schema, for /readyz: not before
    `regionlimit central migrate` brought it to this image's head. A revision this image
    does not know was applied by a newer image in the middle of a rollout; migrations
    keep the previous release working, so the old replicas stay ready meanwhile."""
    try:  # the caller's connection is discarded right after, aborted or not
        rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
        current = frozenset(str(row[0]) for row in rows)
    except DBAPIError:
        return SchemaStatus(False, "not migrated (run `regionlimit central migrate`)")
    heads = head_revisions()
    if current == heads:
        return SchemaStatus(True, "ok")
    known = {script.revision for script in _scripts().walk_revisions()}
    found = ", ".join(sorted(current)) or "none"
    if current and not current & known:
        return SchemaStatus(True, f"ok (newer revision {found})")
    wanted = ", ".join(sorted(heads))
    return SchemaStatus(
        False, f"at revision {found}, needs {wanted} (run `regionlimit central migrate`)")
