"""Central's in-memory totals (central/totals.py): max-merge, hourly increments, blocks,
over-admission, rejections, persistence hand-off, load, prune, live keys.

Pure: batches are built in memory, every call takes an explicit ``now`` (epoch ms).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.ledger import BucketIncrement, ComponentRow
from central.partitions.snapshot_index import SnapshotIndex
from central.totals import (
    FUTURE_TOLERANCE_MS,
    MAX_NAMESPACE_LABELS,
    CheckpointBatch,
    GlobalTotals,
    WindowKey,
)
from sync.messages import KeyTotal, UsageBatch, UsageEntry, decode_usage, encode_usage
from sync.policy import Policy, build_policy
from sync.windows import HOUR_MS, hour_start, window_bounds

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DAY = 86_400_000
RETENTION = 7 * DAY
# 2024-06-01 00:00 UTC plus 20m 30s: far from hour and minute boundaries.
T0 = 1_717_200_000_000 + 20 * 60_000 + 30_000
K1 = "0123456789abcdef0123456789abcdef"
K2 = "fedcba9876543210fedcba9876543210"
FIXED = build_policy(limit=10, duration="1h", algorithm="fixed_window")
SLIDING = build_policy(limit=10, duration="1h", algorithm="sliding_window")
BUCKET = build_policy(limit=10, duration="1h", algorithm="token_bucket", burst=20)
MINUTE = build_policy(limit=5, duration="1m", algorithm="fixed_window")


def start_of(policy: Policy, now: int = T0) -> int:
    return window_bounds(policy.duration, now)[0]


def end_of(policy: Policy, now: int = T0) -> int:
    return window_bounds(policy.duration, now)[1]


def entry(admitted: int, denied: int = 0, *, policy: Policy = FIXED, ns: str = "ns",
          key: str = K1, start: int | None = None) -> UsageEntry:
    return UsageEntry(ns, key, start_of(policy) if start is None else start, admitted, denied,
                      policy)


def batch(node: str, flushed_at: int, *entries: UsageEntry, region: str | None = None
          ) -> UsageBatch:
    return UsageBatch(node, region or node.split("-")[0], flushed_at, list(entries))


def totals() -> GlobalTotals:
    return GlobalTotals(retention_ms=RETENTION)


def snapshot(g: GlobalTotals) -> dict[tuple[str, str, int], KeyTotal]:
    return {key: g.key_total(key) for key in g.windows}


def without_as_of(g: GlobalTotals) -> dict[tuple[str, str, int], KeyTotal]:
    return {k: replace(t, as_of=0) for k, t in snapshot(g).items()}


def increments(g: GlobalTotals) -> dict[tuple[str, str, str, int], tuple[int, int]]:
    _, incs = g.take_unsaved(T0)
    return {inc.key: (inc.admitted, inc.denied) for inc in incs}


def sorted_rows(rows: list[ComponentRow]) -> list[ComponentRow]:
    return sorted(rows, key=lambda r: r.key)


def sorted_incs(incs: list[BucketIncrement]) -> list[BucketIncrement]:
    return sorted(incs, key=lambda i: i.key)


# --- merging ---------------------------------------------------------------------------


def test_merge_records_components_and_total() -> None:
    g = totals()
    out = g.merge(batch("eu-1", T0, entry(3, 1)), T0)
    out2 = g.merge(batch("us-1", T0 + 10, entry(4)), T0)
    assert out.raised == 1 and out2.raised == 1 and not out.rejected
    t = g.key_total(("ns", K1, start_of(FIXED)))
    assert t.total == 7
    assert t.components == {"eu-1": 3, "us-1": 4}
    assert t.as_of == T0 + 10
    assert t.policy == FIXED and t.blocked_until == 0


def test_same_batch_twice_changes_nothing() -> None:
    g = totals()
    b = batch("eu-1", T0, entry(3, 2), entry(1, key=K2), entry(5, policy=SLIDING, ns="s"))
    assert g.merge(b, T0).raised == 3
    before = snapshot(g)
    assert len(g.take_changed()) == 3
    rows, incs = g.take_unsaved(T0)
    assert len(rows) == 3 and len(incs) == 3
    out = g.merge(b, T0 + 5)
    assert out.raised == 0 and not out.rejected
    assert snapshot(g) == before
    assert g.take_changed() == []
    assert g.take_unsaved(T0) == ([], [])
    assert g.unsaved == 0


def test_lower_cumulative_value_after_a_higher_one_changes_nothing() -> None:
    g = totals()
    g.merge(batch("eu-1", T0 + 100, entry(8, 3)), T0)
    g.take_changed()
    incs_before = increments(g)
    out = g.merge(batch("eu-1", T0 + 50, entry(5, 1)), T0)  # reordered, older batch
    assert out.raised == 0
    t = g.key_total(("ns", K1, start_of(FIXED)))
    assert t.total == 8 and t.components == {"eu-1": 8}
    assert g.take_changed() == []
    assert incs_before == {("ns", K1, "eu", hour_start(T0)): (8, 3)}
    assert increments(g) == {}


def test_denied_rises_alone_and_is_tracked_apart() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(4, 0)), T0)
    out = g.merge(batch("eu-1", T0 + 1, entry(4, 6)), T0)
    assert out.raised == 1
    t = g.key_total(("ns", K1, start_of(FIXED)))
    assert t.total == 4  # denied never counts toward the total
    assert t.as_of == T0  # only admitted moves as_of
    assert increments(g) == {("ns", K1, "eu", hour_start(T0)): (4, 6)}


def test_total_is_the_sum_of_component_admitted() -> None:
    g = totals()
    for i, n in enumerate([3, 1, 4, 1, 5]):
        g.merge(batch(f"r{i}-node", T0 + i, entry(n, 9)), T0)
    t = g.key_total(("ns", K1, start_of(FIXED)))
    assert t.total == sum(t.components.values()) == 14


def test_increments_go_to_the_hour_of_the_batch_that_raised_the_maximum() -> None:
    start = start_of(build_policy(limit=100, duration="1d", algorithm="fixed_window"))
    daily = build_policy(limit=100, duration="1d", algorithm="fixed_window")
    h1, h2, h3 = start + 2 * HOUR_MS + 5, start + 3 * HOUR_MS + 7, start + 5 * HOUR_MS
    now = start + 6 * HOUR_MS
    g = totals()
    g.merge(batch("eu-1", h1, entry(3, 1, policy=daily)), now)
    g.merge(batch("eu-1", h2, entry(5, 1, policy=daily)), now)
    g.merge(batch("eu-1", h3, entry(5, 4, policy=daily)), now)
    g.merge(batch("eu-1", h3 + 1, entry(5, 4, policy=daily)), now)  # duplicate content
    assert increments(g) == {
        ("ns", K1, "eu", hour_start(h1)): (3, 1),
        ("ns", K1, "eu", hour_start(h2)): (2, 0),
        ("ns", K1, "eu", hour_start(h3)): (0, 3),
    }
    # Reordered: the newest batch first raises everything, in its own hour.
    g = totals()
    g.merge(batch("eu-1", h3, entry(5, 4, policy=daily)), now)
    g.merge(batch("eu-1", h1, entry(3, 1, policy=daily)), now)
    assert increments(g) == {("ns", K1, "eu", hour_start(h3)): (5, 4)}


def test_increments_are_per_region() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(2)), T0)
    g.merge(batch("eu-2", T0, entry(3)), T0)
    g.merge(batch("us-1", T0, entry(4)), T0)
    assert increments(g) == {("ns", K1, "eu", hour_start(T0)): (5, 0),
                             ("ns", K1, "us", hour_start(T0)): (4, 0)}


# --- policies, blocks, over-admission --------------------------------------------------


def test_newest_batch_policy_decides_the_limit() -> None:
    loose = build_policy(limit=100, duration="1h", algorithm="fixed_window")
    key = ("ns", K1, start_of(FIXED))
    g = totals()
    g.merge(batch("eu-1", T0 + 10, entry(12, policy=loose)), T0)
    assert g.key_total(key).blocked_until == 0
    g.merge(batch("us-1", T0 + 5, entry(1, policy=FIXED)), T0)  # older: its policy loses
    assert g.key_total(key).policy == loose
    assert g.key_total(key).blocked_until == 0
    g.merge(batch("us-1", T0 + 20, entry(1, policy=FIXED)), T0)  # newer, nothing raised
    assert g.key_total(key).policy == FIXED
    assert g.key_total(key).blocked_until == end_of(FIXED)


@pytest.mark.parametrize("policy", [FIXED, SLIDING, MINUTE])
def test_blocked_until_window_end_once_total_reaches_limit(policy: Policy) -> None:
    g = totals()
    key = ("ns", K1, start_of(policy))
    g.merge(batch("eu-1", T0, entry(policy.limit - 2, policy=policy)), T0)
    assert g.key_total(key).blocked_until == 0
    g.merge(batch("us-1", T0, entry(1, policy=policy)), T0)
    assert g.key_total(key).blocked_until == 0
    g.merge(batch("ap-1", T0, entry(1, policy=policy)), T0)
    assert g.key_total(key).total == policy.limit
    assert g.key_total(key).blocked_until == end_of(policy)
    assert [t.blocked_until for t in g.take_changed()] == [end_of(policy)]


def test_token_bucket_is_never_blocked_nor_over_admitted() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(500, policy=BUCKET)), T0)
    assert g.key_total(("ns", K1, start_of(BUCKET))).blocked_until == 0
    assert g.over_admission == {}


def test_over_admission_is_total_beyond_limit_summed_over_windows() -> None:
    g = totals()
    prev_start = start_of(FIXED) - HOUR_MS
    g.merge(batch("eu-1", T0, entry(7), entry(12, start=prev_start)), T0)
    assert g.over_admission == {"ns": 2}
    g.merge(batch("us-1", T0, entry(6)), T0)  # 13 > 10
    assert g.over_admission == {"ns": 5}
    g.merge(batch("us-1", T0, entry(6)), T0)  # duplicate
    g.merge(batch("us-1", T0 + 1, entry(8, 30)), T0)  # 15; denied doesn't count
    g.merge(batch("eu-1", T0, entry(9, key=K2), entry(11, ns="other.ns")), T0)
    assert g.over_admission == {"ns": 7, "other.ns": 1}


@st.composite
def over_admission_batches(draw: st.DrawFn) -> list[UsageBatch]:
    """Batches over 3 namespaces x 2 keys x 2 windows with one fixed policy per key."""
    out = []
    for i in range(draw(st.integers(1, 12))):
        node = draw(st.sampled_from(["eu-1", "eu-2", "us-1"]))
        entries = []
        for ns, key, back in draw(st.sets(st.tuples(st.sampled_from(["a", "b", "c"]),
                                                    st.sampled_from([K1, K2]),
                                                    st.sampled_from([0, 1])), max_size=6)):
            policy = SLIDING if key == K2 else FIXED
            entries.append(entry(draw(st.integers(0, 15)), policy=policy, ns=ns, key=key,
                                 start=start_of(FIXED) - back * HOUR_MS))
        out.append(batch(node, T0 + i, *entries))
    return out


@PROPERTY
@given(batches=over_admission_batches(), data=st.data())
def test_over_admission_matches_final_totals_in_any_order(
        batches: list[UsageBatch], data: st.DataObject) -> None:
    g = totals()
    for b in data.draw(st.permutations(batches)):
        g.merge(b, T0)
    expected: Counter[str] = Counter()
    for (ns, _, _), window in g.windows.items():
        expected[ns] += max(0, window.total - window.policy.limit)
    assert g.over_admission == {ns: n for ns, n in expected.items() if n}


def test_namespace_labels_are_capped() -> None:
    g = totals()
    names = [f"inline-{i}" for i in range(MAX_NAMESPACE_LABELS + 5)]
    for name in names:
        g.merge(batch("eu-1", T0, entry(11, ns=name)), T0)
    g.merge(batch("eu-1", T0 + 1, entry(12, ns=names[0])), T0)  # labelled one stays
    g.merge(batch("eu-1", T0 + 1, entry(13, ns=names[-1])), T0)
    expected = {name: 1 for name in names[:MAX_NAMESPACE_LABELS]}
    expected[names[0]] = 2
    expected["other"] = 5 + 2
    assert g.over_admission == expected
    assert g.label(names[3]) == names[3]
    assert g.label("brand-new") == "other"


# --- rejections ------------------------------------------------------------------------


def test_misaligned_window_is_rejected() -> None:
    g = totals()
    out = g.merge(batch("eu-1", T0, entry(1, start=start_of(FIXED) + 1), entry(2)), T0)
    assert out.rejected == {"misaligned_window": 1}
    assert out.raised == 1
    assert list(g.windows) == [("ns", K1, start_of(FIXED))]


def test_pruned_window_is_rejected_at_end_plus_retention() -> None:
    start, end = start_of(MINUTE), end_of(MINUTE)
    g = totals()
    out = g.merge(batch("eu-1", T0, entry(1, policy=MINUTE)), end + RETENTION - 1)
    assert out.rejected == {} and out.raised == 1
    g = totals()
    out = g.merge(batch("eu-1", T0, entry(1, policy=MINUTE), entry(1, policy=MINUTE, key=K2)),
                  end + RETENTION)
    assert out.rejected == {"pruned_window": 2} and out.raised == 0
    assert g.windows == {}
    assert (start, end) == window_bounds(MINUTE.duration, start)


def test_future_window_is_rejected_beyond_tolerance() -> None:
    g = totals()
    now = start_of(MINUTE) - FUTURE_TOLERANCE_MS
    out = g.merge(batch("eu-1", now, entry(1, policy=MINUTE)), now)  # exactly at tolerance
    assert out.rejected == {} and out.raised == 1
    g = totals()
    out = g.merge(batch("eu-1", now - 1, entry(1, policy=MINUTE)), now - 1)
    assert out.rejected == {"future_window": 1}
    assert g.windows == {} and g.take_changed() == []


def test_rejection_reasons_are_counted_per_entry() -> None:
    g = totals()
    far = start_of(MINUTE) + 2 * FUTURE_TOLERANCE_MS
    out = g.merge(batch("eu-1", T0,
                        entry(1, policy=MINUTE, start=far),
                        entry(1, policy=MINUTE, start=start_of(MINUTE) - RETENTION - 60_000),
                        entry(1, policy=MINUTE, start=start_of(MINUTE) + 7),
                        entry(1, policy=MINUTE, start=start_of(MINUTE) + 13),
                        entry(1, policy=MINUTE)), T0)
    assert out.rejected == {"future_window": 1, "pruned_window": 1, "misaligned_window": 2}
    assert out.raised == 1


MONTHLY = build_policy(limit=10, duration="month", algorithm="fixed_window")


def test_month_entry_with_huge_window_start_is_rejected_not_raised() -> None:
    b = batch("eu-1", T0, entry(1, policy=MONTHLY, start=2**63))
    out = totals().merge(b, T0)
    assert out.raised == 0
    assert out.rejected == {"future_window": 1}
    decoded = decode_usage(encode_usage(b))  # and it does not even get past the decoder
    assert (decoded.entries, decoded.invalid_entries) == ([], 1)


def test_huge_window_start_with_fixed_length_is_rejected() -> None:
    out = totals().merge(batch("eu-1", T0, entry(1, policy=MINUTE, start=(2**63 // 60_000)
                                                 * 60_000)), T0)
    assert out.rejected == {"future_window": 1}


def test_a_newer_duration_at_the_same_start_takes_over_the_window() -> None:
    # A node whose policy changes from 1m to 1h at a shared window start carries its
    # count over (sync.algorithms.base.advance), so it reports 5 + 3 = 8.
    start = start_of(FIXED)  # an hour start is also a minute start
    minute = build_policy(limit=100, duration="1m", algorithm="fixed_window")
    hourly = build_policy(limit=4, duration="1h", algorithm="fixed_window")
    g = totals()
    g.merge(batch("eu-1", start + 10_000, entry(5, policy=minute, start=start)), T0)
    g.merge(batch("eu-1", T0, entry(8, policy=hourly, start=start)), T0)
    assert sum(a for a, _ in increments(g).values()) == 8
    hour_windows = [w for w in g.windows.values() if w.policy == hourly]
    assert [w.window_end for w in hour_windows] == [start + HOUR_MS]


# --- commutativity ---------------------------------------------------------------------

NODES = {"eu-1": "eu", "eu-2": "eu", "us-1": "us"}
POLICIES = [FIXED, SLIDING, BUCKET,
            build_policy(limit=3, duration="1h", algorithm="fixed_window"),
            build_policy(limit=4, duration="20m", algorithm="sliding_window")]


@st.composite
def batch_sets(draw: st.DrawFn) -> list[UsageBatch]:
    """Batches from three nodes over two hours, with distinct flush times (the newest
    batch's policy is then well defined), any values, any policies."""
    n = draw(st.integers(1, 10))
    times = draw(st.lists(st.integers(T0 - HOUR_MS, T0 + 30 * 60_000), min_size=n, max_size=n,
                          unique=True))
    out = []
    for flushed_at in times:
        node = draw(st.sampled_from(sorted(NODES)))
        entries = []
        for key, ns in draw(st.sets(st.tuples(st.sampled_from([K1, K2]),
                                              st.sampled_from(["a", "b"])), max_size=4)):
            policy = draw(st.sampled_from(POLICIES))
            start = start_of(policy, T0) - draw(st.sampled_from([0, 0, 1])) * HOUR_MS
            admitted = draw(st.integers(0, 12))
            # A node publishes only key-windows with some cost: never 0 and 0.
            denied = draw(st.integers(0 if admitted else 1, 5))
            entries.append(entry(admitted, denied, policy=policy, ns=ns, key=key, start=start))
        out.append(UsageBatch(node, NODES[node], flushed_at, entries))
    return out


def merged(batches: list[UsageBatch]) -> GlobalTotals:
    g = totals()
    for b in batches:
        g.merge(b, T0)
    return g


def increment_sums(incs: list[BucketIncrement]) -> dict[tuple[str, str, str], tuple[int, int]]:
    sums: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for inc in incs:
        s = sums[(inc.namespace, inc.key_hash, inc.region)]
        s[0] += inc.admitted
        s[1] += inc.denied
    return {k: (a, d) for k, (a, d) in sums.items() if a or d}


@PROPERTY
@given(batches=batch_sets(), data=st.data())
def test_merge_is_commutative(batches: list[UsageBatch], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(batches))
    a, b = merged(batches), merged(shuffled)
    # as_of is left out: it is the flush time of the batch that first reached a maximum,
    # which depends on arrival order when a node repeats a value (it only feeds a metric).
    assert without_as_of(a) == without_as_of(b)
    rows_a, incs_a = a.take_unsaved(T0)
    rows_b, incs_b = b.take_unsaved(T0)
    assert sorted_rows(rows_a) == sorted_rows(rows_b)
    assert increment_sums(incs_a) == increment_sums(incs_b)
    # Every increment adds up to the components' maxima, per key and region.
    maxima: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for key in a.windows:
        for node, (admitted, denied) in a.table.components_of(*key).items():
            m = maxima[(key[0], key[1], node.split("-")[0])]
            m[0] += admitted
            m[1] += denied
    assert increment_sums(incs_a) == {k: (x, y) for k, (x, y) in maxima.items() if x or y}
    # Each component is the maximum its node ever sent; each total the sum of them.
    expected: dict[tuple[str, str, int], dict[str, int]] = defaultdict(dict)
    for bt in batches:
        for e in bt.entries:
            comps = expected[(e.namespace, e.key_hash, e.window_start)]
            comps[bt.node_id] = max(comps.get(bt.node_id, 0), e.admitted)
    for key, t in snapshot(a).items():
        assert {n: v for n, v in t.components.items() if v} == {
            n: v for n, v in expected[key].items() if v}
        assert t.total == sum(expected[key].values())


@PROPERTY
@given(batches=batch_sets(), data=st.data())
def test_merging_again_in_any_order_changes_nothing(
        batches: list[UsageBatch], data: st.DataObject) -> None:
    g = merged(batches)
    before = snapshot(g)
    g.take_changed()
    g.take_unsaved(T0)
    over = dict(g.over_admission)
    for b in data.draw(st.permutations(batches)):
        assert g.merge(b, T0).raised == 0
    assert snapshot(g) == before
    assert g.take_changed() == []
    assert g.take_unsaved(T0) == ([], [])
    assert g.over_admission == over


# --- persisting: checkpoints, load --------------------------------------


def test_take_unsaved_rows_carry_the_window_policy_and_counts() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(3, 1, policy=BUCKET)), T0)
    rows, incs = g.take_unsaved(T0 + 7)
    assert rows == [ComponentRow("ns", K1, start_of(BUCKET), "eu-1", "eu", end_of(BUCKET), 3, 1,
                                 10, "1h", "token_bucket", 20, T0 + 7)]
    assert incs == [BucketIncrement("ns", K1, "eu", hour_start(T0), 3, 1)]
    assert g.unsaved == 0


def take(g: GlobalTotals) -> CheckpointBatch:
    return g.take_checkpoint(max_rows=1 << 30, max_buckets=1 << 30, now=T0)


@PROPERTY
@given(first=batch_sets(), second=batch_sets())
def test_a_released_checkpoint_restores_exactly(first: list[UsageBatch],
                                                second: list[UsageBatch]) -> None:
    control = merged(first)
    g = merged(first)
    taken = take(g)
    g.release(taken)
    assert g.unsaved == control.unsaved
    again = take(g)
    assert sorted_rows(again.rows) == sorted_rows(taken.rows)
    assert sorted_incs(again.increments) == sorted_incs(taken.increments)
    # Released, then more merges: the next take equals one take of everything.
    g.release(again)
    for b in second:
        g.merge(b, T0)
        control.merge(b, T0)
    got, want = g.take_unsaved(T0), control.take_unsaved(T0)
    assert sorted_rows(got[0]) == sorted_rows(want[0])
    assert sorted_incs(got[1]) == sorted_incs(want[1])
    assert g.durable_through() == g.last_seq


def test_released_increments_add_to_new_ones() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(3, 1)), T0)
    taken = take(g)
    g.merge(batch("eu-1", T0 + 1, entry(5, 1)), T0)
    g.release(taken)
    rows2, incs2 = g.take_unsaved(T0)
    assert incs2 == [BucketIncrement("ns", K1, "eu", hour_start(T0), 5, 1)]
    assert [(r.admitted, r.denied) for r in rows2] == [(5, 1)]


def test_only_merges_written_are_durable() -> None:
    g = totals()
    first = g.merge(batch("eu-1", T0, entry(3)), T0)
    second = g.merge(batch("eu-1", T0, entry(1, key=K2)), T0)
    assert g.durable_through() == first.seq - 1
    one = g.take_checkpoint(max_rows=1, max_buckets=1, now=T0)
    nothing = g.merge(batch("eu-1", T0, entry(2)), T0)  # raises nothing
    assert nothing.raised == 0
    assert g.durable_through() == first.seq - 1  # taken is not durable
    g.confirm(one)
    assert g.durable_through() == second.seq - 1
    g.take_unsaved(T0)
    assert g.durable_through() == nothing.seq


def test_a_checkpoint_writes_a_row_once_however_often_it_rose() -> None:
    """Ledger rows per checkpoint follow the keys, not the check rate: a fixed set of
    keys at 1 or 50 flushes between checkpoints gives the same rows."""
    def rows_per_checkpoint(flushes: int) -> tuple[int, int]:
        g = totals()
        keys = [f"{i:032x}" for i in range(10)]
        for n in range(1, flushes + 1):
            for key in keys:
                g.merge(batch("eu-1", T0 + n, entry(n, key=key)), T0)
        rows, incs = g.take_unsaved(T0)
        return len(rows), len(incs)

    assert rows_per_checkpoint(1) == rows_per_checkpoint(50) == (10, 10)


def test_prune_keeps_dirty_rows_and_open_buckets_of_live_windows() -> None:
    g = totals()
    old = start_of(MINUTE) - 60_000
    g.merge(batch("eu-1", T0, entry(1, policy=MINUTE, start=old), entry(4)), T0)
    assert g.prune(old + 60_000 + RETENTION) == 1
    rows, incs = g.take_unsaved(T0)
    assert [(r.window_start, r.admitted) for r in rows] == [(start_of(FIXED), 4)]
    # Billing is kept for both: the bucket of the pruned window was earned before.
    assert sorted((i.admitted, i.denied) for i in incs) == [(5, 0)]
    assert g.durable_through() == g.last_seq


@PROPERTY
@given(batches=batch_sets())
def test_load_rebuilds_the_merged_state(batches: list[UsageBatch]) -> None:
    g = merged(batches)
    rows, _ = g.take_unsaved(T0 + 1)
    loaded = totals()
    loaded.load(rows)
    # as_of (flush time of the newest batch) is not persisted; the rest must be equal.
    assert without_as_of(loaded) == without_as_of(g)
    assert {k: w.window_end for k, w in loaded.windows.items()} == {
        k: w.window_end for k, w in g.windows.items()}
    assert {k for k in loaded.windows if loaded.is_live(k, T0)} == {
        k for k in g.windows if g.is_live(k, T0)}
    assert {t.window_start for t in loaded.take_changed()} == {k[2] for k in g.windows}
    # Redelivered batches after a leader change raise nothing and count no over-admission.
    for b in batches:
        assert loaded.merge(b, T0).raised == 0
    assert loaded.take_unsaved(T0) == ([], [])
    assert loaded.over_admission == {}


def test_load_replaces_previous_state() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(3, key=K2)), T0)
    g.load([ComponentRow("ns", K1, start_of(FIXED), "eu-1", "eu", end_of(FIXED), 4, 0, 10,
                         "1h", "fixed_window", None, T0)])
    assert list(g.windows) == [("ns", K1, start_of(FIXED))]
    assert g.key_total(("ns", K1, start_of(FIXED))).total == 4


# --- prune and live keys ---------------------------------------------------------------


def test_prune_removes_expired_windows_only() -> None:
    g = totals()
    old = start_of(MINUTE) - 60_000
    g.merge(batch("eu-1", T0, entry(1, policy=MINUTE), entry(1, policy=MINUTE, start=old),
                  entry(1)), T0)
    old_end = old + 60_000
    assert g.prune(old_end + RETENTION - 1) == 0
    assert g.prune(old_end + RETENTION) == 1
    assert ("ns", K1, old) not in g.windows
    assert set(g.windows) == {("ns", K1, start_of(MINUTE)), ("ns", K1, start_of(FIXED))}
    # A pruned window is never re-created.
    out = g.merge(batch("eu-1", T0 + 1, entry(2, policy=MINUTE, start=old)),
                  old_end + RETENTION)
    assert out.rejected == {"pruned_window": 1}
    assert ("ns", K1, old) not in g.windows
    assert g.prune(end_of(FIXED) + RETENTION) == 2
    assert g.windows == {}
    assert g.take_changed() == []


def test_liveness_follows_each_algorithm_horizon() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(1, policy=FIXED, ns="f"), entry(1, policy=SLIDING, ns="s"),
                  entry(1, policy=BUCKET, ns="t")), T0)
    end = end_of(FIXED)
    start = start_of(FIXED)

    def live(now: int) -> list[tuple[str, str, int]]:
        return sorted(k for k in g.windows if g.is_live(k, now))

    assert live(T0) == [("f", K1, start), ("s", K1, start), ("t", K1, start)]
    assert live(end - 1) == [("f", K1, start), ("s", K1, start), ("t", K1, start)]
    assert live(end) == [("s", K1, start)]
    assert live(end + HOUR_MS - 1) == [("s", K1, start)]
    assert live(end + HOUR_MS) == []
    assert not g.is_live(("f", K2, start), T0)  # unknown key


# --- the snapshot index fed as keys change ------------------------------------------------


def index_contents(index: SnapshotIndex[WindowKey], nodes: set[str]
                   ) -> dict[str, set[WindowKey]]:
    found = {}
    for node in nodes | {"nobody"}:
        keys: list[WindowKey] = []
        cursor: int | None = 0
        while cursor is not None:
            page = index.page(node, cursor, 3)
            keys += page.keys
            cursor = page.next_cursor
        assert len(keys) == len(set(keys))  # each key once
        found[node] = set(keys)
    return found


def expected_contents(g: GlobalTotals, nodes: set[str]) -> dict[str, set[WindowKey]]:
    blocked = {k for k, w in g.windows.items() if w.blocked_until}
    return {node: {k for k in g.windows if node in g.table.components_of(*k)} | blocked
            for node in nodes | {"nobody"}}


@PROPERTY
@given(batches=batch_sets())
def test_the_index_holds_each_nodes_keys_and_the_blocked_ones(batches: list[UsageBatch]
                                                                ) -> None:
    index: SnapshotIndex[WindowKey] = SnapshotIndex()
    g = GlobalTotals(retention_ms=RETENTION, observer=index)
    for b in batches:
        g.merge(b, T0)
    nodes = {b.node_id for b in batches}
    assert index_contents(index, nodes) == expected_contents(g, nodes)
    # A new leader's load feeds its index the same way.
    rows, _ = g.take_unsaved(T0 + 1)
    loaded_index: SnapshotIndex[WindowKey] = SnapshotIndex()
    loaded = GlobalTotals(retention_ms=RETENTION, observer=loaded_index)
    loaded.load_more(rows)
    assert index_contents(loaded_index, nodes) == expected_contents(loaded, nodes)
    # Pruning empties it.
    g.prune(max((w.window_end for w in g.windows.values()), default=0) + RETENTION)
    assert index_contents(index, nodes) == {n: set() for n in nodes | {"nobody"}}


def test_a_raised_limit_unblocks_the_key_in_the_index() -> None:
    index: SnapshotIndex[WindowKey] = SnapshotIndex()
    g = GlobalTotals(retention_ms=RETENTION, observer=index)
    key = ("ns", K1, start_of(FIXED))
    g.merge(batch("eu-1", T0, entry(10)), T0)
    assert index_contents(index, {"eu-1"})["nobody"] == {key}
    loose = build_policy(limit=100, duration="1h", algorithm="fixed_window")
    g.merge(batch("us-1", T0 + 1, entry(1, policy=loose)), T0 + 1)
    assert index_contents(index, {"eu-1", "us-1"}) == {
        "eu-1": {key}, "us-1": {key}, "nobody": set()}


def test_take_changed_builds_only_the_wanted_totals_and_forgets_the_rest() -> None:
    g = totals()
    g.merge(batch("eu-1", T0, entry(3), entry(9, key=K2)), T0)
    hot = g.take_changed(lambda window: window.total >= 5)
    assert [(t.key_hash, t.total) for t in hot] == [(K2, 9)]
    assert g.take_changed() == []  # the cold one is not owed to a later tick either
