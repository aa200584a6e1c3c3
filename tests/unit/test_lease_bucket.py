"""Lease mode with a token bucket (central/lease/bucket.py): refill under live leases,
forfeits, returns, and the bound: whatever the nodes admit, one token bucket of the same
capacity and rate admits too, under any interleaving. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.lease.bucket import Bucket, full_at, lease, new_bucket, refill, under
from central.lease.grants import Grant
from sync.policy import build_policy

PROPERTY = settings(max_examples=1500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TTL = 10_000
UNIT = 1_000  # the policies below refill per second


def bucket(capacity: int, rate: int, level_tokens: int, at: int = 0) -> Bucket:
    return Bucket(level_tokens * UNIT, at, rate, UNIT, capacity * UNIT)


def test_a_new_bucket_is_full_and_refills_at_the_limit_per_duration() -> None:
    policy = build_policy(limit=50, duration="1h", algorithm="token_bucket", burst=80,
                          mode="lease")
    b = new_bucket(policy, 1_000)
    assert (b.tokens, b.full, b.rate, b.unit) == (80, 80 * 3_600_000, 50, 3_600_000)
    b.level = 0
    refill(b, {}, 1_000 + 72_000)  # 50 an hour: one token every 72 s
    assert (b.tokens, b.at) == (1, 73_000)


def test_live_leases_cap_the_refill_and_an_ended_one_stops_capping_it() -> None:
    b = bucket(10, 1, 0)
    grants = {"a": Grant(granted=6, reported=2, expires_at=5_000)}  # 4 may still be spent
    refill(b, grants, 20_000)
    # Up to 10 - 4 = 6 while the lease lives (to 5 s), then 15 s more at 1/s: full.
    assert b.tokens == 10
    b = bucket(10, 1, 3)
    refill(b, grants, 7_000)
    assert b.tokens == 6 + 2  # 3 + 3 and capped at 6 until 5 s, then 2 s of refill


def test_a_grant_withdraws_tokens_and_a_return_puts_back_only_the_unspent() -> None:
    b = bucket(10, 1, 10)
    grants: dict[str, Grant] = {}
    g, _ = lease(b, grants, "eu", op="acquire", seq=1, used=0, want=4, demand=0, now=0,
                 ttl_ms=TTL)
    assert (g.granted, b.tokens) == (4, 6)
    g, _ = lease(b, grants, "eu", op="return", seq=2, used=3, want=0, demand=0, now=0,
                 ttl_ms=TTL)
    assert (g.granted, g.reported, b.tokens) == (3, 3, 7)


def test_an_ended_lease_is_forfeited_and_dropped() -> None:
    b = bucket(10, 1, 10)
    grants: dict[str, Grant] = {}
    lease(b, grants, "eu", op="acquire", seq=1, used=0, want=8, demand=0, now=0, ttl_ms=TTL)
    assert b.tokens == 2
    # The lease ended at 10 s; 1 s later: refilled 1 a second from 2 up to 10 - 8 = 2
    # while it lived, then 1 more; its 8 are not put back, and its row goes.
    g, dropped = lease(b, grants, "us", op="acquire", seq=1, used=0, want=1, demand=0,
                       now=11_000, ttl_ms=TTL)
    assert dropped == ["eu"] and "eu" not in grants
    assert (g.granted, b.tokens) == (1, 2)
    # The node comes back with what it spent: a new grant on top of that.
    g, _ = lease(b, grants, "eu", op="acquire", seq=2, used=5, want=1, demand=0,
                 now=11_000, ttl_ms=TTL)
    assert (g.granted, g.reported, b.tokens) == (6, 5, 1)


def test_full_at_is_when_the_leases_ended_and_the_bucket_refilled() -> None:
    b = bucket(10, 1, 4, at=1_000)
    assert full_at(b, {}) == 7_000
    grants = {"eu": Grant(granted=3, reported=0, expires_at=30_000)}
    assert full_at(b, grants) == 33_000  # capped at 7 until 30 s, then 3 s to refill
    grants["eu"].expires_at = 5_000
    b.level = 0
    assert full_at(b, grants) == 11_000  # 4 by 5 s (under the cap), then 6 s


def test_a_policy_change_keeps_whole_tokens_up_to_the_new_capacity() -> None:
    b = bucket(10, 1, 7)
    b.level += 500
    policy = build_policy(limit=2, duration="1m", algorithm="token_bucket", burst=5,
                          mode="lease")
    changed = under(b, policy)
    assert (changed.tokens, changed.unit, changed.rate) == (5, 60_000, 2)


@dataclass
class Node:
    holder: str
    spent: int = 0
    granted: int = 0
    deadline: int = 0
    seq: int = 0


NODES = ("eu", "us", "ap")
OPS = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 6_000)),
    st.tuples(st.just("acquire"), st.sampled_from(NODES), st.integers(0, 12),
              st.integers(0, 20), st.booleans()),
    st.tuples(st.just("spend"), st.sampled_from(NODES), st.integers(1, 12)),
    st.tuples(st.just("return"), st.sampled_from(NODES), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("forget"), st.sampled_from(NODES)),
    st.tuples(st.just("late"), st.sampled_from(NODES), st.integers(0, 6)),
)


@PROPERTY
@given(capacity=st.integers(1, 12), rate=st.integers(1, 4),
       ops=st.lists(OPS, max_size=80))
def test_nodes_never_admit_more_than_one_global_bucket(
        capacity: int, rate: int, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    b = bucket(capacity, rate, capacity)
    grants: dict[str, Grant] = {}
    nodes = {name: Node(name) for name in NODES}
    now = 0
    admitted: list[tuple[int, int]] = []
    for op in ops:
        kind = op[0]
        if kind == "advance":
            now += op[1]
            continue
        node = nodes[op[1]]
        if kind == "spend":
            cost = min(op[2], node.granted - node.spent)
            if now < node.deadline and cost > 0:
                node.spent += cost
                admitted.append((now, cost))
        elif kind == "acquire":
            node.seq += 1
            g, _ = lease(b, grants, node.holder, op="acquire", seq=node.seq, used=node.spent,
                         want=min(op[2], capacity), demand=op[3], now=now, ttl_ms=TTL)
            if not op[4]:  # else the reply is lost: the node keeps its old slice
                node.granted, node.deadline = g.granted, now + TTL
        elif kind == "return":
            # The node stops spending beyond what it keeps before it asks (lost or not).
            keep = min(op[2], max(0, node.granted - node.spent))
            node.granted = node.spent + keep
            if not keep:
                node.deadline = 0
            node.seq += 1
            if not op[3]:
                lease(b, grants, node.holder, op="return", seq=node.seq, used=node.spent,
                      want=keep, demand=0, now=now, ttl_ms=TTL)
        elif kind == "forget" and (now >= node.deadline or node.granted == node.spent):
            # It stopped spending (its lease ended, or it gave its slice back): it may
            # drop the key, and uses a new holder name when it comes back.
            nodes[op[1]] = Node(f"{node.holder}~", seq=node.seq)
        elif kind == "late":
            # An older request the authority receives after a newer one: ignored.
            lease(b, grants, node.holder, op="acquire", seq=max(0, node.seq - 1), used=0,
                  want=min(op[2], capacity), demand=0, now=now, ttl_ms=TTL)
    # Replay the admissions through one bucket that starts full.
    level, at, full = capacity * UNIT, 0, capacity * UNIT
    for moment, cost in admitted:
        level = min(full, level + (moment - at) * rate)
        at = moment
        assert level >= cost * UNIT, (admitted, moment)
        level -= cost * UNIT
