"""Fixed window: at most ``limit`` cost per epoch-aligned window (or calendar month)."""

from __future__ import annotations

from sync.algorithms.base import Decision, KeyState, deny, new_decision
from sync.policy import Policy


class FixedWindow:
    blocks = True
    past_windows = 0
    debits_remote = False
    windowed_usage = True
    lease_windows = True

    def decide(self, state: KeyState, policy: Policy, now: int, cost: int) -> Decision:
        used = state.cur + state.remote_cur
        limit = policy.limit
        fits = used + (cost or 1) <= limit
        if fits and state.blocked_until <= now:
            state.cur += cost
            return new_decision(Decision, (True, limit - used - cost, state.cur_end, None))
        return deny(state, self, policy, now, cost, fits, max(0, limit - used), state.cur_end)

    def retry_after(self, state: KeyState, policy: Policy, now: int, cost: int) -> int:
        return state.cur_end - now

    def is_idle(self, state: KeyState, now: int) -> bool:
        return now >= state.cur_end
