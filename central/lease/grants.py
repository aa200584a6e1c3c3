"""Lease-mode grant arithmetic for one key's window: pure, no I/O.

A key's window has a budget: ``limit`` minus ``seeded`` (what fast or consistent mode
had admitted in the window before the key came to lease mode). Each node holds a grant:
the total it may admit in the window. The one invariant, kept by every operation here
for nodes that never spend beyond their grant:

    seeded + sum(grant.granted over nodes) <= limit    (or no grant grows while above)

Every operation runs with the key's row locked (central/lease/tx.py), so operations on a
key are serial whatever the number of replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A slice should last this long at the node's observed demand (Doorman-style sizing).
DEFAULT_HORIZON_MS = 1_000
# One node takes at most 1/MIN_SHARES of what nobody holds, so a second region that starts
# asking still finds budget left without waiting for the first to give some back.
MIN_SHARES = 2


@dataclass(slots=True)
class Grant:
    granted: int = 0  # the node may admit this much in the window, in total
    reported: int = 0  # what the node said it had admitted from its slices
    expires_at: int = 0  # the authority's view of the lease end (epoch ms)
    seq: int = 0  # the newest request applied: an older one arriving late is ignored
    demand: int = 0  # cost per second the node said its checks asked for, last time
    changed: bool = False  # to write back

    @property
    def unused(self) -> int:
        return self.granted - self.reported


@dataclass(slots=True)
class Budget:
    limit: int
    seeded: int
    grants: dict[str, Grant] = field(default_factory=dict)
    # A token bucket's whole tokens (central/lease/bucket.py): then these are the free
    # budget, and limit and seeded are unused.
    tokens: int | None = None

    @property
    def free(self) -> int:
        """Budget nobody holds."""
        if self.tokens is not None:
            return max(0, self.tokens)
        held = sum(g.granted for g in self.grants.values())
        return max(0, self.limit - self.seeded - held)


def slice_size(*, want: int, demand: int, unused: int, free: int, holders: int,
               others_demand: int = 0, horizon_ms: int = DEFAULT_HORIZON_MS) -> int:
    """How much to add to a node's grant.

    ``want`` is the cost the node must cover now beyond its ``unused`` slice: when the free
    budget cannot cover it, nothing is added (a partial slice could admit nothing and
    would only keep the units from other nodes). Beyond that, enough for ``horizon_ms`` of
    the node's ``demand`` (cost per second), but at most a fair share of the free budget:
    in proportion to its demand against the other holders' ``others_demand`` when they
    said theirs, else an equal share among the holders (at least MIN_SHARES ways).
    """
    if want > free or free <= 0:
        return 0
    target = -(-demand * horizon_ms // 1000) - unused  # ceil, less what it still holds
    if others_demand > 0:
        fair = -(-free * demand // (demand + others_demand))
    else:
        fair = -(-free // max(MIN_SHARES, holders))
    return min(free, max(want, min(target, fair)))


def acquire(budget: Budget, node_id: str, *, seq: int, used: int, want: int, demand: int,
            now: int, ttl_ms: int, horizon_ms: int = DEFAULT_HORIZON_MS) -> Grant:
    """Record what the node used and grow its grant; the lease runs ``ttl_ms`` from now."""
    grant = budget.grants.get(node_id)
    if grant is None:
        grant = budget.grants[node_id] = Grant()
    if seq <= grant.seq:
        return grant  # a late duplicate: the newer request already told more
    grant.seq, grant.changed = seq, True
    grant.reported = max(grant.reported, used)
    grant.granted = max(grant.granted, grant.reported)
    grant.demand = demand
    holding = [g for g in budget.grants.values() if g.unused > 0 and g is not grant]
    grant.granted += slice_size(want=max(0, want - grant.unused), demand=demand,
                                unused=grant.unused, free=budget.free,
                                holders=len(holding) + 1,
                                others_demand=sum(g.demand for g in holding),
                                horizon_ms=horizon_ms)
    grant.expires_at = now + ttl_ms
    return grant


def give_back(budget: Budget, node_id: str, *, seq: int, used: int, now: int, keep: int = 0
              ) -> Grant:
    """The node gives back all but ``keep`` of its unused slice (it has stopped spending
    the rest before asking): its grant shrinks to what it used plus ``keep``."""
    grant = budget.grants.get(node_id)
    if grant is None:
        grant = budget.grants[node_id] = Grant()
    if seq <= grant.seq:
        return grant
    grant.seq, grant.changed = seq, True
    grant.reported = max(grant.reported, used)
    kept = min(keep, max(0, grant.granted - grant.reported))
    grant.granted = grant.reported + kept
    if not kept:
        grant.expires_at = min(grant.expires_at, now)
    return grant


def reclaimable(budget: Budget, *, now: int, reclaim_after_ms: int) -> list[str]:
    """Nodes whose lease ended more than ``reclaim_after_ms`` ago still holding units.
    ``reclaim_after_ms`` 0 means never reclaim."""
    if reclaim_after_ms <= 0:
        return []
    return [node for node, g in budget.grants.items()
            if g.unused > 0 and g.expires_at + reclaim_after_ms <= now]


def reclaim(budget: Budget, published: dict[str, int], nodes: list[str]) -> int:
    """Shrink the expired grants of ``nodes`` to what each is known to have admitted: the
    larger of its report and its ledger component (``published``), never above its grant.
    Returns the units freed."""
    freed = 0
    for node in nodes:
        grant = budget.grants[node]
        floor = min(grant.granted, max(grant.reported, published.get(node, 0)))
        freed += grant.granted - floor
        grant.granted, grant.reported, grant.changed = floor, floor, True
    return freed
