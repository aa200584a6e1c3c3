"""Per-key counters of one node: decisions, the publication outbox, remote totals, eviction.

Everything here runs on the event loop thread without awaiting, so a check on one key is
atomic. Usage leaves the store only through ``take_usage``; until the caller confirms
publication the entries are owned by the caller, and ``return_usage`` puts them back.
"""

from __future__ import annotations

from collections.abc import Iterable

from sync.algorithms import ALGORITHMS
from sync.algorithms.base import (
    CUR_DIRTY,
    MAX_COUNT,
    PREV_DIRTY,
    Decision,
    KeyState,
    advance,
    refill,
)
from sync.durations import Duration
from sync.interest import node_keeps
from sync.messages import KeyTotal, UsageBatch, UsageEntry
from sync.policy import Policy
from sync.windows import HOUR_MS, month_bounds, window_bounds

UsageGroups = list[tuple[int, list[UsageEntry]]]  # (flushed_at, entries), oldest first


def state_key(namespace: str, key_hash: str) -> str:
    # "/" never occurs in a namespace, and the hash has a fixed length.
    return f"{namespace}/{key_hash}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, key_hash = key.rpartition("/")
    return namespace, key_hash


def previous_window_start(duration: Duration, cur_start: int) -> int:
    if duration.is_month:
        return month_bounds(cur_start - 1)[0]
    return cur_start - duration.ms


class CounterStore:
    def __init__(self, *, publishes: bool = True) -> None:
        # A standalone node has nowhere to publish: tracking unpublished usage would only
        # keep every key ever seen from being evicted.
        self._publishes = publishes
        self._states: dict[str, KeyState] = {}
        self._dirty: set[str] = set()
        # Entries that left the live state before publication: retired windows, sealed
        # hours and failed publications, keyed so a later snapshot of the same
        # key-window-hour replaces an earlier one (values are cumulative).
        self._outbox: dict[tuple[str, int, int], tuple[int, UsageEntry]] = {}
        self._bounds: dict[Duration, tuple[int, int]] = {}
        self._hour_end = 0
        self._sweep: list[str] = []
        self.evictions = 0
        self.totals_ignored = 0  # received, but for keys this node neither serves nor needs

    # --- checks ----------------------------------------------------------------------

    def check(self, namespace: str, key_hash: str, policy: Policy, cost: int,
              now: int) -> Decision:
        key, state = self._current(namespace, key_hash, policy, now)
        decision = ALGORITHMS[policy.algorithm].decide(state, policy, now, cost)
        if cost and self._publishes:
            state.flags |= CUR_DIRTY
            self._dirty.add(key)
        return decision

    def record(self, namespace: str, key_hash: str, policy: Policy, cost: int,
               admitted: bool, now: int) -> None:
        """Count usage decided elsewhere (a consistent-mode fallback) so it is published."""
        key, state = self._current(namespace, key_hash, policy, now)
        if admitted:
            state.cur = min(MAX_COUNT, state.cur + cost)
        else:
            state.cur_denied = min(MAX_COUNT, state.cur_denied + cost)
        if cost and self._publishes:
            state.flags |= CUR_DIRTY
            self._dirty.add(key)

    def admit_denied(self, namespace: str, key_hash: str, cost: int) -> None:
        """Turn the denial ``check`` just recorded into admitted usage (shadow mode): the
        key's counters, its token bucket and the ledger then see it as let through."""
        state = self._states[f"{namespace}/{key_hash}"]
        state.cur_denied -= cost
        state.cur += cost
        if ALGORITHMS[state.policy.algorithm].debits_remote:
            # An algorithm that debits usage from a level (a token bucket) takes the
            # admitted cost out as it does remote usage; ``check`` just refilled it to now.
            # The level may go negative, as with remote debits.
            state.level -= cost * state.policy.duration.ms

    def _current(self, namespace: str, key_hash: str, policy: Policy, now: int
                 ) -> tuple[str, KeyState]:
        """The key's state, brought to the window holding ``now``."""
        if now >= self._hour_end:
            self._seal_hour(now)
        key = f"{namespace}/{key_hash}"
        state = self._states.get(key)
        if state is None:
            start, end = self._window(policy.duration, now)
            state = self._states[key] = KeyState(policy, start, end, now)
        elif now >= state.cur_end or state.policy is not policy:
            self._advance(key, state, policy, now)
        return key, state

    def _window(self, duration: Duration, now: int) -> tuple[int, int]:
        bounds = self._bounds.get(duration)
        if bounds is None or not bounds[0] <= now < bounds[1]:
            bounds = self._bounds[duration] = window_bounds(duration, now)
        return bounds

    def _advance(self, key: str, state: KeyState, policy: Policy, now: int) -> None:
        advance(state, policy, now, self._window,
                lambda old, both: self._retire(key, old, now, both=both))

    def _retire(self, key: str, state: KeyState, now: int, *, both: bool) -> None:
        """Move the windows about to be forgotten into the outbox if unpublished."""
        if not self._publishes:
            return
        namespace, key_hash = split_key(key)
        if state.flags & PREV_DIRTY:
            start = previous_window_start(state.policy.duration, state.cur_start)
            self._to_outbox(now, UsageEntry(namespace, key_hash, start, state.prev,
                                            state.prev_denied, state.policy))
        if both and state.flags & CUR_DIRTY:
            self._to_outbox(now, UsageEntry(namespace, key_hash, state.cur_start, state.cur,
                                            state.cur_denied, state.policy))
        state.flags = 0 if both else state.flags & CUR_DIRTY

    def _to_outbox(self, flushed_at: int, entry: UsageEntry) -> None:
        slot = (f"{entry.namespace}/{entry.key_hash}", entry.window_start, flushed_at // HOUR_MS)
        held = self._outbox.get(slot)
        if held is None or held[0] <= flushed_at:
            self._outbox[slot] = (flushed_at, entry)

    def _seal_hour(self, now: int) -> None:
        """Usage is billed by the hour of its flush: at an hour boundary, everything not yet
        published belongs to the hour that just ended."""
        if self._hour_end:
            for flushed_at, entries in self._take_live(self._hour_end - 1):
                for entry in entries:
                    self._to_outbox(flushed_at, entry)
        self._hour_end = now - now % HOUR_MS + HOUR_MS

    # --- publication -----------------------------------------------------------------

    @property
    def unpublished(self) -> int:
        """Key-windows awaiting publication (live dirty keys plus the outbox)."""
        return len(self._dirty) + len(self._outbox)

    def take_usage(self, now: int) -> UsageGroups:
        """Everything unpublished, grouped by flush time; the caller publishes it or calls
        ``return_usage``."""
        if now >= self._hour_end:
            self._seal_hour(now)
        groups: dict[int, list[UsageEntry]] = {}
        for flushed_at, entry in self._outbox.values():
            groups.setdefault(flushed_at, []).append(entry)
        self._outbox.clear()
        for flushed_at, entries in self._take_live(now):
            groups.setdefault(flushed_at, []).extend(entries)
        return sorted(groups.items())

    def _take_live(self, flushed_at: int) -> UsageGroups:
        entries = []
        for key in self._dirty:
            state = self._states[key]
            namespace, key_hash = split_key(key)
            if state.flags & CUR_DIRTY:
                entries.append(UsageEntry(namespace, key_hash, state.cur_start, state.cur,
                                          state.cur_denied, state.policy))
            if state.flags & PREV_DIRTY:
                start = previous_window_start(state.policy.duration, state.cur_start)
                entries.append(UsageEntry(namespace, key_hash, start, state.prev,
                                          state.prev_denied, state.policy))
            state.flags = 0
        self._dirty.clear()
        return [(flushed_at, entries)] if entries else []

    def return_usage(self, groups: Iterable[tuple[int, list[UsageEntry]]]) -> None:
        """Publication failed: keep the entries until the next attempt."""
        for flushed_at, entries in groups:
            for entry in entries:
                self._to_outbox(flushed_at, entry)

    # --- state from central ------------------------------------------------------------

    def apply_totals(self, totals: Iterable[KeyTotal], node_id: str, now: int, *,
                     addressed: bool = True) -> list[KeyTotal]:
        """Apply central's totals; returns those that raised a remote count.

        ``addressed``: central sent these to this node (its own subject, its snapshot).
        Otherwise (a shared subject) a total is kept only for a key this node serves (it
        holds state for it or has a component in it) or that is blocked: the interest rule
        of sync/interest.py, so a node holds what it serves, not every key of every
        region."""
        if now >= self._hour_end:
            self._seal_hour(now)  # rolling a window below must not move usage across hours
        raised = []
        for total in totals:
            remote = total.total - total.components.get(node_id, 0)
            key = f"{total.namespace}/{total.key_hash}"
            state = self._states.get(key)
            policy = state.policy if state is not None else total.policy
            duration = policy.duration
            start, end = window_bounds(duration, total.window_start)
            if start != total.window_start:
                continue  # central counted under another window length
            # A sliding window weighs the previous window; a token bucket still debits
            # other nodes' usage of a window that has just ended.
            algorithm = ALGORITHMS[policy.algorithm]
            weighs_after_end = algorithm.past_windows > 0 or algorithm.debits_remote
            horizon = end + (duration.ms if weighs_after_end else 0)
            if horizon <= now and total.blocked_until <= now:
                continue
            if state is None:
                blocked = total.blocked_until > now
                if not node_keeps(served_in_window=node_id in total.components,
                                  addressed=addressed, blocked=blocked):
                    self.totals_ignored += 1
                    continue
                if remote <= 0 and not blocked:
                    continue
                state = self._states[key] = KeyState(policy, start, end, now)
            elif start >= state.cur_end:
                self._advance(key, state, policy, max(now, start))
            if total.blocked_until > state.blocked_until:
                state.blocked_until = total.blocked_until
            if start == state.cur_start:
                delta = remote - state.remote_cur
                if delta > 0:
                    state.remote_cur = remote
            elif start == previous_window_start(duration, state.cur_start):
                delta = remote - state.remote_prev
                if delta > 0:
                    state.remote_prev = remote
            else:
                continue
            if delta > 0:
                raised.append(total)
                if algorithm.debits_remote:
                    refill(state, policy, now)
                    state.level -= delta * duration.ms
        return raised

    def seed_remote(self, batches: Iterable[UsageBatch], now: int) -> None:
        """Usage of this node's former selves (from a spill file) counts as remote until
        central reports it: per key-window, the sum over node ids of each one's newest
        (largest) cumulative count."""
        counts: dict[tuple[str, str, int], dict[str, UsageEntry]] = {}
        for batch in batches:
            for entry in batch.entries:
                per_node = counts.setdefault(
                    (entry.namespace, entry.key_hash, entry.window_start), {})
                held = per_node.get(batch.node_id)
                if held is None or held.admitted < entry.admitted:
                    per_node[batch.node_id] = entry
        self.apply_totals([
            KeyTotal(ns, key_hash, start, sum(e.admitted for e in per_node.values()), {}, 0,
                     next(iter(per_node.values())).policy)
            for (ns, key_hash, start), per_node in counts.items()], "", now)

    # --- memory ------------------------------------------------------------------------

    @property
    def active_keys(self) -> int:
        return len(self._states)

    def evict(self, now: int, *, budget: int = 20_000) -> int:
        """Forget up to ``budget`` keys' worth of idle state; a full pass spans many calls
        so no single call stalls the event loop."""
        if not self._sweep:
            self._sweep = list(self._states)
        chunk = self._sweep[-budget:]
        del self._sweep[-budget:]
        evicted = 0
        for key in chunk:
            state = self._states.get(key)
            if state is None or key in self._dirty or state.blocked_until > now:
                continue
            if ALGORITHMS[state.policy.algorithm].is_idle(state, now):
                del self._states[key]
                evicted += 1
        self.evictions += evicted
        return evicted

    def get(self, namespace: str, key_hash: str) -> KeyState | None:
        return self._states.get(state_key(namespace, key_hash))
