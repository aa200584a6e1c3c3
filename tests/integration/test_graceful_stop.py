"""A graceful stop loses no usage, even when NATS stalls (issue 10).

A stalled nats-server (SIGSTOP) keeps the connection open and answers nothing, so a flush
sits in a publish when the stop cancels it. Whatever that flush had taken from the
counters must go back and into the spill file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from region_node.check_result import CheckResult
from region_node.http import check_route
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from region_node.spill import read_spill
from tests.support.async_wait import until
from tests.support.nats_server import NatsServer

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000 + 60_000  # a minute into a day
CHECKS = 40


@pytest.mark.usefixtures("clean_env")
async def test_a_stop_while_nats_stalls_spills_what_the_flush_held(
        nats_server: NatsServer, tmp_path: Path) -> None:
    spill = tmp_path / "spill.msgpack"
    settings = NodeSettings(region="t", nats_url=nats_server.url, spill_path=spill,
                            flush_interval="10ms", snapshot_timeout="100ms")
    node = RegionNode(settings, secret="s", clock=lambda: T0)
    await node.start()
    sync = node.sync
    assert sync is not None
    paused = False
    try:
        await until(lambda: sync.link.is_connected, "the NATS connection")
        nats_server.pause()
        paused = True
        for i in range(CHECKS):
            decision = node.checker.check({"namespace": "api", "identifier": f"user-{i}",
                                           "limit": 100, "duration": "1h",
                                           "algorithm": "fixed_window"})
            assert isinstance(decision, CheckResult) and decision.allowed
        # The flush loop takes the usage and then waits on the stalled server (for its
        # 2 s publish timeout); the stop below cancels it right there.
        await until(lambda: node.store.unpublished == 0, "the flush to take the usage")
        await node.stop()
    finally:
        if paused:
            nats_server.resume()
    entries = [entry for _, batch in read_spill(spill) for entry in batch.entries]
    assert sum(entry.admitted for entry in entries) == CHECKS
    assert len({entry.key_hash for entry in entries}) == CHECKS


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("path", ["/v1/check", "/v1/check/batch"])
async def test_a_request_cancelled_while_its_body_arrives_gets_a_503(path: str) -> None:
    """At SIGTERM uvicorn cancels requests still in flight after its grace period; one
    still waiting for its body used to end in a 500 (issue 10)."""
    node = RegionNode(NodeSettings(region="t"), secret="s", clock=lambda: T0)
    app = check_route(node.endpoints, path)
    waiting = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        waiting.set()
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    request = asyncio.create_task(app(scope, receive, send))
    await waiting.wait()
    request.cancel()
    await request  # ends without raising: the cancellation was answered
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
