"""`mode: "lease"` through every door: admin API, operator CLI, inline checks, and the
422 naming `algorithm` for the algorithm lease mode refuses (sliding_window)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from regionlimit.cli import main
from tests.support.cluster import Cluster, admin
from tests.support.nats_server import NatsServer
from tests.support.processes import TEST_ADMIN_TOKEN, ManagedProcess


@pytest.fixture
def central(nats_server: NatsServer, postgres_url: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedProcess]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path)
    try:
        process = system.central()
        monkeypatch.setenv("REGIONLIMIT_CENTRAL_URL", process.url)
        monkeypatch.setenv("REGIONLIMIT_ADMIN_TOKEN", TEST_ADMIN_TOKEN)
        yield process
    finally:
        system.close()


def test_admin_api_and_cli_accept_lease_and_refuse_it_for_sliding_windows(
        central: ManagedProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["namespaces", "set", "plans", "--limit", "100", "--duration", "month",
                 "--algorithm", "fixed_window", "--mode", "lease",
                 "--on-unavailable", "closed", "--timeout", "2s"]) == 0
    capsys.readouterr()
    assert main(["namespaces", "get", "plans", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert (stored["mode"], stored["algorithm"], stored["timeout"]) == ("lease",
                                                                       "fixed_window", "2s")
    refused = admin(central.url, "PUT", "/v1/namespaces/api",
                    {"limit": 10, "duration": "1h", "algorithm": "sliding_window",
                     "mode": "lease"})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "algorithm"
    bucket = admin(central.url, "PUT", "/v1/namespaces/burst",
                   {"limit": 10, "duration": "1m", "algorithm": "token_bucket", "burst": 20,
                    "mode": "lease"})
    assert bucket.status_code == 200, bucket.text
    # An override turning a sliding-window namespace's key to lease is refused the same way.
    assert admin(central.url, "PUT", "/v1/namespaces/web",
                 {"limit": 10, "duration": "1h"}).status_code == 200
    override = admin(central.url, "PUT", "/v1/namespaces/web/overrides",
                     {"identifier": "k", "mode": "lease"})
    assert override.status_code == 422 and override.json()["error"]["field"] == "algorithm"


@pytest.fixture
def standalone(monkeypatch: pytest.MonkeyPatch) -> RegionNode:
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)
    return RegionNode(NodeSettings(region="t"), secret="s")


async def test_inline_lease_checks_validate_like_any_policy(standalone: RegionNode) -> None:
    transport = httpx.ASGITransport(build_app(standalone))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        refused = await client.post("/v1/check", json={
            "namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "1m",
            "mode": "lease"})
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == "algorithm"
        # A standalone node has no authority to lease from: it decides alone, as it
        # does for consistent mode, and says which mode the policy asked for.
        ok = await client.post("/v1/check", json={
            "namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "1m",
            "algorithm": "fixed_window", "mode": "lease"})
        assert ok.status_code == 200 and ok.json()["mode"] == "lease"
        bucket = await client.post("/v1/check", json={
            "namespace": "bucket", "identifier": "x", "limit": 5, "duration": "1m",
            "algorithm": "token_bucket", "burst": 8, "mode": "lease"})
        assert bucket.status_code == 200 and bucket.json()["mode"] == "lease"
