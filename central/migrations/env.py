"""Alembic environment for the central ledger.

Normally run through ``central.migrate.run_migrations``, which hands over an open
connection in ``config.attributes["connection"]``. Without one (the ``alembic`` command
line: ``alembic -c central/migrations/alembic.ini``, database in REGIONLIMIT_DATABASE_URL)
it opens its own async engine; ``--sql`` (offline mode) prints the DDL for a DBA instead.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from central.database import make_engine, normalize_url
from central.models import Base

# Any constant works as long as nothing else in the database uses it; it is distinct from
# the leader lease's key so that a migration never waits for (or on) the leader.
MIGRATION_LOCK_KEY = 0x726C5F6D69677261  # "rl_migra"


def _import_all_models() -> None:
    # Models of other central modules sit on the same Base; autogenerate (a developer's
    # `alembic revision --autogenerate`, the command-line path) must see them all. The
    # programmatic upgrade needs no metadata and skips these imports (FastAPI and all).
    import central

    for module in pkgutil.iter_modules(central.__path__):
        if module.name != "migrations":
            importlib.import_module(f"central.{module.name}")


target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode recreates the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together would otherwise race to create alembic_version
            # and the tables; the transaction-scoped lock makes the second one wait and
            # then find the schema at head.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure_and_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _run_offline(url: str) -> None:
    context.configure(
        url=normalize_url(url),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure_and_run(connection)
        return
    _import_all_models()
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "REGIONLIMIT_DATABASE_URL"
    )
    if not url:
        raise RuntimeError("set REGIONLIMIT_DATABASE_URL (or sqlalchemy.url) to migrate")
    if context.is_offline_mode():
        _run_offline(url)
    else:
        asyncio.run(_run_with_own_engine(url))


_main()
