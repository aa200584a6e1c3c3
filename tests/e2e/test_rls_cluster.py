"""RLS over gRPC against real processes: consistent mode through central's authority and
shadow_mode configured at central (real NATS, Postgres, node and central subprocesses)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.support.cluster import HOUR_MS, Cluster, admin, avoid_window_boundary, check, wait_until
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess, free_port
from tests.support.rls_client import OK, OVER_LIMIT, descriptor, request, stub

RULES = """
[rls.domains.gw]
namespace_key = "ns"
identifier_keys = ["api_key"]
"""


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     policy_toml=RULES)
    try:
        yield system
    finally:
        system.close()


def grpc_node(cluster: Cluster) -> tuple[ManagedProcess, str]:
    port = free_port()
    cluster.env["REGIONLIMIT_GRPC_PORT"] = str(port)
    return cluster.node("us"), f"127.0.0.1:{port}"


def configure(central: ManagedProcess, namespace: str, **fields: Any) -> dict[str, Any]:
    response = admin(central.url, "PUT", f"/v1/namespaces/{namespace}", fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_configured(node: ManagedProcess, namespace: str, limit: int) -> None:
    def applied() -> bool:
        r = httpx.post(node.url + "/v1/check", json={
            "namespace": namespace, "identifier": "probe", "cost": 0})
        return r.status_code == 200 and r.json()["limit"] == limit
    wait_until(applied, timeout=20.0, what=f"{namespace} limit {limit} on the node")


def should(target: str, namespace: str, key: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        return stub(channel).ShouldRateLimit(
            request("gw", [descriptor(("ns", namespace), ("api_key", key))]), timeout=20.0)


def test_consistent_mode_over_grpc_is_decided_by_the_authority(cluster: Cluster) -> None:
    central = cluster.central()
    node, target = grpc_node(cluster)
    configure(central, "strict", limit=3, duration="1h", algorithm="fixed_window",
              mode="consistent", timeout="10s", on_unavailable="closed")
    wait_configured(node, "strict", 3)
    avoid_window_boundary(HOUR_MS, span_s=60)
    with httpx.Client() as client:
        assert should(target, "strict", "k1").statuses[0].limit_remaining == 2
        assert check(client, node.url, "strict", "k1")["source"] == "authority"
        assert should(target, "strict", "k1").statuses[0].limit_remaining == 0
        assert should(target, "strict", "k1").overall_code == OVER_LIMIT
        denied = check(client, node.url, "strict", "k1")
    assert (denied["allowed"], denied["source"]) == (False, "authority")
    wait_until(lambda: cluster.billed("strict") == (3, 2), what="consistent usage billed")


def test_shadow_mode_set_at_central_counts_and_bills_but_never_denies(cluster: Cluster
                                                                      ) -> None:
    central = cluster.central()
    node, target = grpc_node(cluster)
    stored = configure(central, "trial", limit=2, duration="1h", algorithm="fixed_window",
                       shadow_mode=True)
    assert stored["shadow_mode"] is True
    assert admin(central.url, "GET", "/v1/namespaces/trial").json()["shadow_mode"] is True
    wait_configured(node, "trial", 2)
    avoid_window_boundary(HOUR_MS, span_s=60)
    answers = [should(target, "trial", "k1") for _ in range(4)]
    assert [a.overall_code for a in answers] == [OK] * 4
    assert [dict(a.dynamic_metadata) for a in answers] == [{}, {}, {"shadowed": True},
                                                           {"shadowed": True}]
    with httpx.Client() as client:
        http = check(client, node.url, "trial", "k1")
    assert (http["allowed"], http["shadowed"]) == (True, True)
    wait_until(lambda: cluster.billed("trial") == (5, 0), what="shadowed checks billed")
    # Turning shadow mode off makes the same key enforce at once.
    configure(central, "trial", limit=3, duration="1h", algorithm="fixed_window")
    wait_configured(node, "trial", 3)
    assert should(target, "trial", "k1").overall_code == OVER_LIMIT
