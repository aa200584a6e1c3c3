"""The interest filter end to end (sync/interest.py, central/totals_routing.py): three real
nodes, a real central, real NATS and Postgres.

A cold key's total goes to no node; past the broadcast share it goes to the nodes that
serve it, and only to them; a blocked key goes to every node within one tick. A node holds
the keys it serves, not every key of every region.

Ordering: "C received nothing for k" is asserted after a sentinel (a key blocked through
node A) has reached C. Central merged k's usage before the sentinel's and publishes each
tick's totals in order on one connection, so a total for k would have reached C first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from sync.messages import (
    KeyTotal,
    UsageBatch,
    UsageEntry,
    decode_totals,
    encode_usage,
    encode_usage_v1,
)
from sync.partitions import node_totals_subject
from sync.policy import build_policy
from sync.publisher import ensure_usage_stream
from sync.subjects import TOTALS, usage_subject
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    avoid_window_boundary,
    check,
    metric_value,
    wait_until,
)
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess

POLICIES = """
[namespaces.share]
limit = 100
duration = "1h"
algorithm = "fixed_window"

[namespaces.tight]
limit = 5
duration = "1h"
algorithm = "fixed_window"
"""


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    # The default share (0.5), said out loud: the test's numbers depend on it.
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     policy_toml=POLICIES, env={"REGIONLIMIT_BROADCAST_SHARE": "0.5"})
    try:
        yield system
    finally:
        system.close()


def metric(node: ManagedProcess, name: str) -> float:
    return metric_value(httpx.get(node.url + "/metrics").text, name)


def remaining(client: httpx.Client, node: ManagedProcess, namespace: str, key: str) -> int:
    """What the node believes is left (a cost-0 check publishes nothing)."""
    return int(check(client, node.url, namespace, key, 0)["remaining"])


def block_through(client: httpx.Client, node: ManagedProcess, key: str,
                  witnesses: list[ManagedProcess]) -> None:
    """Exhaust ``key`` of namespace tight on ``node``; wait until each witness denies it."""
    for _ in range(5):
        assert check(client, node.url, "tight", key)["allowed"]
    for witness in witnesses:
        def denies(node: ManagedProcess = witness) -> bool:
            return remaining(client, node, "tight", key) == 0

        wait_until(denies, what=f"the block of {key} to reach {witness.url}")


def test_totals_reach_only_the_nodes_that_need_them(cluster: Cluster) -> None:
    cluster.central()
    a, b, c = cluster.node("us"), cluster.node("eu"), cluster.node("ap")
    avoid_window_boundary(HOUR_MS, span_s=180)
    with httpx.Client(timeout=10.0) as client:
        # Cold: 20 of 100, below the share. Nobody receives k, not even A and B.
        for i in range(20):
            assert check(client, (a, b)[i % 2].url, "share", "k")["allowed"]
        wait_until(lambda: cluster.components_total("share") == 20, what="k's 20 in the ledger")
        block_through(client, a, "s1", [c])
        assert metric(b, "regionlimit_totals_received_addressed_total") == 0
        assert remaining(client, b, "share", "k") == 90  # B is blind to A's 10
        assert metric(c, "regionlimit_totals_ignored_total") == 0
        assert metric(c, "regionlimit_active_keys") == 1  # s1 only: nothing stored for k

        # Hot: 60 of 100, past the share. A and B receive k; C does not.
        for i in range(40):
            assert check(client, (a, b)[i % 2].url, "share", "k")["allowed"]
        wait_until(lambda: remaining(client, a, "share", "k") == 40, what="A to see B's 30")
        wait_until(lambda: remaining(client, b, "share", "k") == 40, what="B to see A's 30")
        assert metric(b, "regionlimit_totals_received_addressed_total") > 0
        block_through(client, a, "s2", [c])
        assert metric(c, "regionlimit_totals_received_addressed_total") == 0
        assert metric(c, "regionlimit_totals_ignored_total") == 0
        assert metric(c, "regionlimit_active_keys") == 2  # s1 and s2

        # Blocked: 100 of 100. Every node hears it; C, which never served k, denies it.
        for i in range(40):
            assert check(client, (a, b)[i % 2].url, "share", "k")["allowed"]
        wait_until(lambda: remaining(client, c, "share", "k") == 0,
                   what="k's block to reach C")
        denied = check(client, c.url, "share", "k")
        assert denied["allowed"] is False and denied["retry_after_ms"] > 0
        assert metric(c, "regionlimit_totals_received_addressed_total") == 0
    wait_until(lambda: cluster.billed("share") == (100, 1), what="the ledger to bill 100 + 1")


def test_a_node_holds_the_keys_it_serves_not_every_key(cluster: Cluster) -> None:
    """Memory: three nodes each serve a third of 900 cold keys; each holds its 300."""
    cluster.central()
    nodes = [cluster.node("us"), cluster.node("eu"), cluster.node("ap")]
    avoid_window_boundary(HOUR_MS, span_s=180)
    with httpx.Client(timeout=10.0) as client:
        for i in range(900):
            assert check(client, nodes[i % 3].url, "share", f"user-{i}")["allowed"]
        wait_until(lambda: cluster.components_total("share") == 900, what="900 in the ledger")
        block_through(client, nodes[0], "sentinel", nodes[1:])
    # 300 served + the blocked sentinel, on every node (before: 900 + 1 each).
    assert [metric(n, "regionlimit_active_keys") for n in nodes] == [301, 301, 301]
    assert [metric(n, "regionlimit_totals_ignored_total") for n in nodes] == [0, 0, 0]


def test_a_previous_release_node_still_gets_totals_on_the_shared_subject(
        cluster: Cluster) -> None:
    """Rollout: usage without the ``addr`` mark (here version 1, as a node one release
    behind sends) makes central send what it sends anywhere on ``regionlimit.totals``
    too, where such a node listens; a node of this release gets it on its own subject."""
    cluster.central()
    avoid_window_boundary(HOUR_MS, span_s=120)
    now = int(time.time() * 1000)
    policy = build_policy(limit=1000, duration="1h", algorithm="fixed_window")
    start = now - now % HOUR_MS
    old_key, new_key = "e" * 32, "f" * 32

    async def run() -> tuple[list[KeyTotal], list[KeyTotal]]:
        nc = await nats.connect(cluster.nats.url)
        shared: list[KeyTotal] = []
        addressed: list[KeyTotal] = []
        complete = asyncio.Event()

        def check_complete() -> None:
            if ({old_key, new_key} <= {t.key_hash for t in shared}
                    and new_key in {t.key_hash for t in addressed}):
                complete.set()

        async def on_shared(msg: Msg) -> None:
            shared.extend(decode_totals(msg.data).totals)
            check_complete()

        async def on_addressed(msg: Msg) -> None:
            addressed.extend(decode_totals(msg.data).totals)
            check_complete()

        await nc.subscribe(TOTALS, cb=on_shared)
        await nc.subscribe(node_totals_subject("us-new-1"), cb=on_addressed)
        js = nc.jetstream()
        await ensure_usage_stream(js)
        await js.publish(usage_subject("us"), encode_usage_v1(UsageBatch(
            "us.old-host.1", "us", now, [UsageEntry("rollout", old_key, start, 600, 0,
                                                    policy)])))
        await js.publish(usage_subject("us"), encode_usage(UsageBatch(
            "us-new-1", "us", now, [UsageEntry("rollout", new_key, start, 700, 0, policy)])))
        await asyncio.wait_for(complete.wait(), timeout=30)
        await nc.close()
        return shared, addressed

    shared, addressed = asyncio.run(run())
    assert {t.key_hash: t.total for t in shared} == {old_key: 600, new_key: 700}
    assert {t.key_hash: t.total for t in addressed} == {new_key: 700}
