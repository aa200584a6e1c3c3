"""Central's in-memory view of usage: per key-window, one grow-only component per node.

Merging takes the maximum per component, so duplicates, redeliveries and reordered
batches change nothing. Whenever a component's maximum rises, the increase goes to the
hourly usage bucket of the batch's flush time. Pure: no I/O, time passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from central.ledger_rows import BucketIncrement, ComponentRow
from sync.algorithms import ALGORITHMS
from sync.messages import KeyTotal, UsageBatch
from sync.policy import Policy, build_policy
from sync.windows import hour_start, window_bounds, window_end

FUTURE_TOLERANCE_MS = 3_600_000  # clock skew we accept on a window start
WindowKey = tuple[str, str, int]  # namespace, key hash, window start
MAX_NAMESPACE_LABELS = 100


@dataclass(slots=True)
class Component:
    region: str
    admitted: int = 0
    denied: int = 0


@dataclass(slots=True)
class KeyWindow:
    window_end: int
    policy: Policy
    policy_at: int  # flush time of the batch whose policy this is (newest wins)
    components: dict[str, Component] = field(default_factory=dict)
    total: int = 0
    as_of: int = 0
    over: int = 0

    @property
    def blocked_until(self) -> int:
        if ALGORITHMS[self.policy.algorithm].blocks and self.total >= self.policy.limit:
            return self.window_end
        return 0


class TotalsObserver(Protocol):
    """Told as key-windows change, so an index kept alongside (the snapshot index,
    central/partitions/snapshot_index.py) never has to scan every key."""

    def served(self, node_id: str, key: WindowKey) -> None:
        """``node_id`` has its first component in ``key``."""

    def blocked(self, key: WindowKey) -> None:
        """``key`` became blocked."""

    def unblocked(self, key: WindowKey) -> None:
        """``key`` is no longer blocked (a newer policy raised its limit)."""

    def removed(self, key: WindowKey, node_ids: list[str]) -> None:
        """``key`` was pruned; ``node_ids`` had components in it."""


@dataclass(slots=True)
class MergeOutcome:
    raised: int = 0  # components whose maximum rose
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> entries


class GlobalTotals:
    def __init__(self, *, retention_ms: int,
                 over_admission: dict[str, int] | None = None,
                 observer: TotalsObserver | None = None) -> None:
        self.retention_ms = retention_ms
        self._observer = observer
        self.windows: dict[WindowKey, KeyWindow] = {}
        self._changed: set[WindowKey] = set()  # to broadcast at the next tick
        self._unsaved: set[tuple[WindowKey, str]] = set()  # components to commit
        self._increments: dict[tuple[str, str, str, int], list[int]] = {}
        # Shared across leadership terms by the caller: it backs a Prometheus counter,
        # which must not drop when a new term rebuilds the totals.
        self.over_admission: dict[str, int] = {} if over_admission is None else over_admission
        self._labels: set[str] = set()

    # --- merging -----------------------------------------------------------------------

    def merge(self, batch: UsageBatch, now: int) -> MergeOutcome:
        outcome = MergeOutcome()
        hour = hour_start(batch.flushed_at)
        for entry in batch.entries:
            # The future check comes first: window arithmetic on an absurd date would fail.
            start, end = entry.window_start, 0
            if start > now + FUTURE_TOLERANCE_MS:
                reason = "future_window"
            else:
                start, end = window_bounds(entry.policy.duration, entry.window_start)
                if start != entry.window_start:
                    reason = "misaligned_window"
                elif end + self.retention_ms <= now:
                    reason = "pruned_window"
                else:
                    reason = ""
            if reason:
                outcome.rejected[reason] = outcome.rejected.get(reason, 0) + 1
                continue
            key = (entry.namespace, entry.key_hash, start)
            window = self.windows.get(key)
            was_blocked = False
            if window is None:
                window = self.windows[key] = KeyWindow(end, entry.policy, batch.flushed_at)
            else:
                was_blocked = window.blocked_until > 0
                if batch.flushed_at >= window.policy_at:
                    # The newest policy decides limit and window end (blocks last until it).
                    window.policy, window.policy_at = entry.policy, batch.flushed_at
                    window.window_end = end
            component = window.components.get(batch.node_id)
            if component is None:
                component = window.components[batch.node_id] = Component(batch.region)
                if self._observer is not None:
                    self._observer.served(batch.node_id, key)
            more_admitted = entry.admitted - component.admitted
            more_denied = entry.denied - component.denied
            if more_admitted <= 0 and more_denied <= 0:
                self._note_block(key, window, was_blocked=was_blocked)
                continue
            outcome.raised += 1
            bucket = self._increments.setdefault(
                (entry.namespace, entry.key_hash, batch.region, hour), [0, 0])
            if more_admitted > 0:
                component.admitted = entry.admitted
                window.total += more_admitted
                bucket[0] += more_admitted
                window.as_of = max(window.as_of, batch.flushed_at)
            if more_denied > 0:
                component.denied = entry.denied
                bucket[1] += more_denied
            self._changed.add(key)
            self._unsaved.add((key, batch.node_id))
            self._measure_over_admission(entry.namespace, window)
            self._note_block(key, window, was_blocked=was_blocked)
        return outcome

    def _note_block(self, key: WindowKey, window: KeyWindow, *, was_blocked: bool) -> None:
        if self._observer is None:
            return
        blocked = window.blocked_until > 0
        if blocked and not was_blocked:
            self._observer.blocked(key)
        elif was_blocked and not blocked:
            self._observer.unblocked(key)

    def _measure_over_admission(self, namespace: str, window: KeyWindow) -> None:
        if not ALGORITHMS[window.policy.algorithm].blocks:
            return  # a token bucket may legitimately exceed limit per window (burst)
        over = max(0, window.total - window.policy.limit)
        if over > window.over:
            label = self.label(namespace)
            self.over_admission[label] = self.over_admission.get(label, 0) + over - window.over
            window.over = over

    def label(self, namespace: str) -> str:
        """Namespaces label metrics up to a cap, so inline namespaces can't grow them."""
        if namespace in self._labels:
            return namespace
        if len(self._labels) < MAX_NAMESPACE_LABELS:
            self._labels.add(namespace)
            return namespace
        return "other"

    # --- broadcasting ------------------------------------------------------------------

    def key_total(self, key: WindowKey) -> KeyTotal:
        window = self.windows[key]
        return KeyTotal(key[0], key[1], key[2], window.total,
                        {node: c.admitted for node, c in window.components.items()},
                        window.blocked_until, window.policy, window.as_of)

    def take_changed(self) -> list[KeyTotal]:
        changed = [self.key_total(key) for key in self._changed if key in self.windows]
        self._changed.clear()
        return changed

    def is_live(self, key: WindowKey, now: int) -> bool:
        """The key-window can still affect a decision (sliding: one window longer)."""
        window = self.windows.get(key)
        if window is None:
            return False
        past_windows = ALGORITHMS[window.policy.algorithm].past_windows
        return window.window_end + past_windows * window.policy.duration.ms > now

    # --- persisting --------------------------------------------------------------------

    def take_unsaved(self, now: int) -> tuple[list[ComponentRow], list[BucketIncrement]]:
        rows = []
        for key, node_id in self._unsaved:
            window = self.windows.get(key)
            if window is None:
                continue
            c = window.components[node_id]
            p = window.policy
            rows.append(ComponentRow(
                namespace=key[0], key_hash=key[1], window_start=key[2], node_id=node_id,
                region=c.region, window_end=window.window_end, admitted=c.admitted,
                denied=c.denied, limit=p.limit, duration=p.duration.text,
                algorithm=p.algorithm, burst=p.burst, updated_at=now))
        increments = [BucketIncrement(ns, key_hash, region, hour, a, d)
                      for (ns, key_hash, region, hour), (a, d) in self._increments.items()]
        self._unsaved.clear()
        self._increments.clear()
        return rows, increments

    def return_unsaved(self, rows: Iterable[ComponentRow],
                       increments: Iterable[BucketIncrement]) -> None:
        """A commit failed: keep its rows and increments for the next one."""
        for row in rows:
            self._unsaved.add(((row.namespace, row.key_hash, row.window_start), row.node_id))
        for inc in increments:
            bucket = self._increments.setdefault(
                (inc.namespace, inc.key_hash, inc.region, inc.hour_start), [0, 0])
            bucket[0] += inc.admitted
            bucket[1] += inc.denied

    @property
    def unsaved(self) -> int:
        return len(self._unsaved) + len(self._increments)

    # --- loading and pruning -----------------------------------------------------------

    def load(self, rows: Iterable[ComponentRow]) -> None:
        """Rebuild from the ledger (a new leader); replaces the in-memory state. The
        observer is told of the loaded keys only: give a rebuilt table a new observer."""
        self.windows.clear()
        self.load_more(rows)

    def load_more(self, rows: Iterable[ComponentRow]) -> None:
        """Add one more chunk of a rebuild from the ledger (rows of distinct components)."""
        for row in rows:
            policy = build_policy(limit=row.limit, duration=row.duration,
                                  algorithm=row.algorithm, burst=row.burst)
            key = (row.namespace, row.key_hash, row.window_start)
            window = self.windows.get(key)
            was_blocked = False
            if window is None:
                end = window_end(policy.duration, row.window_start)
                window = self.windows[key] = KeyWindow(end, policy, row.updated_at)
            else:
                was_blocked = window.blocked_until > 0
                if row.updated_at >= window.policy_at:
                    window.policy, window.policy_at = policy, row.updated_at
            window.components[row.node_id] = Component(row.region, row.admitted, row.denied)
            window.total += row.admitted
            window.over = max(0, window.total - window.policy.limit)
            self._changed.add(key)
            if self._observer is not None:
                self._observer.served(row.node_id, key)
            self._note_block(key, window, was_blocked=was_blocked)

    def prune(self, now: int) -> int:
        expired = [key for key, w in self.windows.items()
                   if w.window_end + self.retention_ms <= now]
        for key in expired:
            window = self.windows.pop(key)
            if self._observer is not None:
                self._observer.removed(key, list(window.components))
        return len(expired)
