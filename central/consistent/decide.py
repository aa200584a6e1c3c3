"""The authority's decisions for one batch, given the locked rows: pure, no I/O.

Both transaction kinds (central/consistent/tx.py) lock the batch's rows, hand them here,
and write back what comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sync.algorithms import ALGORITHMS
from sync.algorithms.base import KeyState, advance
from sync.messages import ConsistentDecision, ConsistentRequest
from sync.policy import Policy, build_policy
from sync.windows import hour_start, window_bounds

KeyId = tuple[str, str]  # namespace, key hash
STATE_FIELDS = ("cur_start", "cur_end", "cur", "cur_denied", "prev", "level_at")


class Row(Protocol):
    """A consistent_keys row by column name (asyncpg Record, SQLAlchemy RowMapping)."""

    def __getitem__(self, name: str, /) -> Any: ...


@dataclass(slots=True)
class BatchOutcome:
    decisions: list[ConsistentDecision]
    states: dict[KeyId, KeyState]
    # (namespace, key hash, region) -> [admitted, denied], for usage_hourly at ``hour``.
    usage: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    hour: int = 0


def state_from_row(row: Row, now: int) -> KeyState:
    stored = build_policy(limit=row["limit"], duration=row["duration"],
                          algorithm=row["algorithm"], burst=row["burst"])
    state = KeyState(stored, row["cur_start"], row["cur_end"], now)
    state.cur, state.cur_denied, state.prev = row["cur"], row["cur_denied"], row["prev"]
    state.level, state.level_at = int(row["level"]), row["level_at"]
    return state


def state_columns(state: KeyState, now: int) -> dict[str, Any]:
    """A consistent_keys row's columns other than its key."""
    policy = state.policy
    return {**{name: getattr(state, name) for name in STATE_FIELDS},
            "level": str(state.level), "limit": policy.limit, "burst": policy.burst,
            "duration": policy.duration.text, "algorithm": policy.algorithm,
            "updated_at": now}


def first_policies(requests: Sequence[ConsistentRequest]) -> dict[KeyId, Policy]:
    """Each key's policy as its first request carries it, in key order (the lock order)."""
    first: dict[KeyId, Policy] = {}
    for r in requests:
        first.setdefault((r.namespace, r.key_hash), r.policy)
    return dict(sorted(first.items()))


# (namespace, key hash, window start) -> admitted cost the ledger's components hold
WindowUsage = dict[tuple[str, str, int], int]


def seed_starts(policy: Policy, now: int) -> list[int]:
    """Window starts whose fast-mode usage a new key's row starts from: the current
    window, and for a sliding window the one before. A token bucket starts full: its
    windows say how much was used, not when, so not how much has refilled since."""
    algorithm = ALGORITHMS[policy.algorithm]
    if not algorithm.windowed_usage:
        return []
    start, _ = window_bounds(policy.duration, now)
    return [start - back * policy.duration.ms for back in range(1 + algorithm.past_windows)]


def fresh_row(key: KeyId, policy: Policy, now: int, used: WindowUsage | None = None
              ) -> dict[str, Any]:
    """The row of a key the authority has never seen (or pruned as idle), counting what
    fast mode admitted in its windows: a namespace switched to consistent mode mid-window
    keeps the usage it had."""
    start, end = window_bounds(policy.duration, now)
    state = KeyState(policy, start, end, now)
    if used:
        for name, window in zip(("cur", "prev"), seed_starts(policy, now), strict=False):
            setattr(state, name, used.get((*key, window), 0))
    return {"namespace": key[0], "key_hash": key[1], **state_columns(state, now)}


def decide_batch(requests: Sequence[ConsistentRequest], states: dict[KeyId, KeyState],
                 now: int) -> BatchOutcome:
    """Decide ``requests`` in arrival order against ``states`` (updated in place)."""
    outcome = BatchOutcome([], states, hour=hour_start(now))
    usage = outcome.usage
    for r in requests:
        state = states[(r.namespace, r.key_hash)]
        advance(state, r.policy, now, window_bounds)
        d = ALGORITHMS[r.policy.algorithm].decide(state, r.policy, now, r.cost)
        outcome.decisions.append(
            ConsistentDecision(d.allowed, d.remaining, d.reset_at, d.retry_after_ms))
        counts = usage.setdefault((r.namespace, r.key_hash, r.region), [0, 0])
        counts[0 if d.allowed else 1] += r.cost
    outcome.usage = {k: c for k, c in sorted(usage.items()) if c[0] or c[1]}
    return outcome
