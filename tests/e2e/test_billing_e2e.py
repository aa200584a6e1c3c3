"""Billing end to end: real nats-server, Postgres, central and three region nodes.

What the clients saw admitted and denied, per key and region, is what POST
/v1/usage/query bills, exactly; the leader's rollup loop runs meanwhile (every second
here) and changes no total. The test waits for observable conditions, never sleeps.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.billing.rollups import ROLLUP_LAG_MS
from central.billing.usage_query import iso, parse_csv
from sync.windows import month_bounds
from tests.e2e.test_sync_e2e import batch, publish
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    admin,
    avoid_window_boundary,
    check,
    wait_until,
)
from tests.support.nats_server import NatsServer

POLICIES = """
[namespaces.billing]
limit = 40
duration = "1h"
algorithm = "fixed_window"
"""
REGIONS = ("us", "eu", "ap")


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     policy_toml=POLICIES, env={"REGIONLIMIT_ROLLUP_INTERVAL": "1s"})
    try:
        yield system
    finally:
        system.close()


def usage(url: str, **body: Any) -> dict[str, Any]:
    response = admin(url, "POST", "/v1/usage/query", body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_billed_usage_equals_what_the_clients_saw(cluster: Cluster) -> None:
    central = cluster.central()
    nodes = dict(zip(REGIONS, (cluster.node(region) for region in REGIONS), strict=True))
    avoid_window_boundary(HOUR_MS, span_s=60)
    started = int(time.time() * 1000)
    start, end = month_bounds(started)
    month = {"from": iso(start), "to": iso(end)}

    # Mixed traffic: six keys, costs 1 and 2, round-robin over the regions; the busier
    # keys run into their limit of 40 per hour and get denied.
    rng = random.Random(11)
    seen: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    keys = [f"sk_live_bill_{i}" for i in range(6)]
    plan = [(key, rng.choice((1, 1, 2))) for key in keys for _ in range(8 + 12 * keys.index(key))]
    rng.shuffle(plan)
    with httpx.Client(timeout=10.0) as client:
        for i, (key, cost) in enumerate(plan):
            region = REGIONS[i % 3]
            result = check(client, nodes[region].url, "billing", key, cost)
            seen[(key, region)][0 if result["allowed"] else 1] += cost
        # The mixed traffic's denials depend on central's totals having reached the nodes
        # in time; one more key sent past its limit through one node is denied by that
        # node's own counters, so there is always a denial to bill.
        keys.append("sk_live_bill_one_region")
        for _ in range(41):
            result = check(client, nodes["us"].url, "billing", keys[-1], 1)
            seen[(keys[-1], "us")][0 if result["allowed"] else 1] += 1
    assert seen[(keys[-1], "us")] == [40, 1]
    total_admitted = sum(a for a, _ in seen.values())
    total_denied = sum(d for _, d in seen.values())
    assert total_denied > 0 and total_admitted > 0

    def billed() -> tuple[int, int]:
        rows = usage(central.url, namespace="billing", **month)["rows"]
        return sum(r["admitted"] for r in rows), sum(r["denied"] for r in rows)

    wait_until(lambda: billed() == (total_admitted, total_denied), timeout=30,
               what=f"the ledger to bill {total_admitted} admitted, {total_denied} denied")

    # Per key: the monthly total, by raw identifier (hashed by central).
    for key in keys:
        rows = usage(central.url, namespace="billing", identifier=key, **month,
                     group_by=["month"])["rows"]
        expected = [sum(seen[(key, r)][0] for r in REGIONS),
                    sum(seen[(key, r)][1] for r in REGIONS)]
        assert [[row["admitted"], row["denied"]] for row in rows] == [expected], key
        assert rows[0]["identifier_hash"] == cluster.hasher.hash(key)
        assert rows[0]["period"] == iso(start)[:7]

    # Per region: each row is what the clients saw on that region's node; rows sum up.
    by_region = usage(central.url, namespace="billing", **month, group_by=["region"])["rows"]
    hashes = {cluster.hasher.hash(key): key for key in keys}
    assert {(hashes[r["identifier_hash"]], r["region"]): [r["admitted"], r["denied"]]
            for r in by_region} == {k: v for k, v in seen.items() if any(v)}
    assert sum(r["admitted"] for r in by_region) == total_admitted

    # The same rows as CSV.
    response = httpx.post(central.url + "/v1/usage/query", timeout=10.0,
                          json={"namespace": "billing", **month, "group_by": ["region"]},
                          headers={"authorization": admin_token(), "accept": "text/csv"})
    assert response.status_code == 200
    assert parse_csv(response.text) == by_region


def test_usage_flushed_in_the_last_millisecond_of_a_month_bills_to_that_month(
        cluster: Cluster) -> None:
    central = cluster.central()
    avoid_window_boundary(HOUR_MS, span_s=60)
    now = int(time.time() * 1000)
    this_month, next_month = month_bounds(now)
    last_ms = this_month - 1  # 23:59:59.999 UTC on the last day of the previous month
    previous_month = month_bounds(last_ms)[0]
    key, sentinel = "e" * 32, "d" * 32
    # A node flushed 4 at the very end of last month, then 6 in total after midnight.
    publish(cluster.nats.url, [batch("hand.edge", key, 4, flushed_at=last_ms),
                               batch("hand.edge", key, 6, flushed_at=this_month + 1),
                               batch("hand.edge", sentinel, 1)])

    def months() -> list[tuple[str, int]]:
        rows = usage(central.url, namespace="hand", identifier_hash=key, group_by=["month"],
                     **{"from": previous_month, "to": next_month})["rows"]
        return [(r["period"], r["admitted"]) for r in rows]

    wait_until(lambda: usage(central.url, namespace="hand", identifier_hash=sentinel)["rows"],
               what="the sentinel batch to be ingested")
    assert months() == [(iso(previous_month)[:7], 4), (iso(this_month)[:7], 2)]
    days = usage(central.url, namespace="hand", identifier_hash=key, group_by=["day"],
                 **{"from": previous_month, "to": this_month + 86_400_000})["rows"]
    assert [(r["period"], r["admitted"]) for r in days] == [
        (iso(last_ms)[:10], 4), (iso(this_month)[:10], 2)]

    # The leader's rollup loop (every second here) folds last month into a monthly row,
    # unless last month ended less than the rollup lag ago; the answers stay the same.
    if now - ROLLUP_LAG_MS >= this_month:
        wait_until(lambda: cluster.query(
            "SELECT COUNT(*) FROM usage_monthly WHERE key_hash = :k", k=key)[0][0] == 1,
            what="last month rolled up")
    else:
        wait_until(lambda: cluster.query("SELECT rollup_at FROM usage_retention")[0][0] > 0,
                   what="a rollup run")
    assert months() == [(iso(previous_month)[:7], 4), (iso(this_month)[:7], 2)]


def admin_token() -> str:
    from tests.support.processes import TEST_ADMIN_TOKEN

    return f"Bearer {TEST_ADMIN_TOKEN}"
