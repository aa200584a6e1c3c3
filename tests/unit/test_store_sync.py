"""The sync side of a node's CounterStore (region_node/counters.py): the usage outbox
(take_usage / return_usage), hour sealing, totals from central (apply_totals, seed_remote)
and eviction.

Pure: every call takes an explicit ``now`` (epoch ms); no NATS, no clock.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from region_node.counters import CounterStore, UsageGroups
from sync.messages import KeyTotal, UsageBatch, UsageEntry
from sync.policy import Policy, build_policy
from sync.windows import HOUR_MS, window_bounds

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ME = "eu-host-1-boot1"
NS = "ns"
K1 = "0123456789abcdef0123456789abcdef"
K2 = "fedcba9876543210fedcba9876543210"
K3 = "00000000000000000000000000000003"
H0 = 1_717_200_000_000  # 2024-06-01 00:00 UTC: a month, day and hour boundary
H_END = H0 + HOUR_MS
T0 = H0 + 20 * 60_000 + 30_000 + 250  # far from minute and hour boundaries
FIXED = build_policy(limit=10, duration="1h", algorithm="fixed_window")
SMALL = build_policy(limit=3, duration="1h", algorithm="fixed_window")
MINUTE = build_policy(limit=100, duration="1m", algorithm="fixed_window")
SLIDING = build_policy(limit=10, duration="1m", algorithm="sliding_window")
DAILY = build_policy(limit=100, duration="1d", algorithm="fixed_window")
BUCKET = build_policy(limit=10, duration="1s", algorithm="token_bucket", burst=10)


def start_of(policy: Policy, now: int = T0) -> int:
    return window_bounds(policy.duration, now)[0]


def end_of(policy: Policy, now: int = T0) -> int:
    return window_bounds(policy.duration, now)[1]


def total(policy: Policy, components: dict[str, int], *, key: str = K1,
          start: int | None = None, blocked_until: int = 0) -> KeyTotal:
    return KeyTotal(NS, key, start_of(policy) if start is None else start,
                    sum(components.values()), components, blocked_until, policy)


def usage(key: str, start: int, admitted: int, denied: int, policy: Policy) -> UsageEntry:
    return UsageEntry(NS, key, start, admitted, denied, policy)


def as_sets(groups: UsageGroups) -> list[tuple[int, set[UsageEntry]]]:
    return [(flushed_at, set(entries)) for flushed_at, entries in groups]


def admit(store: CounterStore, policy: Policy, now: int, *, key: str = K1, cost: int = 1,
          tries: int = 100) -> int:
    """How many checks of ``cost`` at ``now`` are admitted before the first denial."""
    for n in range(tries):
        if not store.check(NS, key, policy, cost, now).allowed:
            return n
    return tries


# --- take_usage / return_usage -----------------------------------------------------------


def test_take_usage_returns_cumulative_counts_and_clears_dirtiness() -> None:
    s = CounterStore()
    results = [s.check(NS, K1, SMALL, 1, T0 + i).allowed for i in range(5)]
    assert results == [True, True, True, False, False]
    s.check(NS, K2, SMALL, 2, T0 + 5)
    assert s.unpublished == 2
    groups = s.take_usage(T0 + 10)
    assert as_sets(groups) == [(T0 + 10, {usage(K1, start_of(SMALL), 3, 2, SMALL),
                                          usage(K2, start_of(SMALL), 2, 0, SMALL)})]
    assert s.unpublished == 0
    assert s.take_usage(T0 + 20) == []
    s.check(NS, K1, SMALL, 2, T0 + 30)  # denied: cumulative denied grows to 4
    assert as_sets(s.take_usage(T0 + 40)) == [(T0 + 40, {usage(K1, start_of(SMALL), 3, 4,
                                                                SMALL)})]


def test_cost_zero_checks_publish_nothing() -> None:
    s = CounterStore()
    assert s.check(NS, K1, SMALL, 0, T0).allowed
    assert s.unpublished == 0
    assert s.take_usage(T0 + 1) == []


def test_entries_carry_the_store_policy() -> None:
    raised = build_policy(limit=20, duration="1h", algorithm="fixed_window")
    s = CounterStore()
    s.check(NS, K1, FIXED, 4, T0)
    s.check(NS, K1, raised, 1, T0 + 1)  # new limit, same window: counts carry over
    assert as_sets(s.take_usage(T0 + 2)) == [(T0 + 2, {usage(K1, start_of(FIXED), 5, 0,
                                                              raised)})]


def test_returned_usage_is_taken_again_with_its_flush_time() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 2, T0)
    groups = s.take_usage(T0 + 100)
    s.return_usage(groups)
    assert s.unpublished == 1
    s.check(NS, K2, FIXED, 1, T0 + 150)
    assert as_sets(s.take_usage(T0 + 200)) == [
        (T0 + 100, {usage(K1, start_of(FIXED), 2, 0, FIXED)}),
        (T0 + 200, {usage(K2, start_of(FIXED), 1, 0, FIXED)})]
    assert s.take_usage(T0 + 300) == []


@pytest.mark.parametrize("newest_first", [False, True])
def test_newer_snapshot_of_the_same_key_window_hour_replaces_older(newest_first: bool) -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 2, T0)
    older = s.take_usage(T0 + 100)
    s.check(NS, K1, FIXED, 3, T0 + 150)
    newer = s.take_usage(T0 + 200)
    s.return_usage(newer if newest_first else older)
    s.return_usage(older if newest_first else newer)
    assert as_sets(s.take_usage(T0 + 300)) == [(T0 + 200, {usage(K1, start_of(FIXED), 5, 0,
                                                                  FIXED)})]


def test_returned_snapshots_of_different_hours_are_both_kept() -> None:
    s = CounterStore()
    s.check(NS, K1, DAILY, 2, H_END - 5_000)
    first = s.take_usage(H_END - 4_000)
    s.check(NS, K1, DAILY, 3, H_END + 5_000)
    second = s.take_usage(H_END + 6_000)
    s.return_usage(first)
    s.return_usage(second)
    start = start_of(DAILY)
    assert as_sets(s.take_usage(H_END + 7_000)) == [
        (H_END - 4_000, {usage(K1, start, 2, 0, DAILY)}),
        (H_END + 6_000, {usage(K1, start, 5, 0, DAILY)})]


def test_live_counts_and_returned_snapshot_of_the_same_window_both_go_out() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 2, T0)
    s.return_usage(s.take_usage(T0 + 100))
    s.check(NS, K1, FIXED, 1, T0 + 150)
    assert as_sets(s.take_usage(T0 + 200)) == [
        (T0 + 100, {usage(K1, start_of(FIXED), 2, 0, FIXED)}),
        (T0 + 200, {usage(K1, start_of(FIXED), 3, 0, FIXED)})]


# --- windows rolling over while unpublished --------------------------------------------


@pytest.mark.parametrize("policy", [MINUTE, SLIDING, build_policy(
    limit=100, duration="1m", algorithm="token_bucket")])
def test_windows_that_roll_over_unpublished_are_still_published(policy: Policy) -> None:
    s = CounterStore()
    w0 = start_of(policy)
    s.check(NS, K1, policy, 2, T0)
    s.check(NS, K1, policy, 3, T0 + 60_000)  # next window: w0 becomes "previous"
    s.check(NS, K1, policy, 1, T0 + 120_000)  # and again: w0 leaves the state
    s.check(NS, K1, policy, 4, T0 + 600_000)  # a gap: w2 and w1 leave together
    groups = s.take_usage(T0 + 600_001)
    entries = {(e.window_start, e.admitted) for _, es in groups for e in es}
    assert entries == {(w0, 2), (w0 + 60_000, 3), (w0 + 120_000, 1), (w0 + 600_000, 4)}
    assert all(flushed_at <= T0 + 600_001 for flushed_at, _ in groups)
    assert s.take_usage(T0 + 600_002) == []


def test_duration_change_retires_the_old_windows() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 2, T0)
    s.check(NS, K1, MINUTE, 1, T0 + 60_000)
    s.check(NS, K1, FIXED, 5, T0 + 60_001)
    entries = {(e.window_start, e.admitted, e.policy.duration.text)
               for _, es in s.take_usage(T0 + 60_002) for e in es}
    assert entries == {(start_of(MINUTE), 2, "1m"), (start_of(MINUTE) + 60_000, 1, "1m"),
                       (start_of(FIXED), 5, "1h")}


KEYS = [K1, K2, K3]
STEPS = [0, 1, 7, 999, 1_000, 20_000, 59_999, 60_000, 600_000, 1_799_999, 3_600_000,
         5_400_001]
KEY_SETUPS = [("fixed_window", "1m"), ("sliding_window", "1m"), ("token_bucket", "1s"),
              ("fixed_window", "1h"), ("sliding_window", "20m"), ("fixed_window", "1d"),
              ("token_bucket", "1h"), ("fixed_window", "1s")]


def key_policies(algorithm: str, duration: str) -> list[Policy]:
    """Policies of one key: same windows, different limits (each a distinct object)."""
    return [build_policy(limit=limit, duration=duration, algorithm=algorithm)
            for limit in (1, 2, 3, 5, 8)]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[list[Policy]], list[tuple]]:
    setups = [key_policies(*draw(st.sampled_from(KEY_SETUPS))) for _ in KEYS]
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("check"), st.sampled_from(STEPS), st.integers(0, 2),
                  st.integers(1, 3), st.integers(0, 4)),
        st.tuples(st.just("take"), st.sampled_from(STEPS)),
        st.tuples(st.just("fail"), st.sampled_from(STEPS), st.integers(0, 6)),
        st.tuples(st.just("evict"), st.sampled_from(STEPS), st.integers(1, 3)),
    ), max_size=50))
    return setups, ops


@PROPERTY
@given(histories())
def test_nothing_lost_nothing_inflated_and_hours_exact(
        history: tuple[list[list[Policy]], list[tuple]]) -> None:
    """Whatever the interleaving of checks, successful publications, failed (partly
    published, rest returned) publications and evictions, the usage eventually published
    for each key-window has, as its maximum, exactly the cost admitted (and denied) there;
    and for every hour boundary B, the entries flushed before B hold exactly the cost
    admitted before B (billing by hour is exact)."""
    setups, ops = history
    s = CounterStore()
    now = H0 + 30 * 60_000 + 17
    events: list[tuple[int, str, int, bool, int]] = []  # now, key, window, allowed, cost
    published: list[tuple[int, UsageEntry]] = []

    def publish(groups: UsageGroups) -> None:
        published.extend((f, e) for f, es in groups for e in es)

    for op in ops:
        now += op[1]
        if op[0] == "check":
            _, _, k, cost, variant = op
            policy = setups[k][variant]
            cost = min(cost, policy.capacity)  # the checker refuses larger costs
            decision = s.check(NS, KEYS[k], policy, cost, now)
            events.append((now, KEYS[k], start_of(policy, now), decision.allowed, cost))
        elif op[0] == "take":
            publish(s.take_usage(now))
        elif op[0] == "fail":
            groups = s.take_usage(now)
            flat = [(f, e) for f, es in groups for e in es]
            cut = min(op[2], len(flat))
            published.extend(flat[:cut])
            rest: dict[int, list[UsageEntry]] = defaultdict(list)
            for f, e in flat[cut:]:
                rest[f].append(e)
            s.return_usage(sorted(rest.items()))
        else:
            for _ in range(op[2]):
                s.evict(now, budget=2)
    now += 7 * 86_400_000
    publish(s.take_usage(now))
    assert s.unpublished == 0
    assert s.take_usage(now + 1) == []

    want: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for _, key, window, allowed, cost in events:
        want[(key, window)][0 if allowed else 1] += cost
    got: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for _, e in published:
        g = got[(e.key_hash, e.window_start)]
        g[0], g[1] = max(g[0], e.admitted), max(g[1], e.denied)
    assert dict(got) == dict(want)

    if not events:
        return
    first_hour = events[0][0] - events[0][0] % HOUR_MS
    for boundary in range(first_hour + HOUR_MS, events[-1][0] + HOUR_MS, HOUR_MS):
        before: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for t, key, window, allowed, cost in events:
            if t < boundary:
                before[(key, window)][0 if allowed else 1] += cost
        flushed: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for f, e in published:
            if f < boundary:
                g = flushed[(e.key_hash, e.window_start)]
                g[0], g[1] = max(g[0], e.admitted), max(g[1], e.denied)
        assert dict(flushed) == dict(before), f"hour ending at {boundary}"


# --- hour sealing ----------------------------------------------------------------------


def test_hour_boundary_seals_the_pre_boundary_counts() -> None:
    s = CounterStore()
    for i in range(3):
        s.check(NS, K1, DAILY, 1, H_END - 10_000 + i)
    s.check(NS, K1, DAILY, 2, H_END + 10_000)
    start = start_of(DAILY)
    assert as_sets(s.take_usage(H_END + 20_000)) == [
        (H_END - 1, {usage(K1, start, 3, 0, DAILY)}),
        (H_END + 20_000, {usage(K1, start, 5, 0, DAILY)})]


def test_hour_boundary_seals_windows_that_also_roll_over() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 3, H_END - 10_000)
    s.check(NS, K2, MINUTE, 1, H_END - 9_000)
    s.check(NS, K1, MINUTE, 2, H_END + 10_000)
    assert as_sets(s.take_usage(H_END + 20_000)) == [
        (H_END - 1, {usage(K1, H_END - 60_000, 3, 0, MINUTE),
                     usage(K2, H_END - 60_000, 1, 0, MINUTE)}),
        (H_END + 20_000, {usage(K1, H_END, 2, 0, MINUTE)})]


def test_take_after_the_boundary_alone_seals() -> None:
    s = CounterStore()
    s.check(NS, K1, DAILY, 4, H_END - 10_000)
    assert as_sets(s.take_usage(H_END + 3 * HOUR_MS)) == [
        (H_END - 1, {usage(K1, start_of(DAILY), 4, 0, DAILY)})]


def test_hour_sealing_holds_when_totals_roll_the_window() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 2, H_END - 90_000)
    s.apply_totals([total(MINUTE, {"us-1": 5}, start=H_END)], ME, H_END + 10_000)
    assert as_sets(s.take_usage(H_END + 20_000)) == [
        (H_END - 1, {usage(K1, H_END - 120_000, 2, 0, MINUTE)})]


# --- apply_totals ----------------------------------------------------------------------


def test_remote_is_total_minus_this_nodes_component() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 3, T0)
    # Central has seen only 1 of our 3 so far; the others admitted 5.
    assert len(s.apply_totals([total(FIXED, {ME: 1, "eu-2": 2, "us-1": 3})], ME, T0 + 1)) == 1
    state = s.get(NS, K1)
    assert state is not None and state.remote_cur == 5
    assert admit(s, FIXED, T0 + 2) == 2  # 3 local + 5 remote + 2 = 10


def test_remote_only_grows() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 1, T0)
    assert len(s.apply_totals([total(FIXED, {ME: 1, "us-1": 6})], ME, T0 + 1)) == 1
    assert len(s.apply_totals([total(FIXED, {ME: 1, "us-1": 4})], ME, T0 + 2)) == 0
    assert len(s.apply_totals([total(FIXED, {ME: 1, "us-1": 6})], ME, T0 + 3)) == 0
    state = s.get(NS, K1)
    assert state is not None and state.remote_cur == 6
    assert admit(s, FIXED, T0 + 4) == 3


def test_own_component_is_not_remote() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 4, T0)
    assert len(s.apply_totals([total(FIXED, {ME: 4})], ME, T0 + 1)) == 0
    state = s.get(NS, K1)
    assert state is not None and state.remote_cur == 0
    assert admit(s, FIXED, T0 + 2) == 6
    assert len(s.apply_totals([total(FIXED, {ME: 7}, key=K2)], ME, T0 + 3)) == 0
    assert s.get(NS, K2) is None


def test_unknown_key_gets_state_only_when_remote_or_blocked() -> None:
    s = CounterStore()
    assert len(s.apply_totals([total(FIXED, {ME: 0}, key=K1),
                           total(FIXED, {"us-1": 4}, key=K2),
                           total(FIXED, {ME: 10}, key=K3, blocked_until=end_of(FIXED))],
                          ME, T0)) == 1
    assert s.get(NS, K1) is None
    k2 = s.get(NS, K2)
    k3 = s.get(NS, K3)
    assert k2 is not None and k2.remote_cur == 4 and k2.blocked_until == 0
    assert k3 is not None and k3.remote_cur == 0 and k3.blocked_until == end_of(FIXED)
    assert admit(s, FIXED, T0 + 1, key=K2) == 6
    assert s.unpublished == 1  # applying totals dirties nothing; the checks did


def test_totals_for_expired_windows_are_ignored() -> None:
    s = CounterStore()
    old = start_of(FIXED) - HOUR_MS
    assert len(s.apply_totals([total(FIXED, {"us-1": 4}, start=old)], ME, T0)) == 0
    assert s.get(NS, K1) is None


def test_totals_under_another_window_length_are_ignored() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 1, T0)
    misaligned = start_of(MINUTE)  # a minute start that is not an hour start
    assert misaligned % HOUR_MS
    assert len(s.apply_totals([total(MINUTE, {"us-1": 9}, start=misaligned)], ME, T0)) == 0
    assert admit(s, FIXED, T0 + 1) == 9


def test_block_decision_denies_until_blocked_until() -> None:
    s = CounterStore()
    s.check(NS, K1, FIXED, 1, T0)
    until = T0 + 30_000
    s.apply_totals([total(FIXED, {ME: 1, "us-1": 2}, blocked_until=until)], ME, T0 + 1)
    d = s.check(NS, K1, FIXED, 1, T0 + 2)
    assert not d.allowed
    assert d.retry_after_ms == until - (T0 + 2)
    assert d.reset_at >= until and d.remaining == 0
    late = s.check(NS, K1, FIXED, 1, until - 1)
    assert not late.allowed and late.retry_after_ms == 1
    # An older, shorter decision arriving later does not lift the block.
    s.apply_totals([total(FIXED, {ME: 1, "us-1": 2}, blocked_until=T0 + 5)], ME, T0 + 3)
    assert not s.check(NS, K1, FIXED, 1, T0 + 10).allowed
    assert s.check(NS, K1, FIXED, 1, until).allowed


def test_block_retry_covers_the_block_even_when_the_limit_frees_sooner() -> None:
    s = CounterStore()
    until = end_of(FIXED) + 5_000  # beyond this window: the block, not the window, decides
    s.apply_totals([total(FIXED, {"us-1": 10}, blocked_until=until)], ME, T0)
    d = s.check(NS, K1, FIXED, 1, T0 + 1)
    assert not d.allowed and T0 + 1 + d.retry_after_ms >= until
    assert not s.check(NS, K1, FIXED, 1, end_of(FIXED) + 1).allowed  # new window, still blocked
    assert s.check(NS, K1, FIXED, 1, until).allowed


def test_token_bucket_debits_remote_consumption() -> None:
    s = CounterStore()
    now = start_of(BUCKET) + 100
    assert s.check(NS, K1, BUCKET, 1, now).allowed
    state = s.get(NS, K1)
    assert state is not None and state.level == 9 * 1_000
    assert len(s.apply_totals([total(BUCKET, {ME: 1, "us-1": 20}, start=start_of(BUCKET, now))],
                          ME, now)) == 1
    assert state.level == -11 * 1_000  # debt
    d = s.check(NS, K1, BUCKET, 1, now)
    assert not d.allowed and d.retry_after_ms == 1_200  # 12 tokens at 10/s
    assert not s.check(NS, K1, BUCKET, 1, now + 1_199).allowed
    assert s.check(NS, K1, BUCKET, 1, now + 1_200).allowed


def test_token_bucket_debits_only_the_rise_of_remote() -> None:
    s = CounterStore()
    now = start_of(BUCKET) + 100
    s.check(NS, K1, BUCKET, 0, now)
    state = s.get(NS, K1)
    assert state is not None
    start = start_of(BUCKET, now)
    s.apply_totals([total(BUCKET, {"us-1": 3}, start=start)], ME, now)
    assert state.level == 7_000
    assert len(s.apply_totals([total(BUCKET, {"us-1": 3}, start=start)], ME, now + 50)) == 0
    assert state.level == 7_000  # no rise, no debit
    s.apply_totals([total(BUCKET, {"us-1": 8}, start=start)], ME, now + 100)
    assert state.level == 7_000 + 100 * 10 - 5_000  # refilled for 100 ms, then debited
    s.apply_totals([total(BUCKET, {"us-1": 8, "ap-1": 2}, start=start)], ME, now + 100)
    assert state.level == 1_000


def test_token_bucket_debits_a_late_total_for_the_window_that_just_ended() -> None:
    s = CounterStore()
    start = start_of(BUCKET)
    s.check(NS, K1, BUCKET, 1, start + 900)
    control = CounterStore()
    control.check(NS, K1, BUCKET, 1, start + 900)
    now = start + 1_000 + 150  # the total for [start, start+1s) arrives 150 ms late
    s.apply_totals([total(BUCKET, {"us-1": 6}, start=start)], ME, now)
    s.check(NS, K1, BUCKET, 0, now)
    control.check(NS, K1, BUCKET, 0, now)
    state, free = s.get(NS, K1), control.get(NS, K1)
    assert state is not None and free is not None
    assert state.level == free.level - 6 * 1_000


def test_total_for_the_previous_window_weighs_in_the_sliding_window() -> None:
    start = start_of(SLIDING)
    mid = start + 30_000  # half of the previous window still inside the span
    control = CounterStore()
    control.check(NS, K1, SLIDING, 0, mid)
    assert admit(control, SLIDING, mid) == 10
    s = CounterStore()
    s.check(NS, K1, SLIDING, 0, mid)
    prev = start - 60_000
    assert len(s.apply_totals([total(SLIDING, {"us-1": 10}, start=prev)], ME, mid)) == 1
    state = s.get(NS, K1)
    assert state is not None and state.remote_prev == 10 and state.remote_cur == 0
    assert admit(s, SLIDING, mid) == 5


def test_previous_window_total_for_an_unknown_key_carries_into_the_current_window() -> None:
    start = start_of(SLIDING)
    mid = start + 30_000
    s = CounterStore()
    s.apply_totals([total(SLIDING, {"us-1": 10}, start=start - 60_000)], ME, mid)
    assert admit(s, SLIDING, mid) == 5


def test_total_for_the_next_window_rolls_the_state_forward() -> None:
    s = CounterStore()
    start = start_of(MINUTE)
    s.check(NS, K1, MINUTE, 7, start + 59_000)
    s.apply_totals([total(MINUTE, {"us-1": 90}, start=start + 60_000)], ME, start + 60_100)
    assert admit(s, MINUTE, start + 60_200) == 10
    entries = {(e.window_start, e.admitted) for _, es in s.take_usage(start + 60_300)
               for e in es}
    assert entries == {(start, 7), (start + 60_000, 10)}


def test_seed_remote_counts_spilled_usage_as_remote() -> None:
    s = CounterStore()
    former = usage(K1, start_of(FIXED), 4, 1, FIXED)
    s.seed_remote([UsageBatch("eu-host-1-boot0", "eu", T0, [former])], T0)
    assert s.unpublished == 0  # the spill is republished as is, not as this node's usage
    assert admit(s, FIXED, T0 + 1) == 6
    # Central then reports the former self as another component: no double count.
    assert len(s.apply_totals([total(FIXED, {"eu-host-1-boot0": 4, ME: 6})], ME, T0 + 2)) == 0
    state = s.get(NS, K1)
    assert state is not None and state.remote_cur == 4


def test_seed_remote_sums_former_selves_and_takes_each_ones_newest_count() -> None:
    s = CounterStore()
    start = start_of(FIXED)
    s.seed_remote([UsageBatch("eu-a", "eu", T0, [usage(K1, start, 2, 0, FIXED)]),
                   UsageBatch("eu-a", "eu", T0, [usage(K1, start, 3, 0, FIXED)]),
                   UsageBatch("eu-b", "eu", T0, [usage(K1, start, 4, 0, FIXED)])], T0)
    state = s.get(NS, K1)
    assert state is not None and state.remote_cur == 3 + 4


def test_seed_remote_ignores_expired_and_empty_entries() -> None:
    s = CounterStore()
    s.seed_remote([UsageBatch("eu-host-1-boot0", "eu", T0, [
        usage(K1, start_of(FIXED) - HOUR_MS, 4, 0, FIXED),
        usage(K2, start_of(FIXED), 0, 3, FIXED)])], T0)
    assert s.get(NS, K1) is None and s.get(NS, K2) is None


# --- eviction --------------------------------------------------------------------------


def test_dirty_key_is_never_evicted() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 1, T0)
    later = T0 + 10 * HOUR_MS
    assert s.evict(later) == 0
    assert s.get(NS, K1) is not None
    s.take_usage(later)
    assert s.evict(later) == 1
    assert s.get(NS, K1) is None and s.active_keys == 0
    assert s.evictions == 1


def test_evict_frees_idle_keys_only() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 1, T0)  # idle once its window ends
    s.check(NS, K2, SLIDING, 1, T0)  # idle one window later
    s.check(NS, K3, FIXED, 1, T0)  # idle after the hour
    s.take_usage(T0 + 1)
    end = end_of(MINUTE)
    assert s.evict(end - 1) == 0
    assert s.evict(end) == 1
    assert s.get(NS, K1) is None and s.get(NS, K2) is not None
    assert s.evict(end + 60_000) == 1
    assert s.get(NS, K2) is None and s.get(NS, K3) is not None
    assert s.evict(end_of(FIXED)) == 1
    assert s.active_keys == 0


def test_blocked_key_is_not_evicted() -> None:
    s = CounterStore()
    until = T0 + 5 * HOUR_MS
    s.apply_totals([total(MINUTE, {"us-1": 1}, blocked_until=until)], ME, T0)
    assert s.evict(T0 + HOUR_MS) == 0
    assert s.evict(until) == 1


def test_evict_spreads_a_pass_over_calls() -> None:
    s = CounterStore()
    keys = [f"{i:032x}" for i in range(5)]
    for key in keys:
        s.check(NS, key, MINUTE, 1, T0)
    s.take_usage(T0)
    later = T0 + HOUR_MS
    assert [s.evict(later, budget=2) for _ in range(3)] == [2, 2, 1]
    assert s.active_keys == 0


def test_evicted_key_keeps_its_unpublished_retired_windows() -> None:
    s = CounterStore()
    s.check(NS, K1, MINUTE, 2, T0)
    s.check(NS, K1, MINUTE, 1, T0 + 60_000)
    s.return_usage(s.take_usage(T0 + 60_001))
    assert s.evict(T0 + HOUR_MS) == 1
    entries = {(e.window_start, e.admitted) for _, es in s.take_usage(T0 + HOUR_MS)
               for e in es}
    assert entries == {(start_of(MINUTE), 2), (start_of(MINUTE) + 60_000, 1)}


def test_a_duration_change_at_the_same_window_start_carries_the_count_over() -> None:
    minute = build_policy(limit=100, duration="1m", algorithm="fixed_window")
    hourly = build_policy(limit=100, duration="1h", algorithm="fixed_window")
    start = start_of(hourly)  # an hour start is also a minute start
    s = CounterStore()
    for i in range(5):
        s.check(NS, K1, minute, 1, start + 1_000 + i)
    for i in range(3):
        s.check(NS, K1, hourly, 1, start + 2_000 + i)
    published = {}
    for _, entries in s.take_usage(start + 3_000):
        for e in entries:
            published[(e.window_start, e.policy.duration.text)] = e.admitted
    # The node's count for window start `start` never goes down: 5, then 5 + 3.
    assert published == {(start, "1m"): 5, (start, "1h"): 8} or published == {
        (start, "1h"): 8}
