"""Self-tests of the service fixtures: what other suites rely on must hold."""

from __future__ import annotations

import socket

import nats
import pytest
from nats.js.api import StreamConfig
from sqlalchemy import text
from sqlalchemy.engine import make_url

from central.database import make_engine
from tests.support.nats_server import NatsServer

_seen_databases: set[str] = set()


async def _stream_messages(url: str) -> int:
    client = await nats.connect(url, allow_reconnect=False)
    try:
        info = await client.jetstream().stream_info("USAGE")
        return int(info.state.messages)
    finally:
        await client.close()


async def test_streams_survive_stop_kill_and_restart(nats_server: NatsServer) -> None:
    url = nats_server.url
    client = await nats.connect(url, allow_reconnect=False)
    try:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="USAGE", subjects=["usage.>"]))
        await js.publish("usage.eu", b"1")
    finally:
        await client.close()

    nats_server.restart()
    assert nats_server.url == url
    assert await _stream_messages(url) == 1

    nats_server.kill()
    assert not nats_server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", nats_server.port), timeout=5).close()
    nats_server.start()
    assert await _stream_messages(url) == 1


@pytest.mark.parametrize("attempt", [1, 2])
async def test_each_test_gets_a_fresh_postgres_database(postgres_url: str, attempt: int) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://")
    name = make_url(postgres_url).database
    assert name is not None and name not in _seen_databases
    _seen_databases.add(name)

    engine = make_engine(postgres_url)
    try:
        async with engine.begin() as connection:
            tables = await connection.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            )
            assert tables.scalar_one() == 0
            await connection.execute(text("CREATE TABLE leftover (id int)"))
    finally:
        await engine.dispose()
