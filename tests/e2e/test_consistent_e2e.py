"""Consistent mode and live configuration, end to end (real NATS, Postgres, processes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    admin,
    avoid_window_boundary,
    check,
    metric_value,
    wait_until,
)
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path)
    try:
        yield system
    finally:
        system.close()


def configure(central: ManagedProcess, namespace: str, **fields: Any) -> dict[str, Any]:
    response = admin(central.url, "PUT", f"/v1/namespaces/{namespace}", fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_configured(nodes: list[ManagedProcess], namespace: str, *, limit: int,
                    timeout: float = 10.0) -> None:
    def applied() -> bool:
        with httpx.Client() as client:
            for node in nodes:
                r = client.post(node.url + "/v1/check", json={
                    "namespace": namespace, "identifier": "probe", "cost": 0})
                if r.status_code != 200 or r.json()["limit"] != limit:
                    return False
        return True
    wait_until(applied, timeout=timeout, what=f"{namespace} limit {limit} on every node")


async def hammer(urls: list[str], namespace: str, identifier: str, *, clients_per_node: int,
                 checks_per_client: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=clients_per_node * len(urls))
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        async def one_client(url: str) -> list[dict[str, Any]]:
            results = []
            for _ in range(checks_per_client):
                r = await client.post(url + "/v1/check", json={
                    "namespace": namespace, "identifier": identifier})
                assert r.status_code == 200, r.text
                results.append(r.json())
            return results
        batches = await asyncio.gather(*(one_client(url) for url in urls
                                         for _ in range(clients_per_node)))
    return [result for batch in batches for result in batch]


@pytest.mark.parametrize("replicas", [1, 2])
def test_consistent_mode_admits_exactly_the_limit(cluster: Cluster, replicas: int) -> None:
    centrals = [cluster.central() for _ in range(replicas)]
    nodes = [cluster.node(region) for region in ("us", "eu", "ap")]
    configure(centrals[0], "exact", limit=200, duration="1h", algorithm="fixed_window",
              mode="consistent", timeout="10s", on_unavailable="closed")
    wait_configured(nodes, "exact", limit=200)
    avoid_window_boundary(HOUR_MS, span_s=120)
    results = asyncio.run(hammer([n.url for n in nodes], "exact", f"key-{replicas}",
                                 clients_per_node=50, checks_per_client=2))
    assert len(results) == 300
    assert {r["source"] for r in results} == {"authority"}  # no fallback happened
    assert sum(r["allowed"] for r in results) == 200
    wait_until(lambda: cluster.billed("exact") == (200, 100), what="consistent usage billed")
    if replicas == 2:
        served = [metric_value(httpx.get(c.url + "/metrics").text,
                               "regionlimit_consistent_decisions_total") for c in centrals]
        assert sum(served) >= 300


@pytest.mark.parametrize("on_unavailable", ["open", "closed"])
def test_authority_away_falls_back_within_the_timeout(cluster: Cluster,
                                                      on_unavailable: str) -> None:
    central = cluster.central()
    node = cluster.node("us")
    configure(central, "login", limit=5, duration="1h", mode="consistent", timeout="300ms",
              on_unavailable=on_unavailable)
    wait_configured([node], "login", limit=5)
    central.stop()
    with httpx.Client() as client:
        started = time.monotonic()
        result = check(client, node.url, "login", "user-1")
        elapsed = time.monotonic() - started
    assert result["source"] == "fallback"
    assert result["allowed"] is (on_unavailable == "open")
    assert elapsed < 0.3 + 1.0
    metrics = httpx.get(node.url + "/metrics").text
    assert metric_value(metrics, "regionlimit_consistent_fallbacks_total",
                        namespace="login") == 1


def test_limit_change_reaches_every_node_within_a_second(cluster: Cluster) -> None:
    central = cluster.central()
    nodes = [cluster.node(region) for region in ("us", "eu", "ap")]
    configure(central, "live", limit=100, duration="1h", algorithm="fixed_window")
    wait_configured(nodes, "live", limit=100)
    configure(central, "live", limit=10, duration="1h", algorithm="fixed_window")
    wait_configured(nodes, "live", limit=10, timeout=1.0)
    avoid_window_boundary(HOUR_MS, span_s=60)
    with httpx.Client() as client:
        for node in nodes:
            outcomes = [check(client, node.url, "live", f"fresh-{node.url}")["allowed"]
                        for _ in range(11)]
            assert outcomes == [True] * 10 + [False]


def test_a_change_missed_while_disconnected_applies_after_reconnect(cluster: Cluster) -> None:
    central = cluster.central()
    nodes = [cluster.node("us"), cluster.node("eu")]
    configure(central, "healing", limit=100, duration="1h")
    wait_configured(nodes, "healing", limit=100)
    cluster.nats.kill()
    configure(central, "healing", limit=7, duration="1h")  # stored; the broadcast is lost
    cluster.nats.start()
    wait_configured(nodes, "healing", limit=7, timeout=20)


def test_overrides_change_one_key_only(cluster: Cluster) -> None:
    central = cluster.central()
    node = cluster.node("us")
    configure(central, "tiered", limit=3, duration="1h", algorithm="fixed_window")
    for identifier, fields in (("vip", {"limit": 20}), ("strict", {"mode": "consistent"})):
        r = admin(central.url, "PUT", "/v1/namespaces/tiered/overrides",
                  {"identifier": identifier, **fields})
        assert r.status_code == 200, r.text
        assert "vip" not in r.text and "strict" not in r.text.replace('"strict"', "")
    listed = admin(central.url, "GET", "/v1/namespaces/tiered/overrides").json()
    assert len(listed["overrides"]) == 2
    wait_until(lambda: check(httpx.Client(), node.url, "tiered", "vip", 0)["limit"] == 20,
               what="the vip override on the node")
    avoid_window_boundary(HOUR_MS, span_s=60)
    with httpx.Client() as client:
        vip = [check(client, node.url, "tiered", "vip") for _ in range(21)]
        assert [r["allowed"] for r in vip] == [True] * 20 + [False]
        other = [check(client, node.url, "tiered", "someone") for _ in range(4)]
        assert [r["allowed"] for r in other] == [True] * 3 + [False]
        assert {r["source"] for r in other} == {"local"}
        strict = check(client, node.url, "tiered", "strict")
        assert (strict["mode"], strict["source"]) == ("consistent", "authority")


def test_admin_endpoints_require_the_token(cluster: Cluster) -> None:
    central = cluster.central()
    for method, path in (("GET", "/v1/namespaces"), ("PUT", "/v1/namespaces/x"),
                         ("POST", "/v1/identifiers/hash")):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "token"}):
            r = httpx.request(method, central.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert "test-admin-token" not in r.text
    assert httpx.get(central.url + "/healthz").status_code == 200


def test_curl_style_bodies_are_read_as_json(cluster: Cluster) -> None:
    """`curl -d` declares form encoding; the README's commands must work as written."""
    from tests.support.processes import TEST_ADMIN_TOKEN

    central = cluster.central()
    r = httpx.put(central.url + "/v1/namespaces/formish", content=b'{"limit": 3, '
                  b'"duration": "1m"}', headers={
                      "authorization": f"Bearer {TEST_ADMIN_TOKEN}",
                      "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["limit"] == 3
    bad = admin(central.url, "PUT", "/v1/namespaces/formish", None)
    assert bad.status_code in (400, 422)
