"""A lease-mode key's demand estimate on the node (region_node/lease.py)."""

from __future__ import annotations

import math

from region_node.lease import DEMAND_TAU_S, YOUNG_AGE_MIN_S, LeaseClient, Slice
from sync.policy import build_policy

POLICY = build_policy(limit=1000, duration="1h", algorithm="fixed_window", mode="lease")


def test_a_young_key_counts_its_cost_over_its_age_not_the_lagging_average() -> None:
    s = Slice(POLICY, 0, 3_600_000, "eu.1", rate=24.0, rate_at=10.6, born=10.0,
              cost_so_far=24)
    assert math.isclose(LeaseClient._demand(s, 10.6), 24 / 0.6)


def test_a_first_check_is_not_taken_for_a_flood() -> None:
    s = Slice(POLICY, 0, 3_600_000, "eu.1", rate=1.0, rate_at=10.0, born=10.0,
              cost_so_far=1)
    assert LeaseClient._demand(s, 10.0) == 1 / YOUNG_AGE_MIN_S


def test_an_older_key_uses_the_moving_average() -> None:
    s = Slice(POLICY, 0, 3_600_000, "eu.1", rate=50.0, rate_at=11.0, born=10.0,
              cost_so_far=500)
    assert LeaseClient._demand(s, 10.0 + DEMAND_TAU_S) == 50.0
