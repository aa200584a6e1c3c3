"""Lease mode for a token bucket at central: the key's one global bucket. Pure, no I/O.

The authority keeps the bucket (its level, as of its last transaction); a grant withdraws
whole tokens from it into a node's slice, which the node spends without refilling; a
return puts the unspent tokens back. While a lease lasts, the tokens it holds that the
node has not reported spending might still be spent, so the bucket refills only up to
its capacity minus them. A lease that ends forfeits them: the node can no longer spend
them, and nobody knows how many it did, so they are not put back; the bucket refills.

With ``held(t)`` the unreported tokens of leases live at ``t``, the tokens that can
still be spent (the level plus what nodes hold) never exceed the capacity and grow at
most at the refill rate, so whatever the nodes admit, one token bucket of that capacity
and rate would have admitted it too (tests/unit/test_lease_bucket.py checks this under
any interleaving). Refills are computed at transactions only, piecewise between the
lease ends, each piece capped with the leases as of the previous transaction: reports
arriving now say nothing about when the tokens were spent.

Levels are in units of 1/``unit`` token (``unit`` = the policy's duration in ms): a
millisecond adds ``rate`` (the limit) units, so every refill is an exact integer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from central.lease.grants import DEFAULT_HORIZON_MS, Budget, Grant, acquire, give_back
from sync.policy import Policy


@dataclass(slots=True)
class Bucket:
    level: int  # units of 1/unit token
    at: int  # the level as of this moment (epoch ms): the key's last transaction
    rate: int  # units per ms: the policy's limit
    unit: int  # units per token: the policy's duration in ms
    full: int  # capacity in units

    @property
    def tokens(self) -> int:
        return max(0, self.level) // self.unit


def new_bucket(policy: Policy, now: int) -> Bucket:
    """A key's bucket when the authority first sees it: full, as one bucket would start."""
    unit = policy.duration.ms
    return Bucket(policy.capacity * unit, now, policy.limit, unit, policy.capacity * unit)


def under(bucket: Bucket, policy: Policy) -> Bucket:
    """The bucket under a (possibly changed) policy: whole tokens carry over, down to the
    new capacity."""
    unit = policy.duration.ms
    full = policy.capacity * unit
    level = bucket.level if unit == bucket.unit else bucket.tokens * unit
    return Bucket(min(level, full), bucket.at, policy.limit, unit, full)


def held(grants: dict[str, Grant], moment: int) -> int:
    """Tokens of leases live at ``moment`` that their nodes have not reported spending."""
    return sum(g.unused for g in grants.values() if g.expires_at > moment and g.unused > 0)


def refill(bucket: Bucket, grants: dict[str, Grant], now: int) -> None:
    """Refill to ``now``, up to the capacity minus what live leases hold, piece by piece
    between the moments leases end."""
    t = bucket.at
    if now <= t:
        return
    ends = sorted({g.expires_at for g in grants.values()
                   if t < g.expires_at < now and g.unused > 0})
    for boundary in (*ends, now):
        cap = bucket.full - held(grants, t) * bucket.unit
        if bucket.level < cap:
            bucket.level = min(cap, bucket.level + (boundary - t) * bucket.rate)
        t = boundary
    bucket.at = now


def full_at(bucket: Bucket, grants: dict[str, Grant]) -> int:
    """From when a fresh, full bucket with no leases is the same as this one: every lease
    has ended and the bucket has refilled (the key's rows may be pruned then)."""
    last = max((g.expires_at for g in grants.values()), default=bucket.at)
    probe = replace(bucket)
    refill(probe, grants, max(last, probe.at))
    missing = probe.full - probe.level
    return probe.at + (-(-missing // probe.rate) if missing > 0 else 0)


def lease(bucket: Bucket, grants: dict[str, Grant], node_id: str, *, op: str, seq: int,
          used: int, want: int, demand: int, now: int, ttl_ms: int,
          horizon_ms: int = DEFAULT_HORIZON_MS) -> tuple[Grant, list[str]]:
    """One request: refill, forfeit ended leases, then grant (``acquire``) or take back
    (``return``). ``node_id`` names one holder of slices whose count ``used`` (what it
    admitted from them, in total) never restarts: a node that forgets a key comes back
    under a new holder name (region_node/lease.py). Returns the holder's grant and the
    holders whose ended leases were dropped."""
    refill(bucket, grants, now)
    dropped = [node for node, g in grants.items() if g.expires_at <= now]
    for node in dropped:
        del grants[node]
    grant = grants.get(node_id)
    before = grant.granted if grant is not None else 0
    budget = Budget(limit=0, seeded=0, grants=grants, tokens=bucket.tokens)
    if op == "return":
        grant = give_back(budget, node_id, seq=seq, used=used, now=now, keep=want)
    else:
        grant = acquire(budget, node_id, seq=seq, used=used, want=want, demand=demand,
                        now=now, ttl_ms=ttl_ms, horizon_ms=horizon_ms)
    # Tokens moved from the bucket into the slice (negative: returned). A report beyond
    # the grant (which an honest node never sends) lifts the grant without a withdrawal.
    bucket.level -= (grant.granted - max(before, grant.reported)) * bucket.unit
    return grant, dropped
