"""CounterStore memory: eviction drops idle keys once their windows expire, so memory
follows the active keys; it never drops an unpublished (dirty) key or a blocked one."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from region_node import node as node_module
from region_node.counters import CounterStore
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from sync.messages import KeyTotal
from sync.policy import Policy, build_policy

NS = "ns"
T0 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000  # a day boundary, epoch ms
MINUTE = 60_000
FIXED = build_policy(limit=10, duration="1m", algorithm="fixed_window")
SLIDING = build_policy(limit=10, duration="1m", algorithm="sliding_window")
BUCKET = build_policy(limit=10, duration="1m", algorithm="token_bucket")
MONTH = build_policy(limit=10, duration="month", algorithm="fixed_window")


def key(i: int) -> str:
    return f"{i:032x}"


def evict_all(store: CounterStore, now: int) -> int:
    """A full eviction pass (evict works through the keys in budgeted chunks)."""
    evicted = store.evict(now, budget=7)
    while store._sweep:
        evicted += store.evict(now, budget=7)
    return evicted


def publish(store: CounterStore, now: int) -> int:
    """What the flush loop does when NATS accepts the batch."""
    return sum(len(entries) for _, entries in store.take_usage(now))


@pytest.mark.parametrize(("policy", "idle_after"), [
    (FIXED, MINUTE),            # the window's end
    (SLIDING, 2 * MINUTE),      # the end of the window after it, which still weighs it
    (BUCKET, MINUTE),           # full again, and the accounting window over
])
def test_idle_keys_are_evicted_only_after_their_windows_expire(policy: Policy,
                                                                idle_after: int) -> None:
    store = CounterStore()
    for i in range(50):
        assert store.check(NS, key(i), policy, 1, T0 + i).allowed
    assert publish(store, T0 + 100) == 50
    assert evict_all(store, T0 + idle_after - 1) == 0
    assert store.active_keys == 50
    assert evict_all(store, T0 + idle_after + 49) == 50
    assert store.active_keys == 0
    assert store.evictions == 50


def test_token_bucket_key_stays_until_its_bucket_is_full() -> None:
    """limit 10 per minute: 10 tokens spent at T0 take a full minute to come back, so the
    key outlives the accounting window that ends at T0 + 1m only if spent late in it."""
    store = CounterStore()
    late = T0 + MINUTE - 1_000
    assert store.check(NS, key(1), BUCKET, 10, late).allowed
    publish(store, late)
    assert evict_all(store, T0 + MINUTE) == 0           # window over, bucket still empty
    assert evict_all(store, late + MINUTE - 1) == 0     # one unit short of full
    assert evict_all(store, late + MINUTE) == 1


def test_memory_follows_active_keys() -> None:
    store = CounterStore()
    for i in range(1_000):
        store.check(NS, key(i), FIXED, 1, T0)
    publish(store, T0)
    # Ten minutes later a different, smaller set of keys is active.
    later = T0 + 10 * MINUTE
    for i in range(1_000, 1_100):
        store.check(NS, key(i), FIXED, 1, later)
    evict_all(store, later)
    assert store.active_keys == 100
    assert all(store.get(NS, key(i)) is not None for i in range(1_000, 1_100))


def test_cost_zero_probes_leave_nothing_behind() -> None:
    store = CounterStore()
    for i in range(100):
        assert store.check(NS, key(i), FIXED, 0, T0).allowed
    assert store.unpublished == 0
    assert evict_all(store, T0 + MINUTE) == 100


def test_dirty_keys_are_never_evicted() -> None:
    store = CounterStore()
    for i in range(20):
        store.check(NS, key(i), FIXED, 1, T0)
    publish(store, T0)
    for i in range(10):  # half of them are used again, and not yet published
        store.check(NS, key(i), FIXED, 1, T0 + 1)
    store.check(NS, key(99), FIXED, 11, T0 + 2)  # a denial is usage to publish too
    much_later = T0 + 365 * 86_400_000
    assert evict_all(store, much_later) == 10
    assert store.active_keys == 11
    assert publish(store, much_later) == 11
    assert evict_all(store, much_later) == 11
    assert store.active_keys == 0


def test_a_failed_publication_keeps_the_usage_and_its_key() -> None:
    store = CounterStore()
    store.check(NS, key(1), FIXED, 3, T0)
    groups = store.take_usage(T0 + 1)
    store.return_usage(groups)  # NATS refused the batch
    assert store.unpublished == 1
    [(_, [entry])] = store.take_usage(T0 + 2)
    assert (entry.key_hash, entry.admitted, entry.denied) == (key(1), 3, 0)


def test_blocked_keys_are_never_evicted_while_the_block_lasts() -> None:
    store = CounterStore()
    blocked_until = T0 + 30 * MINUTE
    store.check(NS, key(1), FIXED, 1, T0)
    store.check(NS, key(2), FIXED, 1, T0)
    publish(store, T0)
    store.apply_totals([KeyTotal(NS, key(1), T0, 5, {}, blocked_until, FIXED)], "me", T0 + 1)
    assert evict_all(store, T0 + 10 * MINUTE) == 1
    assert store.get(NS, key(1)) is not None
    denied = store.check(NS, key(1), FIXED, 1, T0 + 10 * MINUTE)
    assert not denied.allowed and denied.retry_after_ms == 20 * MINUTE
    publish(store, T0 + 10 * MINUTE)
    assert evict_all(store, blocked_until - 1) == 0
    assert evict_all(store, blocked_until) == 1


def test_a_block_arriving_for_an_unknown_key_is_kept_until_it_ends() -> None:
    store = CounterStore()
    store.apply_totals([KeyTotal(NS, key(3), T0, 0, {}, T0 + 5 * MINUTE, FIXED)], "me", T0)
    assert store.active_keys == 1
    assert evict_all(store, T0 + 4 * MINUTE) == 0
    assert evict_all(store, T0 + 5 * MINUTE) == 1


def test_month_windows_are_evicted_after_the_month_ends() -> None:
    store = CounterStore()
    store.check(NS, key(1), MONTH, 1, T0)
    publish(store, T0)
    state = store.get(NS, key(1))
    assert state is not None
    assert evict_all(store, state.cur_end - 1) == 0
    assert evict_all(store, state.cur_end) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5 * MINUTE), st.integers(0, 3),
                          st.sampled_from([FIXED, SLIDING, BUCKET])), min_size=1, max_size=80),
       st.integers(0, 10 * MINUTE))
def test_eviction_never_changes_a_decision(events: list[tuple[int, int, int, Policy]],
                                           evict_at: int) -> None:
    """Forgetting idle state is invisible: with and without an eviction pass (after a
    publication) the same checks get the same answers."""
    events = sorted(events, key=lambda e: e[1])
    keep, evicting = CounterStore(), CounterStore()
    for k, offset, cost, policy in events:
        now = T0 + offset
        if evict_at <= offset:
            publish(evicting, T0 + evict_at)
            evict_all(evicting, T0 + evict_at)
            evict_at = 10**12  # once
        a = keep.check(NS, key(k), policy, cost, now)
        b = evicting.check(NS, key(k), policy, cost, now)
        assert a == b


# --- with other nodes' usage and central's blocks --------------------------------------


@st.composite
def mixed_traffic(draw: st.DrawFn) -> tuple[Policy, list[tuple[str, int, int]]]:
    policy = draw(st.sampled_from([
        build_policy(limit=draw(st.integers(1, 12)), duration="1s", algorithm=algorithm)
        for algorithm in ("fixed_window", "sliding_window", "token_bucket")]))
    events = draw(st.lists(st.tuples(
        st.sampled_from(["check", "check", "check", "remote", "block"]),
        st.integers(0, 700), st.integers(0, policy.capacity)), min_size=1, max_size=40))
    return policy, events


@settings(max_examples=150, deadline=None)
@given(mixed_traffic())
def test_remote_usage_and_blocks_keep_every_invariant(
        traffic: tuple[Policy, list[tuple[str, int, int]]]) -> None:
    """Local checks interleaved with other nodes' usage (central's totals) and block
    decisions: remaining is never negative, local + remote never exceeds the limit at an
    admission, a block denies until it ends, a denial always has a retry time."""
    policy, events = traffic
    store, k = CounterStore(), key(7)
    d = policy.duration.ms
    now, blocked_until = T0, 0
    remote: dict[int, int] = {}  # window start -> other nodes' usage, as central reports it
    local: dict[int, int] = {}  # window start -> admitted here
    for kind, gap, amount in events:
        now += gap
        start = now - now % d
        if kind == "remote":
            remote[start] = remote.get(start, 0) + amount
            store.apply_totals([KeyTotal(NS, k, start, remote[start], {"me": 999}, 0,
                                         policy)], "other", now)
            continue
        if kind == "block":
            blocked_until = max(blocked_until, now + amount * 100)
            store.apply_totals([KeyTotal(NS, k, start, remote.get(start, 0), {},
                                         now + amount * 100, policy)], "me", now)
            continue
        decision = store.check(NS, k, policy, amount, now)
        assert decision.remaining >= 0
        if now < blocked_until:
            assert not decision.allowed
            assert decision.retry_after_ms >= blocked_until - now
        if not decision.allowed:
            assert decision.retry_after_ms is not None and decision.retry_after_ms >= 1
            continue
        local[start] = local.get(start, 0) + amount
        # Every node's usage this store was told about, in this window and the previous.
        cur = local.get(start, 0) + remote.get(start, 0)
        prev = local.get(start - d, 0) + remote.get(start - d, 0)
        if policy.algorithm == "fixed_window":
            assert cur <= policy.limit
        elif policy.algorithm == "sliding_window":
            assert cur * d + prev * (d - (now - start)) <= policy.limit * d
        else:
            state = store.get(NS, k)
            assert state is not None and state.level >= 0


# --- a standalone node (no NATS) must not keep every key it ever saw -------------------


def test_a_store_that_never_publishes_evicts_without_a_publication() -> None:
    store = CounterStore(publishes=False)
    for i in range(100):
        store.check(NS, key(i), FIXED, 1, T0)
        store.check(NS, key(i), SLIDING, 1, T0 + MINUTE)  # retires the fixed window
    assert store.unpublished == 0
    assert evict_all(store, T0 + 3 * MINUTE) == 100
    assert store.active_keys == 0 and store.unpublished == 0


async def test_standalone_node_memory_follows_active_keys(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Regression: a standalone node never publishes, so it used to keep every key that
    ever had a cost > 0 check as dirty, forever."""
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(node_module, "EVICTION_INTERVAL_S", 0.001)
    now = [T0]
    node = RegionNode(NodeSettings(region="t"), secret="s", clock=lambda: now[0])
    await node.start()
    try:
        for i in range(100):
            node.checker.check({"namespace": "api", "identifier": f"user-{i}", "limit": 5,
                                "duration": "1m", "algorithm": "fixed_window"})
        now[0] = T0 + 60 * MINUTE  # every window long over
        for _ in range(200):  # the node's own eviction loop, at most ~2 s
            if node.store.active_keys == 0:
                break
            await asyncio.sleep(0.01)
        assert node.store.active_keys == 0
        assert node.store.unpublished == 0
    finally:
        await node.stop()


# --- the interest rule on the node (sync/interest.py node_keeps) -----------------------------


def test_a_shared_total_is_kept_only_for_a_served_or_blocked_key() -> None:
    store = CounterStore()
    now = T0 + 1
    cold = KeyTotal(NS, key(20), T0, 4, {"other": 4}, 0, FIXED)
    store.apply_totals([cold], "me", now, addressed=False)
    assert store.get(NS, key(20)) is None and store.totals_ignored == 1
    # Central names this node as a server of the key (it flushed usage for it): kept.
    mine = KeyTotal(NS, key(21), T0, 5, {"other": 4, "me": 1}, 0, FIXED)
    store.apply_totals([mine], "me", now, addressed=False)
    state = store.get(NS, key(21))
    assert state is not None and state.remote_cur == 4
    # A blocked key reaches every node and is kept.
    blocked = KeyTotal(NS, key(22), T0, 10, {"other": 10}, T0 + MINUTE, FIXED)
    store.apply_totals([blocked], "me", now, addressed=False)
    state = store.get(NS, key(22))
    assert state is not None and state.blocked_until == T0 + MINUTE
    # A key this node checks is served: later shared totals for it are applied.
    store.check(NS, key(23), FIXED, 1, now)
    store.apply_totals([KeyTotal(NS, key(23), T0, 7, {"other": 6}, 0, FIXED)], "me", now,
                       addressed=False)
    state = store.get(NS, key(23))
    assert state is not None and state.remote_cur == 7
    # Addressed totals are kept as before.
    store.apply_totals([KeyTotal(NS, key(24), T0, 3, {"other": 3}, 0, FIXED)], "me", now)
    assert store.get(NS, key(24)) is not None
    assert store.totals_ignored == 1 and store.active_keys == 4
