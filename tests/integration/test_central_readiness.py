"""Central's /readyz follows the ledger schema: 503 until the database is at the Alembic
head of the shipped migrations, 200 once `regionlimit central migrate` has run, so a
rollout never sends traffic to replicas whose schema is missing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from sqlalchemy import text

from central.database import make_engine
from central.migrate import head_revisions, run_migrations
from tests.support.cluster import wait_until
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess, base_env, free_port, regionlimit_command


async def set_revision(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = :r"),
                                     {"r": revision})
    finally:
        await engine.dispose()


def readiness(central: ManagedProcess) -> httpx.Response:
    return httpx.get(central.url + "/readyz", timeout=5)


def test_readyz_is_503_until_the_schema_is_at_head(nats_server: NatsServer, postgres_url: str,
                                                   tmp_path: Path) -> None:
    (head,) = head_revisions()
    previous = "0001"
    assert previous != head
    asyncio.run(run_migrations(postgres_url, revision=previous))  # an older schema
    port = free_port()
    central = ManagedProcess(
        regionlimit_command("central", "--port", str(port), "--database-url", postgres_url,
                            "--nats-url", nats_server.url),
        env=base_env(), url=f"http://127.0.0.1:{port}")
    try:
        central.start(ready_path="/healthz")
        answer = readiness(central)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["ready"] is False and body["database"] == "ok"
        assert body["schema"].startswith(f"at revision {previous}, needs {head}")

        asyncio.run(run_migrations(postgres_url))
        wait_until(lambda: readiness(central).status_code == 200, timeout=30,
                   what="/readyz 200 after the migration")
        assert readiness(central).json()["schema"] == "ok"

        # A newer image migrated further in the middle of a rollout: this (older) replica
        # stays ready, since migrations keep the previous release working.
        asyncio.run(set_revision(postgres_url, "9999_newer"))
        answer = readiness(central)
        assert answer.status_code == 200, answer.text
        assert answer.json()["schema"] == "ok (newer revision 9999_newer)"
    finally:
        central.kill()


def test_readyz_is_503_on_an_unmigrated_database(nats_server: NatsServer, postgres_url: str
                                                 ) -> None:
    port = free_port()
    central = ManagedProcess(
        regionlimit_command("central", "--port", str(port), "--database-url", postgres_url,
                            "--nats-url", nats_server.url),
        env=base_env(), url=f"http://127.0.0.1:{port}")
    try:
        central.start(ready_path="/healthz")
        answer = readiness(central)
        assert answer.status_code == 503, answer.text
        assert answer.json()["schema"].startswith("not migrated")
        asyncio.run(run_migrations(postgres_url))
        wait_until(lambda: readiness(central).status_code == 200, timeout=30,
                   what="/readyz 200 after the migration")
    finally:
        central.kill()
