"""The pure and seam-level pieces of the partitioned central: grouping by partition, the
node's publisher, forwarding, the partition count in the configuration, the replica
roster's fair share and the snapshot proxy's cursor."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from central.metrics import CentralMetrics
from central.partitions.forwarding import UsageForwarder
from central.partitions.roster import EXPIRE_S, Heartbeat, ReplicaRoster, fair_share
from central.partitions.snapshot_proxy import join_cursor, split_cursor
from central.totals_routing import LegacyNodes
from sync.errors import MalformedMessage
from sync.messages import (
    ConfigUpdate,
    UsageBatch,
    UsageEntry,
    decode_config,
    decode_usage,
    encode_config,
)
from sync.partitions import (
    MAX_PARTITIONS,
    group_by_partition,
    partition_of,
    partition_usage_subject,
)
from sync.policy import build_policy
from sync.publisher import PublishFailed, UsagePublisher

POLICY = build_policy(limit=100, duration="1h", algorithm="fixed_window")
KEYS = [f"{i:032x}" for i in range(64)]


def entries(keys: list[str]) -> list[UsageEntry]:
    return [UsageEntry("api", key, 0, i + 1, 0, POLICY) for i, key in enumerate(keys)]


class RecordingJetStream:
    """The publish seam of nats.py's JetStreamContext: records, or fails on a subject."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.published: list[tuple[str, UsageBatch]] = []
        self._fail_on = fail_on

    async def publish(self, subject: str, data: bytes, timeout: float = 0) -> None:
        if subject == self._fail_on:
            raise TimeoutError
        self.published.append((subject, decode_usage(data)))


@given(st.lists(st.sampled_from(KEYS)), st.integers(1, 64))
def test_grouping_keeps_every_item_once_in_its_partition_and_order(keys: list[str],
                                                                    n: int) -> None:
    groups = group_by_partition(keys, lambda k: ("api", k), partitions=n)
    assert sorted(k for group in groups.values() for k in group) == sorted(keys)
    for partition, group in groups.items():
        assert all(partition_of("api", k, partitions=n) == partition for k in group)
        assert group == [k for k in keys if k in set(group)]


def test_a_node_publishes_each_key_on_its_partitions_subject() -> None:
    js = RecordingJetStream()
    publisher = UsagePublisher(js, node_id="n1", region="eu", partitions=8)  # type: ignore[arg-type]
    messages = asyncio.run(publisher.publish(5, entries(KEYS)))
    assert messages == len(js.published) == len(
        {partition_of("api", k, partitions=8) for k in KEYS})
    for subject, batch in js.published:
        assert {partition_usage_subject(partition_of("api", e.key_hash, partitions=8), "eu")
                for e in batch.entries} == {subject}
    assert sorted(e.key_hash for _, b in js.published for e in b.entries) == sorted(KEYS)


def test_a_node_that_has_not_heard_the_count_publishes_on_its_regions_subject() -> None:
    js = RecordingJetStream()
    asyncio.run(UsagePublisher(js, node_id="n1", region="eu").publish(  # type: ignore[arg-type]
        5, entries(KEYS)))
    assert [subject for subject, _ in js.published] == ["regionlimit.usage.eu"]


def test_a_failed_partition_hands_back_exactly_what_was_not_published() -> None:
    by_partition = group_by_partition(KEYS, lambda k: ("api", k), partitions=4)
    failing = sorted(by_partition)[1]
    js = RecordingJetStream(fail_on=partition_usage_subject(failing, "eu"))
    publisher = UsagePublisher(js, node_id="n1", region="eu", partitions=4)  # type: ignore[arg-type]
    with pytest.raises(PublishFailed) as failed:
        asyncio.run(publisher.publish(5, entries(KEYS)))
    sent = {e.key_hash for _, b in js.published for e in b.entries}
    remaining = {e.key_hash for e in failed.value.remaining}
    assert sent | remaining == set(KEYS) and not sent & remaining
    # The partitions are published side by side: only the failed one is handed back.
    assert remaining == set(by_partition[failing])


def test_forwarding_keeps_its_own_partition_and_republishes_the_rest() -> None:
    js = RecordingJetStream()
    forwarder = UsageForwarder(js, partitions=4,  # type: ignore[arg-type]
                               metrics=CentralMetrics("test"))
    batch = UsageBatch("n1", "ignored", 7, entries(KEYS), addressed=False,
                       invalid_entries=2, invalid_reason="bad")
    own = asyncio.run(forwarder.forward(batch, region="eu", keep=2))
    assert {partition_of("api", e.key_hash, partitions=4) for e in own} == {2}
    forwarded = [e for _, b in js.published for e in b.entries]
    assert sorted(e.key_hash for e in own + forwarded) == sorted(KEYS)
    for subject, part in js.published:
        assert subject.endswith(".eu") and ".0002." not in subject
        # The node's identity and its "addressed" mark travel with its entries; the
        # refused entries were counted once, where they arrived.
        assert (part.node_id, part.flushed_at, part.addressed) == ("n1", 7, False)
        assert part.invalid_entries == 0


def test_the_partition_count_travels_with_the_configuration() -> None:
    config = ConfigUpdate(3, {}, partitions=16)
    assert decode_config(encode_config(config)) == config
    earlier = ConfigUpdate(3, {})
    assert decode_config(encode_config(earlier)).partitions is None


@pytest.mark.parametrize("bad", [0, -1, MAX_PARTITIONS + 1, "16", 2.0, True])
def test_a_bad_partition_count_in_the_configuration_is_refused(bad: Any) -> None:
    import msgpack
    data = msgpack.packb({"v": 1, "t": "config", "version": 1, "namespaces": {},
                          "partitions": bad})
    with pytest.raises(MalformedMessage, match="partitions"):
        decode_config(data)


@given(st.integers(1, MAX_PARTITIONS), st.integers(1, 64))
def test_fair_shares_cover_every_partition(partitions: int, replicas: int) -> None:
    share = fair_share(partitions, replicas)
    assert share * replicas >= partitions
    assert (share - 1) * replicas < partitions


def test_the_roster_forgets_a_silent_replica() -> None:
    now = [100.0]
    roster = ReplicaRoster("a", partitions=16, monotonic=lambda: now[0])
    assert roster.alive() == 1  # itself
    roster.heard("b")
    roster.heard("a")
    assert roster.alive() == 2
    now[0] += EXPIRE_S + 0.1
    roster.heard("a")
    assert roster.alive() == 1


@given(st.integers(0, MAX_PARTITIONS - 1), st.integers(0, 2**40))
def test_proxy_cursors_round_trip(partition: int, inner: int) -> None:
    assert split_cursor(join_cursor(partition, inner)) == (partition, inner)
    assert join_cursor(0, 0) == 0  # a node's first request starts at partition 0


def test_a_replica_with_another_partition_count_is_a_conflict_while_it_lives() -> None:
    now = [100.0]
    roster = ReplicaRoster("a", partitions=16, monotonic=lambda: now[0])
    roster.heard("b", 16)
    assert not roster.conflict
    roster.heard("c", 8)
    assert roster.conflict
    roster.heard("c", 16)  # restarted with the agreed count
    assert not roster.conflict
    roster.heard("c", 8)
    now[0] += EXPIRE_S + 0.1
    assert not roster.conflict  # gone


def test_partition0_is_led_while_a_live_replica_says_so() -> None:
    now = [100.0]
    roster = ReplicaRoster("a", partitions=16, monotonic=lambda: now[0])
    assert not roster.partition0_led  # maybe an earlier release's central holds its lock
    roster.heard("b", 16, leads_partition0=True)
    assert roster.partition0_led
    now[0] += EXPIRE_S + 0.1
    assert not roster.partition0_led  # b died with it
    roster.leads_partition0 = True
    assert roster.partition0_led


def test_old_nodes_seen_by_one_replica_make_every_replica_feed_the_shared_subject() -> None:
    now = [100.0]
    roster = ReplicaRoster("a", partitions=16, monotonic=lambda: now[0])
    legacy = LegacyNodes(elsewhere=roster.peers_see_legacy_nodes)
    assert not legacy.active(0)
    roster.heard("b", 16, sees_legacy_nodes=True)
    assert legacy.active(0) and not legacy.seen_here(0)
    roster.heard("b", 16, sees_legacy_nodes=False)
    assert not legacy.active(0)
    roster.heard("b", 16, sees_legacy_nodes=True)
    now[0] += EXPIRE_S + 0.1
    assert not legacy.active(0)  # b is gone


def test_a_replica_below_the_floor_share_is_seen_until_it_goes_silent() -> None:
    now = [100.0]
    roster = ReplicaRoster("a", partitions=16, monotonic=lambda: now[0])
    for replica, held in (("b", 4), ("c", 4), ("d", 4), ("e", 0)):
        roster.heard(replica, 16, held=held)
    assert roster.someone_below(16 // roster.alive())  # e holds 0 < 3
    roster.heard("e", 16, held=3)
    assert not roster.someone_below(3)
    roster.heard("e", 16, held=0)
    now[0] += EXPIRE_S + 0.1
    assert not roster.someone_below(3)  # e is gone


def test_a_heartbeat_round_trips_and_garbage_is_not_one() -> None:
    beat = Heartbeat(0.0, 16, leads_partition0=True, sees_legacy_nodes=False, held=5)
    assert Heartbeat.decode(beat.encode("r-1"), 7.0) == ("r-1", replace(beat, at=7.0))
    assert Heartbeat.decode(b"\xff\xfe", 0.0) is None
    assert Heartbeat.decode(b"r-1 sixteen", 0.0) is None
    assert Heartbeat.decode(b"", 0.0) is None
