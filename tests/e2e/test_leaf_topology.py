"""The deployment topology as shipped: the hub.conf and leaf.conf of deploy/nats run by
real nats-server processes (hub + two leaves), central on the hub, region nodes on the
leaves, each with the JetStream domain the hub declares.

Regression test for nodes behind a leaf that stayed `sync: degraded` forever: their
JetStream API requests got no responders (no domain), and that check blocked the
snapshot, so a restarted node forgot every centrally configured namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import text

from central.database import make_engine
from central.migrate import run_migrations
from tests.support.cluster import (
    HOUR_MS,
    admin,
    avoid_window_boundary,
    metric_value,
    wait_until,
)
from tests.support.nats_topology import ShippedNatsTopology, shipped_js_domain
from tests.support.processes import ManagedProcess, base_env, free_port, regionlimit_command

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
NAMESPACE = "orders"


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[ShippedNatsTopology]:
    nats = ShippedNatsTopology(tmp_path)
    try:
        nats.start_hub()
        for region in ("us", "eu"):
            nats.start_leaf(region)
        yield nats
    finally:
        nats.close()


def test_compose_names_the_domain_the_hub_declares() -> None:
    domain = shipped_js_domain()
    assert domain, "deploy/nats/hub.conf declares no JetStream domain"
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in ("central", "node-us", "node-eu", "node-ap"):
        assert services[name]["environment"]["REGIONLIMIT_JS_DOMAIN"] == domain, name


def sync_state(node: ManagedProcess) -> Any:
    return httpx.get(node.url + "/readyz", timeout=2).json()["sync"]


def check(node: ManagedProcess, identifier: str, cost: int) -> httpx.Response:
    return httpx.post(node.url + "/v1/check", timeout=5, json={
        "namespace": NAMESPACE, "identifier": identifier, "cost": cost})


def billed(database_url: str) -> int:
    """Admitted cost of NAMESPACE committed to the ledger."""
    async def query() -> int:
        engine = make_engine(database_url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text(
                    "SELECT COALESCE(SUM(admitted), 0) FROM components WHERE namespace = :ns"),
                    {"ns": NAMESPACE})
                return int(result.scalar_one())
        finally:
            await engine.dispose()
    return asyncio.run(query())


def test_nodes_behind_leaves_sync_remember_namespaces_and_bill(
        topology: ShippedNatsTopology, postgres_url: str, tmp_path: Path) -> None:
    domain = shipped_js_domain()
    assert domain, "deploy/nats/hub.conf declares no JetStream domain"
    asyncio.run(run_migrations(postgres_url))
    processes: list[ManagedProcess] = []
    env = {"REGIONLIMIT_JS_DOMAIN": domain}

    def start_central() -> ManagedProcess:
        port = free_port()
        proc = ManagedProcess(
            regionlimit_command("central", "--port", str(port), "--database-url", postgres_url,
                                "--nats-url", topology.hub_url),
            env=base_env(REGIONLIMIT_COMMIT_INTERVAL="200ms", **env),
            url=f"http://127.0.0.1:{port}")
        processes.append(proc)
        return proc.start(ready_path="/readyz")

    def start_node(region: str, port: int | None = None, *, with_domain: bool = True
                   ) -> ManagedProcess:
        port = port or free_port()
        proc = ManagedProcess(
            regionlimit_command("node", "--region", region, "--port", str(port),
                                "--nats-url", topology.leaf_url(region)),
            env=base_env(REGIONLIMIT_SPILL_PATH=str(tmp_path / f"spill-{port}.msgpack"),
                         REGIONLIMIT_SNAPSHOT_TIMEOUT="1s", **(env if with_domain else {})),
            url=f"http://127.0.0.1:{port}")
        processes.append(proc)
        return proc.start(ready_path="/healthz")

    def wait_synced(node: ManagedProcess) -> None:
        wait_until(lambda: sync_state(node) == "ok", timeout=30,
                   what=f"sync ok on {node.url}\n{node.log()}")

    try:
        central = start_central()
        response = admin(central.url, "PUT", f"/v1/namespaces/{NAMESPACE}",
                         {"limit": 1000, "duration": "1h", "algorithm": "fixed_window"})
        assert response.status_code == 200, response.text
        nodes = {region: start_node(region) for region in ("us", "eu")}
        for node in nodes.values():
            wait_synced(node)
        avoid_window_boundary(HOUR_MS, span_s=120)

        # Known through the snapshot/broadcast: 200, not 422 unknown_namespace.
        for region, node in nodes.items():
            answer = check(node, f"user-{region}", 3)
            assert answer.status_code == 200, answer.text
            assert answer.json()["allowed"] is True

        # A restarted node loads the configuration from central's snapshot again.
        us_port = int(nodes["us"].url.rsplit(":", 1)[1])
        nodes["us"].stop()  # SIGTERM: the node flushes its usage before it exits
        nodes["us"] = start_node("us", us_port)
        wait_synced(nodes["us"])
        answer = check(nodes["us"], "user-us", 4)
        assert answer.status_code == 200, answer.text
        assert answer.json()["allowed"] is True

        # Usage from both leaves reaches the hub's stream and central's ledger, exactly.
        wait_until(lambda: billed(postgres_url) == 3 + 3 + 4, timeout=30,
                   what="usage billed from both regions")
        for node in nodes.values():
            assert sync_state(node) == "ok"
            metrics = httpx.get(node.url + "/metrics", timeout=2).text
            assert "regionlimit_batches_failed_total" in metrics
        assert billed(postgres_url) == 10

        # Without the domain the JetStream API is unreachable from a leaf: the stream check
        # fails (counted, retried), but never holds back the snapshot.
        lost = start_node("eu", with_domain=False)
        wait_synced(lost)
        answer = check(lost, "user-lost", 0)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: metric_value(httpx.get(lost.url + "/metrics", timeout=2).text,
                                        "regionlimit_stream_check_failures_total") >= 1,
                   what="a failed stream check counted")
    except BaseException:
        for proc in processes:
            print(proc.args, proc.log(), sep="\n")
        for name in topology.processes:
            print(name, topology.log(name), sep="\n")
        raise
    finally:
        for proc in processes:
            proc.kill()
