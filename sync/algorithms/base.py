"""What an algorithm sees (KeyState) and answers (Decision)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from sync.durations import Duration
from sync.policy import Policy

Bounds = Callable[[Duration, int], tuple[int, int]]
Retire = Callable[["KeyState", bool], None]  # (state, both windows?) before they move

# Counters saturate here instead of growing without bound: 2^53 - 1 keeps every count an
# exact JSON number, and the ledger's BIGINT sums (one count per node, added per region
# and hour) stay far from 2^63 - 1. Only denied cost can get near it (denials have no cap).
MAX_COUNT = 2**53 - 1

CUR_DIRTY = 1
PREV_DIRTY = 2


class Decision(NamedTuple):
    allowed: bool
    remaining: int
    reset_at: int
    retry_after_ms: int | None


# The hot path builds decisions with ``new_decision(Decision, (allowed, remaining, reset_at,
# retry_after_ms))``: a NamedTuple's generated __new__ costs several times more than the
# decision itself (bench/node_bench.py).
new_decision = tuple.__new__


class KeyState:
    """Counters of one key on this node, for the current window and the one before it.

    ``cur``/``prev`` are the cost this node admitted; ``remote_*`` what the other nodes
    admitted as central last reported it. ``level`` is a token bucket's content in units of
    1/duration_ms token, so refill and retry times are exact integers.
    """

    __slots__ = (
        "blocked_until",
        "cur",
        "cur_denied",
        "cur_end",
        "cur_start",
        "flags",
        "level",
        "level_at",
        "policy",
        "prev",
        "prev_denied",
        "remote_cur",
        "remote_prev",
    )

    def __init__(self, policy: Policy, cur_start: int, cur_end: int, now: int) -> None:
        self.policy = policy
        self.cur_start = cur_start
        self.cur_end = cur_end
        self.cur = 0
        self.cur_denied = 0
        self.prev = 0
        self.prev_denied = 0
        self.remote_cur = 0
        self.remote_prev = 0
        self.blocked_until = 0
        self.flags = 0
        self.level = policy.capacity * policy.duration.ms
        self.level_at = now


class Algorithm(Protocol):
    """One algorithm, one file. Besides deciding, it answers what callers would otherwise
    branch on by name (the counters, central's totals, consistent mode)."""

    blocks: bool
    """Reaching the limit blocks the key until its window ends (central's block decision
    reaches every node). A token bucket refills instead: it never blocks, and may admit
    more than limit per window (its burst)."""

    past_windows: int
    """Whole windows before the current one whose usage still weighs on a decision."""

    debits_remote: bool
    """Other nodes' usage, when central reports it, is taken out of this node's state (a
    token bucket's level), so a window's totals matter until one window after its end."""

    windowed_usage: bool
    """Usage counted per window says what is left, so a new key may start from the usage
    of its windows. A token bucket's windows say how much was used, not when: not how much
    has refilled since."""

    lease_windows: bool
    """Lease-mode slices belong to a window and its budget. False: to no window; they are
    tokens withdrawn from the key's one global bucket, which refills (a token bucket;
    central/lease/bucket.py)."""

    def decide(self, state: KeyState, policy: Policy, now: int, cost: int) -> Decision:
        """Admit ``cost`` if it fits (and record it), else record a denial. ``cost`` 0 asks
        whether one unit would fit and consumes nothing."""

    def retry_after(self, state: KeyState, policy: Policy, now: int, cost: int) -> int:
        """Milliseconds from ``now`` until ``cost`` fits, absent other traffic (> 0)."""

    def is_idle(self, state: KeyState, now: int) -> bool:
        """True when forgetting the state changes no future decision."""


def deny(state: KeyState, algorithm: Algorithm, policy: Policy, now: int, cost: int,
         fits: bool, remaining: int, reset_at: int) -> Decision:
    """Record a denial; ``fits`` is true when only a central block decision denies."""
    denied = state.cur_denied + cost
    state.cur_denied = denied if denied < MAX_COUNT else MAX_COUNT
    retry = state.blocked_until - now
    if not fits:
        retry = max(retry, algorithm.retry_after(state, policy, now, cost or 1))
    if state.blocked_until > now:
        remaining, reset_at = 0, max(reset_at, state.blocked_until)
    return new_decision(Decision, (False, remaining, reset_at, retry))


def refill(state: KeyState, policy: Policy, now: int) -> None:
    """Token bucket refill up to ``now`` (here so window stepping can use it too)."""
    if now > state.level_at:
        full = policy.capacity * policy.duration.ms
        state.level = min(full, state.level + (now - state.level_at) * policy.limit)
        state.level_at = now


def advance(state: KeyState, policy: Policy, now: int, bounds: Bounds,
            retire: Retire | None = None) -> None:
    """Bring ``state`` under ``policy`` to the window holding ``now``.

    ``retire`` sees the windows about to be forgotten (the previous one, or both), so a
    caller can keep what was never published."""
    old = state.policy
    if old.duration != policy.duration or old.algorithm != policy.algorithm:
        # Different windows or algorithm: counts start over, except that a new window
        # starting where the old one did holds all of the old one's usage so far (both
        # began at the same instant). Keeping it also keeps this node's published count
        # for that window start from going down, which the max-merge would drop.
        if retire is not None:
            retire(state, True)
        start, end = bounds(policy.duration, now)
        same_start = start == state.cur_start and old.algorithm == policy.algorithm
        cur, cur_denied = state.cur, state.cur_denied
        KeyState.__init__(state, policy, start, end, now)
        if same_start:
            state.cur, state.cur_denied = cur, cur_denied
        return
    if old.algorithm == "token_bucket":
        refill(state, old, now)
        state.level = min(state.level, policy.capacity * policy.duration.ms)
    state.policy = policy
    if now < state.cur_end:
        return
    start, end = bounds(policy.duration, now)
    if start == state.cur_end:
        if retire is not None:
            retire(state, False)
        state.prev, state.prev_denied = state.cur, state.cur_denied
        state.remote_prev = state.remote_cur
        state.flags = PREV_DIRTY if state.flags & CUR_DIRTY else 0
    else:
        if retire is not None:
            retire(state, True)
        state.prev = state.prev_denied = state.remote_prev = 0
        state.flags = 0
    state.cur = state.cur_denied = state.remote_cur = 0
    state.cur_start, state.cur_end = start, end
