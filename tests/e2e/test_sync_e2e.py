"""The sync and the ledger end to end: real nats-server, real Postgres, real processes.

Each test keeps window boundaries out of its span (hour-long windows, checked with
``avoid_window_boundary``) and awaits observable conditions instead of sleeping, except
where the scenario itself is a duration ("NATS down for 5 s").
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import nats
import pytest

from sync.messages import UsageBatch, UsageEntry, encode_usage
from sync.partitions import DEFAULT_PARTITIONS
from sync.policy import build_policy
from sync.publisher import ensure_usage_stream
from sync.subjects import usage_subject
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    avoid_window_boundary,
    check,
    metric_value,
    paced,
    partition0_holder,
    partitions_led,
    wait_until,
)
from tests.support.nats_server import NatsServer

POLICIES = """
[namespaces.hourly]
limit = 300
duration = "1h"

[namespaces.tight]
limit = 5
duration = "1h"
algorithm = "fixed_window"

[namespaces.wide]
limit = 1000000
duration = "1h"
algorithm = "fixed_window"
"""


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     policy_toml=POLICIES)
    try:
        yield system
    finally:
        system.close()


class Traffic:
    """Checks on a background thread, round-robin over nodes, until stopped."""

    def __init__(self, urls: list[str], namespace: str, identifier: str, rate: float) -> None:
        self.urls = urls
        self.namespace = namespace
        self.identifier = identifier
        self.rate = rate
        self.admitted = 0
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        wait_until(lambda: self.answered > 0, what="first answer")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            for i in paced(10**9, self.rate):
                if self._stop.is_set():
                    return
                try:
                    result = check(client, self.urls[i % len(self.urls)], self.namespace,
                                   self.identifier)
                except (httpx.HTTPError, AssertionError) as exc:
                    self.failures.append(repr(exc))
                    continue
                self.answered += 1
                self.admitted += result["allowed"]

    def wait_answers(self, count: int) -> None:
        target = self.answered + count
        wait_until(lambda: self.answered >= target, what=f"{count} more answers")


def test_three_nodes_enforce_one_limit_and_the_ledger_is_exact(cluster: Cluster) -> None:
    cluster.central()
    nodes = [cluster.node(region) for region in ("us", "eu", "ap")]
    avoid_window_boundary(HOUR_MS, span_s=60)
    admitted = 0
    with httpx.Client() as client:
        for i in paced(1200, 150.0):
            admitted += check(client, nodes[i % 3].url, "hourly", "key-three")["allowed"]
    assert 300 <= admitted <= 330

    def all_exhausted() -> bool:
        with httpx.Client() as client:
            return all(check(client, n.url, "hourly", "key-three", 0)["remaining"] == 0
                       for n in nodes)

    wait_until(all_exhausted, timeout=2.0, what="every node to report remaining 0")
    wait_until(lambda: cluster.billed("hourly") == (admitted, 1200 - admitted), timeout=15,
               what=f"ledger to bill {admitted} admitted")
    assert cluster.components_total("hourly") == admitted


def test_restarted_node_keeps_denying_a_key_at_its_limit(cluster: Cluster) -> None:
    cluster.central()
    node = cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=60)
    with httpx.Client() as client:
        results = [check(client, node.url, "tight", "key-restart") for _ in range(6)]
        assert [r["allowed"] for r in results] == [True] * 5 + [False]
        wait_until(lambda: cluster.components_total("tight") == 5, what="ledger to hold 5")
        node.stop()
        fresh = cluster.node("us")
        denied = check(client, fresh.url, "tight", "key-restart")
    assert denied["allowed"] is False
    assert denied["retry_after_ms"] > 0


def test_nats_down_for_five_seconds_loses_nothing(cluster: Cluster) -> None:
    cluster.central()
    nodes = [cluster.node("us"), cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=60)
    with Traffic([n.url for n in nodes], "wide", "key-nats", rate=100) as traffic:
        traffic.wait_answers(50)
        cluster.nats.kill()
        answered_before = traffic.answered
        time.sleep(5.0)  # the scenario: NATS away for five seconds
        assert traffic.answered > answered_before + 100  # checks kept being answered
        cluster.nats.start()
        traffic.wait_answers(100)
    assert traffic.failures == []
    wait_until(lambda: cluster.billed("wide")[0] == traffic.admitted, timeout=30,
               what=f"ledger to bill {traffic.admitted}")
    assert traffic.admitted == traffic.answered


def test_graceful_stop_without_nats_spills_and_the_next_start_publishes(
        cluster: Cluster) -> None:
    cluster.central()
    node = cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=60)
    with httpx.Client() as client:
        for _ in range(50):
            assert check(client, node.url, "wide", "key-spill")["allowed"]
        wait_until(lambda: cluster.billed("wide")[0] == 50, what="first 50 billed")
        cluster.nats.kill()
        for _ in range(30):
            assert check(client, node.url, "wide", "key-spill")["allowed"]
    assert node.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean stop
    assert (cluster.tmp / "spill-us.msgpack").exists()
    cluster.nats.start()
    cluster.node("us")
    wait_until(lambda: cluster.billed("wide")[0] == 80, timeout=30, what="80 billed")
    wait_until(lambda: not (cluster.tmp / "spill-us.msgpack").exists(),
               what="spill file removed after publication")


def test_central_killed_mid_ingest_recounts_nothing(cluster: Cluster) -> None:
    central = cluster.central()
    nodes = [cluster.node("us"), cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=60)
    with Traffic([n.url for n in nodes], "wide", "key-crash", rate=200) as traffic:
        traffic.wait_answers(200)
        central.kill()
        traffic.wait_answers(200)
        cluster.central()
        traffic.wait_answers(200)
    assert traffic.failures == []
    wait_until(lambda: cluster.billed("wide")[0] == traffic.admitted, timeout=30,
               what=f"ledger to bill {traffic.admitted}")
    assert cluster.components_total("wide") == traffic.admitted


def test_killing_the_leader_hands_over_to_the_other_replica(cluster: Cluster) -> None:
    replicas = [cluster.central(), cluster.central()]
    # Both lead some of the partitions; the one leading partition 0 is killed.
    leader = wait_until(lambda: partition0_holder(replicas), what="one holder of partition 0")
    standby = replicas[1 - replicas.index(leader)]
    node = cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=60)
    with Traffic([node.url], "wide", "key-handover", rate=100) as traffic:
        traffic.wait_answers(100)
        leader.kill()
        wait_until(lambda: partitions_led(standby) == list(range(DEFAULT_PARTITIONS)),
                   timeout=20, what="the other replica to lead every partition")
        traffic.wait_answers(100)
    wait_until(lambda: cluster.billed("wide")[0] == traffic.admitted, timeout=30,
               what=f"ledger to bill {traffic.admitted}")


# --- messages published by hand ------------------------------------------------------------

def publish(nats_url: str, payloads: list[bytes], *, subject: str = usage_subject("hand")
            ) -> None:
    """Publish usage messages; by default on the per-region subject an earlier release's
    node uses (central splits it by partition)."""
    async def run() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_usage_stream(js)
        for payload in payloads:
            await js.publish(subject, payload)
        await nc.close()
    asyncio.run(run())


def batch(node_id: str, key: str, admitted: int, *, flushed_at: int | None = None,
          window_start: int | None = None) -> bytes:
    now = int(time.time() * 1000)
    policy = build_policy(limit=1000, duration="1h", algorithm="fixed_window")
    start = window_start if window_start is not None else now - now % HOUR_MS
    entry = UsageEntry("hand", key, start, admitted, 0, policy)
    return encode_usage(UsageBatch(node_id, "hand", flushed_at or now, [entry]))


def key_billed(cluster: Cluster, key: str) -> int:
    rows = cluster.query("SELECT COALESCE(SUM(admitted), 0) FROM usage_hourly "
                         "WHERE key_hash = :k", k=key)
    return int(rows[0][0])


def test_duplicate_and_reordered_batches_change_nothing(cluster: Cluster) -> None:
    cluster.central()
    key, sentinel = "a" * 32, "b" * 32
    avoid_window_boundary(HOUR_MS, span_s=60)
    publish(cluster.nats.url, [batch("hand.1", key, 5), batch("hand.1", key, 5),
                               batch("hand.1", key, 7), batch("hand.1", key, 3),
                               batch("hand.1", key, 7)])
    wait_until(lambda: key_billed(cluster, key) == 7, what="max of the batches billed")
    publish(cluster.nats.url, [batch("hand.1", key, 6), batch("hand.2", sentinel, 1)])
    wait_until(lambda: key_billed(cluster, sentinel) == 1, what="sentinel ingested")
    assert key_billed(cluster, key) == 7
    assert cluster.components_total("hand") == 8


def test_garbage_on_the_usage_subject_is_dropped_and_counted(cluster: Cluster) -> None:
    central = cluster.central()
    avoid_window_boundary(HOUR_MS, span_s=60)
    old_window = int(time.time() * 1000) - 10 * 86_400_000
    old_window -= old_window % HOUR_MS
    publish(cluster.nats.url, [
        b"\xc1 not msgpack", b"", msgpack.packb({"v": 2, "t": "usage", "node": 7}),
        msgpack.packb({"v": 99, "t": "usage"}),
        batch("hand.1", "c" * 32, 4, window_start=old_window),
        batch("hand.1", "d" * 32, 1),
    ])
    wait_until(lambda: key_billed(cluster, "d" * 32) == 1, what="the valid batch billed")
    metrics = httpx.get(central.url + "/metrics").text
    assert metric_value(metrics, "regionlimit_messages_malformed_total") == 3
    assert metric_value(metrics, "regionlimit_messages_rejected_total",
                        reason="pruned_window") == 1
    assert metric_value(metrics, "regionlimit_messages_newer_version_total") >= 1
    assert key_billed(cluster, "c" * 32) == 0
    assert central.proc is not None and central.proc.poll() is None
