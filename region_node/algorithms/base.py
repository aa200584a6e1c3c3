"""What an algorithm sees (KeyState) and answers (Decision)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from sync.policy import Policy

CUR_DIRTY = 1
PREV_DIRTY = 2


class Decision(NamedTuple):
    allowed: bool
    remaining: int
    reset_at: int
    retry_after_ms: int | None


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
    state.cur_denied += cost
    retry = state.blocked_until - now
    if not fits:
        retry = max(retry, algorithm.retry_after(state, policy, now, cost or 1))
    if state.blocked_until > now:
        remaining, reset_at = 0, max(reset_at, state.blocked_until)
    return Decision(False, remaining, reset_at, retry)
