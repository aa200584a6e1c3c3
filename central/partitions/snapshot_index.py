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
_PHASES = 2  # cursor = seq * 2 + phase: phase 0 the node's own keys, 1 the blocked keys
_COMPACT_SHARE = 0.5  # compact a log once half its entries are tombstones


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
        if phase == 0:
            if own is not None:
                found, resume, _ = own.page(seq, limit)
                if resume is not None:
                    return SnapshotPageKeys(found, resume * _PHASES)
            phase, seq = 1, 0
        budget = limit - len(found)
        while budget > 0:
            blocked, resume, _ = self._blocked.page(seq, budget)
            # Keys the node served went out in phase 0 already.
            fresh = [k for k in blocked if own is None or k not in own.where]
            found += fresh
            budget -= len(fresh)
            if resume is None:
                return SnapshotPageKeys(found, None)
            seq = resume
            if len(fresh) < len(blocked):
                # Skipped duplicates: end the page here rather than loop on, so a page
                # never costs more than twice its size.
                break
        return SnapshotPageKeys(found, seq * _PHASES + 1)
