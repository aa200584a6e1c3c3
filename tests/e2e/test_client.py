"""The Python client against a real region node process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from regionlimit_client.client import (
    AsyncRegionLimitClient,
    CheckError,
    CheckRequest,
    CheckResult,
    CircuitOpen,
    LimiterUnavailable,
    RegionLimitClient,
    RequestRejected,
)
from tests.support.processes import ManagedProcess, free_port, region_node

POLICY = """
[namespaces.configured]
limit = 2
duration = "1h"
"""


def start_node(directory: Path, **extra_env: str) -> ManagedProcess:
    config = directory / "policy.toml"
    config.write_text(POLICY)
    # A private spill file: nothing from another run (or test) leaks into the counters.
    env = {"REGIONLIMIT_SPILL_PATH": str(directory / "spill.msgpack"), **extra_env}
    return region_node(config=config, extra_env=env).start(ready_path="/readyz")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    process = start_node(tmp_path_factory.mktemp("node"))
    yield process
    process.stop()


def key() -> str:
    return f"sk_test_{uuid.uuid4().hex}"


def test_allows_up_to_the_limit_then_denies(node: ManagedProcess) -> None:
    identifier = key()
    before = int(time.time() * 1000)
    with RegionLimitClient(node.url) as client:
        results = [client.check("client", identifier, limit=3, duration="1h") for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    assert all(r.limit == 3 and r.source == "local" and r.mode == "fast" for r in results)
    assert results[0].retry_after_ms is None
    denied = results[3]
    # A sliding window's retry may exceed one duration (three hits early in this hour keep
    # the weighted count too high until well into the next), never past reset_at.
    assert denied.retry_after_ms is not None
    assert 0 < denied.retry_after_ms <= denied.reset_at - before
    assert denied.reset_at > time.time() * 1000


async def test_async_client_shares_the_counters(node: ManagedProcess) -> None:
    identifier = key()
    async with AsyncRegionLimitClient(node.url) as client:
        first = await client.check("client", identifier, cost=2, limit=3, duration="1h")
        second = await client.check("client", identifier, cost=2, limit=3, duration="1h")
    assert first.allowed and first.remaining == 1
    assert not second.allowed and second.remaining == 1


def test_a_configured_namespace_wins_over_inline_fields(node: ManagedProcess) -> None:
    with RegionLimitClient(node.url) as client:
        result = client.check("configured", key(), limit=100, duration="1m")
    assert result.limit == 2


def test_batch_decides_each_check_and_reports_bad_slots(node: ManagedProcess) -> None:
    identifier = key()
    checks = [
        CheckRequest("client", identifier, limit=1, duration="1h"),
        CheckRequest("client", identifier, cost=5, limit=1, duration="1h"),
        CheckRequest("client", identifier, limit=1, duration="1h"),
    ]
    with RegionLimitClient(node.url) as client:
        first, bad, third = client.check_batch(checks)
    assert isinstance(first, CheckResult) and first.allowed
    assert isinstance(bad, CheckError) and bad.code == "invalid_field" and bad.field == "cost"
    assert isinstance(third, CheckResult) and not third.allowed


async def test_async_batch(node: ManagedProcess) -> None:
    async with AsyncRegionLimitClient(node.url) as client:
        results = await client.check_batch([CheckRequest("configured", key()) for _ in range(3)])
    assert all(isinstance(r, CheckResult) and r.allowed and r.limit == 2 for r in results)


def test_an_invalid_check_raises_with_the_field(node: ManagedProcess) -> None:
    with RegionLimitClient(node.url, on_error="open") as client:
        with pytest.raises(RequestRejected) as caught:
            client.check("client", key(), cost=5, limit=3, duration="1h")
        assert (caught.value.status, caught.value.code, caught.value.field) == (
            422,
            "invalid_field",
            "cost",
        )
        with pytest.raises(RequestRejected) as unknown:
            client.check("not-configured", key())
        assert unknown.value.status == 404 and unknown.value.code == "unknown_namespace"
        assert client.breaker.state == "closed"


def test_node_token(tmp_path: Path) -> None:
    process = start_node(tmp_path, REGIONLIMIT_NODE_TOKEN="s3cret")
    try:
        with RegionLimitClient(process.url) as anonymous:
            with pytest.raises(RequestRejected) as caught:
                anonymous.check("configured", key())
            assert caught.value.status == 401
        with RegionLimitClient(process.url, token="s3cret") as client:
            assert client.check("configured", key()).allowed
    finally:
        process.stop()


def test_no_node_raises_or_answers_by_on_error_then_opens_the_circuit() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    with RegionLimitClient(url, timeout=1.0) as client:
        with pytest.raises(LimiterUnavailable, match="ConnectError"):
            client.check("client", key())
    with RegionLimitClient(url, timeout=1.0, on_error="open") as client:
        for _ in range(client.breaker.failure_threshold):
            result = client.check("client", key())
            assert result.allowed and result.source == "error"
        assert client.breaker.state == "open"
    with RegionLimitClient(url, timeout=1.0, on_error="closed") as client:
        assert not client.check("client", key()).allowed


async def test_async_open_circuit_raises_circuit_open() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncRegionLimitClient(url, timeout=1.0) as client:
        for _ in range(client.breaker.failure_threshold):
            with pytest.raises(LimiterUnavailable):
                await client.check("client", key())
        with pytest.raises(CircuitOpen) as caught:
            await client.check("client", key())
    assert 0 < caught.value.retry_in <= client.breaker.cool_down
