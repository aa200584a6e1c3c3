"""Central's in-memory view of usage: per key-window, one grow-only component per node.

Merging takes the maximum per component, so duplicates, redeliveries and reordered
batches change nothing. Whenever a component's maximum rises, the increase goes to the
hourly usage bucket of the batch's flush time. Pure: no I/O, time passed in.

Components live in a compact ``ComponentTable`` (central/partitions/components.py),
which also keeps the checkpoint bookkeeping: every merge is numbered (``MergeOutcome.seq``),
``take_checkpoint`` hands out a bounded batch of dirty rows and coalesced buckets,
``confirm``/``release`` settle it, and ``durable_through`` says which merges are durable,
so the caller acks exactly the messages they came from. A key-window keeps, besides, its
total, policy and over-admission in a small ``KeyWindow``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from central.ledger_rows import BucketIncrement, ComponentRow
from central.partitions.components import Checkpoint, ComponentTable
from sync.algorithms import ALGORITHMS
from sync.messages import KeyTotal, UsageBatch
from sync.policy import Policy, build_policy
from sync.windows import hour_start, window_bounds, window_end

FUTURE_TOLERANCE_MS = 3_600_000  # clock skew we accept on a window start
WindowKey = tuple[str, str, int]  # namespace, key hash, window start
MAX_NAMESPACE_LABELS = 100
_EVERYTHING = 1 << 62
_Shared = TypeVar("_Shared", str, int)


@dataclass(slots=True)
class KeyWindow:
    window_end: int
    policy: Policy
    policy_at: int  # flush time of the batch whose policy this is (newest wins)
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
    seq: int = 0  # this merge's number, for durable_through()


@dataclass(frozen=True, slots=True)
class CheckpointBatch:
    """A bounded batch to write, as ledger rows, and the bookkeeping to settle it."""

    checkpoint: Checkpoint
    rows: list[ComponentRow]
    increments: list[BucketIncrement]

    def __len__(self) -> int:
        return len(self.rows) + len(self.increments)


class GlobalTotals:
    def __init__(self, *, retention_ms: int,
                 over_admission: dict[str, int] | None = None,
                 observer: TotalsObserver | None = None) -> None:
        self.retention_ms = retention_ms
        self._observer = observer
        self.windows: dict[WindowKey, KeyWindow] = {}
        self.table = ComponentTable()
        self._changed: set[WindowKey] = set()  # to broadcast at the next tick
        self._seq = 0
        self._in_flight = 0  # checkpoints taken and not yet confirmed or released
        self._in_flight_rows = 0  # their rows and buckets
        self._expired: list[WindowKey] = []  # pruned key-windows still in the table
        # One object per distinct namespace and window bound instead of one per key-window
        # (every decoded message brings its own copies): ~80 B less per key-window.
        self._shared: dict[str | int, str | int] = {}
        # Shared across leadership terms by the caller: it backs a Prometheus counter,
        # which must not drop when a new term rebuilds the totals.
        self.over_admission: dict[str, int] = {} if over_admission is None else over_admission
        self._labels: set[str] = set()

    # --- merging -----------------------------------------------------------------------

    def merge(self, batch: UsageBatch, now: int) -> MergeOutcome:
        self._seq += 1
        self.table.note_seq(self._seq)
        outcome = MergeOutcome(seq=self._seq)
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
                key = (self._share(entry.namespace), entry.key_hash, self._share(start))
                window = self.windows[key] = KeyWindow(self._share(end), entry.policy,
                                                       batch.flushed_at)
            else:
                was_blocked = window.blocked_until > 0
                if batch.flushed_at >= window.policy_at:
                    # The newest policy decides limit and window end (blocks last until it).
                    window.policy, window.policy_at = entry.policy, batch.flushed_at
                    window.window_end = end
            increase = self.table.merge(
                namespace=entry.namespace, key_hash=entry.key_hash, window_start=start,
                node_id=batch.node_id, region=batch.region, admitted=entry.admitted,
                denied=entry.denied, policy=entry.policy, hour=hour, seq=self._seq)
            if increase.created and self._observer is not None:
                self._observer.served(batch.node_id, key)
            if not increase.raised:
                self._note_block(key, window, was_blocked=was_blocked)
                continue
            outcome.raised += 1
            if increase.admitted:
                window.total += increase.admitted
                window.as_of = max(window.as_of, batch.flushed_at)
            self._changed.add(key)
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

    def _share(self, value: _Shared) -> _Shared:
        found = self._shared.setdefault(value, value)
        assert type(found) is type(value)
        return found

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
        components = self.table.components_of(*key)
        return KeyTotal(key[0], key[1], key[2], window.total,
                        {node: admitted for node, (admitted, _) in components.items()},
                        window.blocked_until, window.policy, window.as_of)

    def take_changed(self, wanted: Callable[[KeyWindow], bool] | None = None
                     ) -> list[KeyTotal]:
        """Totals of the key-windows changed since the last call; with ``wanted``, only
        of those it accepts (a cold key's total is never built: that is most keys)."""
        windows = self.windows
        changed = [self.key_total(key) for key in self._changed
                   if key in windows and (wanted is None or wanted(windows[key]))]
        self._changed.clear()
        return changed

    def is_live(self, key: WindowKey, now: int) -> bool:
        """The key-window can still affect a decision (sliding: one window longer)."""
        window = self.windows.get(key)
        if window is None:
            return False
        past_windows = ALGORITHMS[window.policy.algorithm].past_windows
        return window.window_end + past_windows * window.policy.duration.ms > now

    # --- checkpoints -------------------------------------------------------------------

    @property
    def unsaved(self) -> int:
        """Dirty components plus pending buckets, in flight or not: what is owed."""
        return self.table.dirty + self.table.pending_buckets + self._in_flight_rows

    @property
    def last_seq(self) -> int:
        return self._seq

    def durable_through(self) -> int:
        """Every merge numbered up to this is durable (or raised nothing)."""
        return self.table.durable_through()

    def take_checkpoint(self, *, max_rows: int, max_buckets: int, now: int
                        ) -> CheckpointBatch:
        """The oldest dirty components and bucket increases, at most ``max_rows`` and
        ``max_buckets``, as ledger rows stamped ``now``. They stay owed until ``confirm``
        (or come back on ``release``)."""
        checkpoint = self.table.take_checkpoint(max_rows=max_rows, max_buckets=max_buckets)
        self._in_flight += 1
        rows = []
        for value in checkpoint.components:
            window = self.windows.get((value.namespace, value.key_hash, value.window_start))
            if window is not None:
                policy, end = window.policy, window.window_end
            else:  # pruned since it was raised: the row's own policy says where it ends
                policy = self._policy(value.policy_id)
                end = window_end(policy.duration, value.window_start)
            rows.append(ComponentRow(
                namespace=value.namespace, key_hash=value.key_hash,
                window_start=value.window_start, node_id=value.node_id, region=value.region,
                window_end=end, admitted=value.admitted, denied=value.denied,
                limit=policy.limit, duration=policy.duration.text,
                algorithm=policy.algorithm, burst=policy.burst, updated_at=now))
        increments = [BucketIncrement(b.namespace, b.key_hash, b.region, b.hour, b.admitted,
                                      b.denied) for b in checkpoint.buckets]
        batch = CheckpointBatch(checkpoint, rows, increments)
        self._in_flight_rows += len(batch)
        return batch

    def _policy(self, policy_id: int) -> Policy:
        policy = self.table.policies.values[policy_id]
        assert isinstance(policy, Policy)
        return policy

    def confirm(self, batch: CheckpointBatch) -> None:
        """The batch is durable."""
        self.table.confirm(batch.checkpoint)
        self._in_flight -= 1
        self._in_flight_rows -= len(batch)

    def release(self, batch: CheckpointBatch) -> None:
        """Writing the batch failed: all of it is owed again."""
        self.table.release(batch.checkpoint)
        self._in_flight -= 1
        self._in_flight_rows -= len(batch)

    def take_unsaved(self, now: int) -> tuple[list[ComponentRow], list[BucketIncrement]]:
        """Everything owed, as one batch, counted durable at once (for callers that write
        it themselves and do not track acks: tests, tools)."""
        batch = self.take_checkpoint(max_rows=_EVERYTHING, max_buckets=_EVERYTHING, now=now)
        self.confirm(batch)
        return batch.rows, batch.increments

    # --- loading and pruning -----------------------------------------------------------

    def load(self, rows: Iterable[ComponentRow]) -> None:
        """Rebuild from the ledger (a new leader); replaces the in-memory state. The
        observer is told of the loaded keys only: give a rebuilt table a new observer."""
        if self._in_flight:
            raise RuntimeError("cannot reload while a checkpoint is in flight")
        self.windows.clear()
        self.table = ComponentTable()
        self._expired = []
        self.load_more(rows)

    def load_more(self, rows: Iterable[ComponentRow]) -> None:
        """Add one more chunk of a rebuild from the ledger (rows of distinct components).
        Loaded components are durable already: clean, no bucket."""
        policies: dict[tuple[int, str, str, int | None], Policy] = {}
        for row in rows:
            spec = (row.limit, row.duration, row.algorithm, row.burst)
            policy = policies.get(spec)
            if policy is None:
                policy = policies[spec] = build_policy(
                    limit=row.limit, duration=row.duration, algorithm=row.algorithm,
                    burst=row.burst)
            key = (row.namespace, row.key_hash, row.window_start)
            window = self.windows.get(key)
            was_blocked = False
            if window is None:
                end = window_end(policy.duration, row.window_start)
                key = (self._share(row.namespace), row.key_hash, self._share(row.window_start))
                window = self.windows[key] = KeyWindow(self._share(end), policy,
                                                       row.updated_at)
            else:
                was_blocked = window.blocked_until > 0
                if row.updated_at >= window.policy_at:
                    window.policy, window.policy_at = policy, row.updated_at
            self.table.load(namespace=row.namespace, key_hash=row.key_hash,
                            window_start=row.window_start, node_id=row.node_id,
                            region=row.region, admitted=row.admitted, denied=row.denied,
                            policy=policy)
            window.total += row.admitted
            window.over = max(0, window.total - window.policy.limit)
            self._changed.add(key)
            if self._observer is not None:
                self._observer.served(row.node_id, key)
            self._note_block(key, window, was_blocked=was_blocked)

    def prune(self, now: int) -> int:
        """Drop key-windows past retention. Rebuilds the component table, so it must not
        run while a checkpoint is in flight (the caller serializes them)."""
        if self._in_flight:
            raise RuntimeError("cannot prune while a checkpoint is in flight")
        expired = [key for key, w in self.windows.items()
                   if w.window_end + self.retention_ms <= now]
        for key in expired:
            del self.windows[key]
            if self._observer is not None:
                # The table still holds the rows (until the rebuild below).
                self._observer.removed(key, list(self.table.components_of(*key)))
        # Their rows leave the table in a rebuild, O(table), so only once a quarter of
        # the key-windows waits for it: the cost stays proportional to what is dropped.
        self._expired.extend(expired)
        if self._expired and len(self._expired) * 4 >= self.table.key_windows:
            self.table = self.table.without_key_windows(self._expired)
            self._expired = []
        return len(expired)
