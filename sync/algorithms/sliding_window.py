"""Sliding window: the current window plus the previous one weighted by the part of it
still inside the span. All arithmetic is scaled by the window length, so it is exact."""

from __future__ import annotations

from sync.algorithms.base import Decision, KeyState, deny, new_decision
from sync.policy import Policy


class SlidingWindow:
    blocks = True
    past_windows = 1
    debits_remote = False
    windowed_usage = True
    lease_windows = True  # never leased (sync/policy.py LEASE_ALGORITHMS)

    def decide(self, state: KeyState, policy: Policy, now: int, cost: int) -> Decision:
        d = policy.duration.ms
        cur = state.cur + state.remote_cur
        # Room left, times d: limit * d - prev * (d - elapsed) - cur * d.
        room = (policy.limit - cur) * d - (state.prev + state.remote_prev) * (
            d - now + state.cur_start)
        fits = room >= (cost or 1) * d
        if fits and state.blocked_until <= now:
            state.cur += cost
            reset_at = state.cur_end + d if cur + cost else state.cur_end
            return new_decision(Decision, (True, room // d - cost, reset_at, None))
        reset_at = state.cur_end + d if cur else state.cur_end
        return deny(state, self, policy, now, cost, fits, max(0, room // d), reset_at)

    def retry_after(self, state: KeyState, policy: Policy, now: int, cost: int) -> int:
        d = policy.duration.ms
        limit = policy.limit
        prev = state.prev + state.remote_prev
        cur = state.cur + state.remote_cur
        if cur + cost <= limit:
            # Fits once the previous window's weight has shrunk enough, this window.
            return state.cur_end - ((limit - cur - cost) * d) // prev - now
        # Next window: today's total becomes the weighted previous one.
        return state.cur_end + d - ((limit - cost) * d) // cur - now

    def is_idle(self, state: KeyState, now: int) -> bool:
        return now >= state.cur_end + state.policy.duration.ms
