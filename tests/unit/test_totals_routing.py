"""Where a tick's changed totals go (central/totals_routing.py). Pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from central.settings import CentralSettings
from central.totals_routing import LEGACY_QUIET_MS, TotalsRouter
from sync.messages import KeyTotal, UsageBatch
from sync.partitions import node_totals_subject, partition_of, partition_totals_subject
from sync.policy import Policy, build_policy
from sync.subjects import TOTALS

NOW = 1_800_000_000_000
FIXED = build_policy(limit=100, duration="1h", algorithm="fixed_window")
SLIDING = build_policy(limit=100, duration="1h", algorithm="sliding_window")
BUCKET = build_policy(limit=100, duration="1h", algorithm="token_bucket")
KEY = "0123456789abcdef0123456789abcdef"


def total(admitted: dict[str, int], *, policy: Policy = FIXED, blocked_until: int = 0) -> KeyTotal:
    return KeyTotal("ns", KEY, NOW - NOW % 3_600_000, sum(admitted.values()), admitted,
                    blocked_until, policy)


def routed(router: TotalsRouter, *totals: KeyTotal) -> dict[str, int]:
    return {s: len(t) for s, t in router.route(totals, NOW).by_subject.items()}


def test_cold_keys_go_nowhere_hot_ones_to_their_serving_nodes_blocked_to_all() -> None:
    router = TotalsRouter(share=0.5, partitions=16)
    assert routed(router, total({"a": 30, "b": 19})) == {}
    assert routed(router, total({"a": 30, "b": 20})) == {
        node_totals_subject("a"): 1, node_totals_subject("b"): 1}
    part = partition_totals_subject(partition_of("ns", KEY, partitions=16))
    assert routed(router, total({"a": 60, "b": 40}, blocked_until=NOW + 1)) == {part: 1}
    # A block whose window has ended blocks nothing: hot, to its nodes.
    assert routed(router, total({"a": 100}, blocked_until=NOW)) == {
        node_totals_subject("a"): 1}
    out = router.route([total({"a": 30, "b": 20}), total({"a": 1}, blocked_until=NOW + 1)],
                       NOW)
    assert (out.addressed, out.broadcast) == (2, 1)


@given(st.dictionaries(st.sampled_from("abc"), st.integers(1, 150), min_size=1),
       st.sampled_from([FIXED, SLIDING, BUCKET]), st.sampled_from([0.0, 0.5, 1.0]),
       st.sampled_from([0, NOW, NOW + 1]))
def test_wanted_is_exactly_what_route_sends_somewhere(admitted: dict[str, int], policy: Policy,
                                                      share: float, blocked_until: int) -> None:
    # The tick skips building the totals ``wanted`` rejects: it must never reject one that
    # ``route`` would have sent.
    router = TotalsRouter(share=share, partitions=16)
    key_total = total(admitted, policy=policy, blocked_until=blocked_until)
    assert router.wanted(total=key_total.total, policy=policy, blocked_until=blocked_until,
                         now=NOW) == bool(routed(router, key_total))


def test_only_fixed_windows_wait_for_the_share() -> None:
    router = TotalsRouter(share=0.5, partitions=16)
    for policy in (SLIDING, BUCKET):
        assert routed(router, total({"a": 1}, policy=policy)) == {node_totals_subject("a"): 1}
    assert routed(TotalsRouter(share=0.0, partitions=16), total({"a": 1})) == {
        node_totals_subject("a"): 1}
    assert routed(TotalsRouter(share=1.0, partitions=16), total({"a": 99})) == {}


def test_previous_release_nodes_get_the_shared_subject_while_they_send_usage() -> None:
    router = TotalsRouter(share=0.5, partitions=16)
    hot = total({"a": 60})
    router.legacy.saw(UsageBatch("old.host.1", "eu", NOW - 1000, [], addressed=False))
    assert routed(router, hot, total({"a": 1})) == {node_totals_subject("a"): 1, TOTALS: 1}
    router.legacy.saw(UsageBatch("old.host.1", "eu", NOW - LEGACY_QUIET_MS, [],
                                 addressed=False))
    assert routed(router, hot) == {node_totals_subject("a"): 1}
    # A serving node whose id is no subject token is reached on the shared subject.
    assert routed(router, total({"old.host.2": 60})) == {TOTALS: 1}
    # A node that upgraded (addressed batches) stops counting as legacy.
    router.legacy.saw(UsageBatch("n", "eu", NOW, [], addressed=False))
    router.legacy.saw(UsageBatch("n", "eu", NOW, [], addressed=True))
    assert not router.legacy.active(NOW)


def test_central_reads_the_share_and_the_partition_count(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("REGIONLIMIT_BROADCAST_SHARE", "0.25")
    monkeypatch.setenv("REGIONLIMIT_PARTITIONS", "4")
    settings = CentralSettings()
    assert (settings.broadcast_share, settings.partitions) == (0.25, 4)
    monkeypatch.setenv("REGIONLIMIT_BROADCAST_SHARE", "1.5")
    with pytest.raises(ValidationError, match="broadcast_share"):
        CentralSettings()
