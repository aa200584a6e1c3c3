"""Shared fixtures: real nats-server and Postgres (see DESIGN, "Tests against real services").

- ``nats_server``: a started ``NatsServer`` (JetStream on, own port and store), stopped
  after the test; the test may ``stop()``/``kill()``/``restart()`` it.
- ``postgres_server``: session-wide ``PostgresServer`` (``$REGIONLIMIT_TEST_DATABASE_URL``
  or an embedded throwaway cluster).
- ``postgres_url``: a fresh, empty database for this test, as ``postgresql+asyncpg://``.
- ``sqlite_url``: a fresh SQLite file in ``tmp_path``, as ``sqlite+aiosqlite:///``.
- ``ledger_url``: parametrized over both (ids ``sqlite`` and ``postgres``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats_server import NatsServer
from tests.support.postgres import (
    EmbeddedPostgres,
    PostgresServer,
    asyncpg_url,
    start_test_server,
)

log = logging.getLogger(__name__)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_test_server()
    if isinstance(server, EmbeddedPostgres):
        log.warning(
            "embedded Postgres on port %d started in %.2fs", server.port, server.startup_seconds
        )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    try:
        yield asyncpg_url(url)
    finally:
        postgres_server.drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite'}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    # getfixturevalue: Postgres starts only when a postgres-parametrized test runs.
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


# The folder says what a test needs: unit (nothing), integration (real NATS and Postgres,
# in process), e2e and chaos (processes). The quick loop is `pytest tests/unit` or
# `pytest -m "not e2e"`.
FOLDER_MARKERS = {"unit": "unit", "integration": "integration", "e2e": "e2e", "chaos": "e2e"}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS not in path.parents:
            continue
        folder = path.relative_to(TESTS).parts[0]
        marker = FOLDER_MARKERS.get(folder)
        if marker is not None:
            item.add_marker(marker)
