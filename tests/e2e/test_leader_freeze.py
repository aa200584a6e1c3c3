"""A frozen leader (SIGSTOP: its TCP sessions stay open, so Postgres keeps its advisory
lock) is replaced by the standby within the lease timeout; once resumed (SIGCONT) it
finds its session terminated, steps down, and writes nothing: every check is billed
exactly once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from sync.partitions import partition_token
from sync.subjects import USAGE_CONSUMER, USAGE_STREAM
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    admin,
    avoid_window_boundary,
    check,
    wait_until,
)
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess

NAMESPACE = "frozen"

# The old leader naks the usage it holds as it steps down, but usage that reached it
# while frozen and was never fetched comes back only after central's ack wait (60 s),
# hence the generous deadline.
REDELIVERY_DEADLINE_S = 150.0


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     env={"REGIONLIMIT_LEASE_TIMEOUT": "3s",
                          "REGIONLIMIT_COMMIT_INTERVAL": "200ms",
                          # One partition: one leader, one standby (partition handover:
                          # test_partition_handover.py).
                          "REGIONLIMIT_PARTITIONS": "1"})
    try:
        yield system
    finally:
        for proc in system.processes:  # a stopped process ignores SIGKILL until resumed
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGCONT)
        system.close()


def is_leader(central: ManagedProcess) -> bool:
    try:
        return bool(httpx.get(central.url + "/readyz", timeout=2).json()["leader"])
    except httpx.HTTPError:
        return False  # a frozen process does not answer


def jetstream_state(url: str) -> str:
    """The usage consumer's and stream's state, so a failure explains where usage is."""
    async def read() -> str:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            consumer = await js.consumer_info(USAGE_STREAM,
                                              f"{USAGE_CONSUMER}-p{partition_token(0)}")
            stream = await js.stream_info(USAGE_STREAM)
        finally:
            await nc.close()
        return (f"consumer: ack_pending={consumer.num_ack_pending} "
                f"pending={consumer.num_pending} waiting={consumer.num_waiting} "
                f"redelivered={consumer.num_redelivered} delivered={consumer.delivered} "
                f"ack_floor={consumer.ack_floor}\n"
                f"stream: messages={stream.state.messages} first_seq={stream.state.first_seq} "
                f"last_seq={stream.state.last_seq}")
    try:
        return asyncio.run(read())
    except Exception as exc:  # a diagnostic must not hide the failure it explains
        return f"JetStream state unavailable ({exc!r})"


def billed_exactly(cluster: Cluster, cost: int) -> bool:
    return cluster.components_total(NAMESPACE) == cost and \
        cluster.billed(NAMESPACE) == (cost, 0)


# The window-boundary wait (up to twice the deadline) comes on top of the test's own span.
@pytest.mark.timeout(REDELIVERY_DEADLINE_S * 5)
def test_a_frozen_leader_is_replaced_and_fenced(cluster: Cluster) -> None:
    first = cluster.central()
    wait_until(lambda: is_leader(first), what="the first replica leads")
    second = cluster.central()
    response = admin(first.url, "PUT", f"/v1/namespaces/{NAMESPACE}",
                     {"limit": 100_000, "duration": "1h", "algorithm": "fixed_window"})
    assert response.status_code == 200, response.text
    node = cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=REDELIVERY_DEADLINE_S * 2)
    client = httpx.Client(timeout=10)
    wait_until(lambda: client.post(node.url + "/v1/check", json={
        "namespace": NAMESPACE, "identifier": "probe", "cost": 0}).status_code == 200,
        what="namespace configured on the node")

    for _ in range(5):
        assert check(client, node.url, NAMESPACE, "alice")["allowed"]
    wait_until(lambda: billed_exactly(cluster, 5), timeout=60, what="5 billed")

    # Usage in flight while the leader freezes: it may hold some merged, uncommitted.
    for _ in range(3):
        assert check(client, node.url, NAMESPACE, "bob")["allowed"]
    assert first.proc is not None
    first.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: is_leader(second), timeout=60,
                   what=f"the standby takes over\n{second.log()}")
        for _ in range(7):
            assert check(client, node.url, NAMESPACE, "carol")["allowed"]
        wait_until(lambda: cluster.components_total(NAMESPACE) >= 5 + 7, timeout=60,
                   what="the new leader ingests")
    finally:
        first.proc.send_signal(signal.SIGCONT)

    # Resumed, the old leader notices its lost lease and writes nothing.
    wait_until(lambda: "leader lease lost" in first.log(), timeout=60,
               what=f"the old leader steps down\n{first.log()}")
    wait_until(lambda: not is_leader(first), timeout=30,
               what=f"old leader reports standby\n{first.log()[-6000:]}")
    assert is_leader(second)
    for _ in range(4):
        assert check(client, node.url, NAMESPACE, "dave")["allowed"]
    try:
        wait_until(lambda: billed_exactly(cluster, 5 + 3 + 7 + 4),
                   timeout=REDELIVERY_DEADLINE_S, what="every check billed exactly once")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: components {cluster.components_total(NAMESPACE)}, billed "
            f"{cluster.billed(NAMESPACE)}\n{jetstream_state(cluster.nats.url)}\n"
            f"--- old leader\n{first.log()[-4000:]}\n--- new leader\n"
            f"{second.log()[-4000:]}\n--- node\n{node.log()[-3000:]}") from None
    assert is_leader(second) and not is_leader(first)
    assert billed_exactly(cluster, 19)
