"""Which keys a node's snapshot holds, kept as keys change and paged by cursor.

A restarting node needs the keys relevant to it: the keys it served (it has a component
in them) and every blocked key. Sorting all live keys for each page costs O(all keys) per
page; this index appends a key to a per-node log when the node first serves it and to a
shared log when it becomes blocked, so a page is a slice of a log: O(page) work.

Cursors are sequence numbers, not positions: each appended entry gets the next number of
its log, and removed keys leave a tombstone that compaction drops later without
renumbering, so a cursor handed out before a compaction stays valid (found by bisection).
A snapshot pages the node's own log first, then the blocked log (skipping keys already
sent from the node's log); the cursor says which log and where.

Keys added during paging land after the cursor and are included; a key removed during
paging is not sent if not yet reached. Either way the node also receives live updates
from the moment it subscribed, so nothing it needs is missed.

Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
# cursor = value * 4 + phase. Phase 0: the node's own keys, value = seq in its log.
# Phase 1: the blocked keys the node does not serve, value = blocked seq << 24 | where
# the node's log ended when phase 0 did. Phase 3: the node's keys appended since (it
# started serving them during the snapshot), value = seq in its log. Phase 2 is phase 1
# when the two numbers do not fit (huge logs): phase 3 then starts from the log's start
# and may send keys again (harmless: nodes merge by maximum). Cursors stay below 2**53
# (the wire's count limit).
_PHASES = 4
_OWN_BITS = 24
_BLOCKED_MAX = 1 << 27  # 27 + 24 + 2 bits < 53
_COMPACT_SHARE = 0.5  # compact a log once half its entries are tombstones

SNAPSHOT_PAGE = 2000  # totals per snapshot page (a node restart pages through them)


def _blocked_cursor(blocked_seq: int, own_end: int) -> int:
    if own_end < 1 << _OWN_BITS and blocked_seq < _BLOCKED_MAX:
        return ((blocked_seq << _OWN_BITS) | own_end) * _PHASES + 1
    return blocked_seq * _PHASES + 2


@dataclass(slots=True)
class _Log(Generic[K]):
    """Append-only entries with increasing sequence numbers; removals are tombstones."""

    keys: list[K | None] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    where: dict[K, int] = field(default_factory=dict)  # live key -> its seq
    next_seq: int = 0
    dead: int = 0

    def add(self, key: K) -> bool:
        if key in self.where:
            return False
        self.where[key] = self.next_seq
        self.keys.append(key)
        self.seqs.append(self.next_seq)
        self.next_seq += 1
        return True

    def remove(self, key: K) -> bool:
        seq = self.where.pop(key, None)
        if seq is None:
            return False
        self.keys[bisect_left(self.seqs, seq)] = None
        self.dead += 1
        if self.dead > len(self.keys) * _COMPACT_SHARE:
            self._compact()
        return True

    def _compact(self) -> None:
        # O(log size) per removal amortised: runs once half the entries are dead.
        kept = [(k, s) for k, s in zip(self.keys, self.seqs, strict=True) if k is not None]
        self.keys = [k for k, _ in kept]
        self.seqs = [s for _, s in kept]
        self.dead = 0

    def page(self, from_seq: int, limit: int) -> tuple[list[K], int | None, int]:
        """Up to ``limit`` live keys from ``from_seq`` on; the seq to resume from (None at
        the end) and how many entries were looked at (live or dead)."""
        found: list[K] = []
        index = bisect_left(self.seqs, from_seq)
        looked = 0
        while index < len(self.keys) and len(found) < limit:
            key = self.keys[index]
            looked += 1
            if key is not None:
                found.append(key)
            index += 1
        return found, (self.seqs[index] if index < len(self.keys) else None), looked


@dataclass(frozen=True, slots=True)
class SnapshotPageKeys(Generic[K]):
    keys: list[K]
    next_cursor: int | None


class SnapshotIndex(Generic[K]):
    """Per-node logs of served keys plus one log of blocked keys (see module docstring)."""

    __slots__ = ("_blocked", "_served")

    def __init__(self) -> None:
        self._served: dict[str, _Log[K]] = {}
        self._blocked: _Log[K] = _Log()

    def served(self, node_id: str, key: K) -> None:
        """``node_id`` has a component in ``key`` (idempotent)."""
        log = self._served.get(node_id)
        if log is None:
            log = self._served[node_id] = _Log()
        log.add(key)

    def blocked(self, key: K) -> None:
        self._blocked.add(key)

    def unblocked(self, key: K) -> None:
        self._blocked.remove(key)

    def removed(self, key: K, node_ids: list[str]) -> None:
        """``key`` expired: drop it from the logs of the nodes that served it."""
        for node_id in node_ids:
            log = self._served.get(node_id)
            if log is not None:
                log.remove(key)
        self._blocked.remove(key)

    def keys_of(self, node_id: str) -> int:
        log = self._served.get(node_id)
        return 0 if log is None else len(log.where)

    def page(self, node_id: str, cursor: int, limit: int) -> SnapshotPageKeys[K]:
        """One page of the keys ``node_id`` needs; ``cursor`` 0 starts, None ends."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        seq, phase = divmod(cursor, _PHASES)
        own = self._served.get(node_id)
        found: list[K] = []
        own_end = 0  # phase 0 covered the node's log below this seq
        if phase == 0:
            if own is not None:
                found, resume, _ = own.page(seq, limit)
                if resume is not None:
                    return SnapshotPageKeys(found, resume * _PHASES)
                own_end = own.next_seq
            phase, seq = 1, 0
        elif phase == 1:
            seq, own_end = divmod(seq, 1 << _OWN_BITS)
        if phase in (1, 2):
            while True:
                budget = limit - len(found)
                if budget <= 0:
                    return SnapshotPageKeys(found, _blocked_cursor(seq, own_end))
                blocked, resume, _ = self._blocked.page(seq, budget)
                # A key the node serves goes out from its own log: in phase 0, or in
                # phase 3 if it started serving it after phase 0 passed.
                fresh = [k for k in blocked if own is None or k not in own.where]
                found += fresh
                if resume is None:
                    break
                seq = resume
                if len(fresh) < len(blocked):
                    # Skipped keys: end the page here rather than loop on, so a page
                    # never costs more than twice its size.
                    return SnapshotPageKeys(found, _blocked_cursor(seq, own_end))
            seq = own_end
        own = self._served.get(node_id)
        if own is None:
            return SnapshotPageKeys(found, None)
        budget = limit - len(found)
        if budget <= 0:
            return SnapshotPageKeys(found, seq * _PHASES + 3)
        more, resume, _ = own.page(seq, budget)
        found += more
        return SnapshotPageKeys(found, None if resume is None else resume * _PHASES + 3)
