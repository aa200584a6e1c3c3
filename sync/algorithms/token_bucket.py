"""Token bucket: ``burst`` capacity refilled at ``limit`` per ``duration``.

The level is kept in units of 1/duration_ms token: a millisecond adds ``limit`` units and a
token costs ``duration_ms`` units, so refill and retry times are exact integers. Cost
admitted by other nodes is debited when central reports it; the level may go negative."""

from __future__ import annotations

from sync.algorithms.base import Decision, KeyState, deny, new_decision, refill
from sync.policy import Policy


class TokenBucket:
    blocks = False
    past_windows = 0
    debits_remote = True
    windowed_usage = False
    lease_windows = False

    def decide(self, state: KeyState, policy: Policy, now: int, cost: int) -> Decision:
        d = policy.duration.ms
        rate = policy.limit
        # policy.capacity, inlined: this is a token bucket.
        full = (policy.burst if policy.burst is not None else rate) * d
        level = state.level
        if now > state.level_at:
            level += (now - state.level_at) * rate
            if level > full:
                level = full
            state.level = level
            state.level_at = now
        fits = level >= (cost or 1) * d
        if fits and state.blocked_until <= now:
            if cost:
                level = state.level = level - cost * d
                state.cur += cost
            return new_decision(Decision, (True, level // d, now - (level - full) // rate, None))
        reset_at = now - (level - full) // rate
        return deny(state, self, policy, now, cost, fits, max(0, level // d), reset_at)

    def retry_after(self, state: KeyState, policy: Policy, now: int, cost: int) -> int:
        return -((state.level - cost * policy.duration.ms) // policy.limit)

    def is_idle(self, state: KeyState, now: int) -> bool:
        policy = state.policy
        refill(state, policy, now)
        return state.level >= policy.capacity * policy.duration.ms and now >= state.cur_end
