"""One partition's components in compact memory, with checkpoint bookkeeping.

A component is one node's cumulative (admitted, denied) for one key-window; the key of a
component is (namespace, key hash, window start, node id). Millions of them must fit in
a central process, so rows are columns of ``array`` (a few bytes each) rather than
objects, strings are interned into small integer ids, and a key-window is found through
one dict whose keys are short ``bytes`` (a hex key hash packs into half its length).

Merging takes the maximum per component (duplicates and redeliveries change nothing)
and returns the increase, which also goes into a billing bucket coalesced per
(key, region, hour).

Checkpoints: every merge that raises a component marks its row dirty, stamped with the
sequence number of the message it came from. ``take_checkpoint`` hands out a bounded
batch of dirty rows and buckets (their values as of now); ``confirm`` marks them durable
once written, ``release`` puts them back after a failed write, and a row raised again
while its batch was in flight stays dirty. ``durable_through`` says up to which sequence
number every merge is durable, so the caller acks exactly those messages.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sync.errors import InvalidField

NO_ROW = -1
_CLEAN, _DIRTY, _TAKEN, _TAKEN_DIRTY = 0, 1, 2, 3  # row states for checkpoints
_HEX = frozenset("0123456789abcdef")

T = TypeVar("T", bound=Hashable)


class Interner(Generic[T]):
    """Values <-> dense small ids, so a row stores 2-4 bytes instead of a reference."""

    __slots__ = ("_ids", "values")

    def __init__(self) -> None:
        self._ids: dict[T, int] = {}
        self.values: list[T] = []

    def id(self, value: T) -> int:
        found = self._ids.get(value)
        if found is None:
            found = self._ids[value] = len(self.values)
            self.values.append(value)
        return found

    def __len__(self) -> int:
        return len(self.values)


def pack_key(namespace_id: int, key_hash: str, window_id: int) -> bytes:
    """A key-window as short bytes: ids, then the key hash (raw bytes when lowercase
    hex of even length, as the identifier hasher makes them; else UTF-8 after a marker)."""
    head = namespace_id.to_bytes(3, "big") + window_id.to_bytes(3, "big")
    if len(key_hash) % 2 == 0 and _HEX.issuperset(key_hash):
        return head + b"\x00" + bytes.fromhex(key_hash)
    return head + b"\x01" + key_hash.encode()


def unpack_key_hash(packed: bytes) -> str:
    body = packed[7:]
    return body.hex() if packed[6] == 0 else body.decode()


@dataclass(frozen=True, slots=True)
class ComponentValue:
    namespace: str
    key_hash: str
    window_start: int
    node_id: str
    region: str
    admitted: int
    denied: int
    policy_id: int


@dataclass(frozen=True, slots=True)
class BucketValue:
    """An increase of billed usage for one (key, region, hour), not yet durable."""

    namespace: str
    key_hash: str
    region: str
    hour: int
    admitted: int
    denied: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A bounded batch to write: component values as taken, and bucket increases."""

    rows: tuple[int, ...]
    components: tuple[ComponentValue, ...]
    buckets: tuple[BucketValue, ...]
    bucket_keys: tuple[BucketKey, ...]
    bucket_seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Increase:
    admitted: int
    denied: int
    created: bool = False  # the component is new (first merge from this node)

    @property
    def raised(self) -> bool:
        return self.admitted > 0 or self.denied > 0


NO_INCREASE = Increase(0, 0)
_CREATED_EMPTY = Increase(0, 0, created=True)
BucketKey = tuple[int, str, int, int]  # namespace id, key hash, region id, hour start


class ComponentTable:
    """The components of one partition (see the module docstring)."""

    __slots__ = (
        "_admitted", "_bucket_queue", "_bucket_seq", "_buckets", "_denied", "_dirty_queue",
        "_first_dirty_seq", "_head", "_key_index", "_keys", "_last_seq", "_next",
        "_node", "_open_seqs", "_pending_per_seq", "_policy", "_redirty_seq", "_region",
        "_slot",
        "_state", "namespaces", "nodes", "policies", "regions", "windows",
    )

    def __init__(self) -> None:
        self.namespaces: Interner[str] = Interner()
        self.windows: Interner[int] = Interner()
        self.nodes: Interner[str] = Interner()
        self.regions: Interner[str] = Interner()
        self.policies: Interner[Hashable] = Interner()
        # per key-window ("slot")
        self._key_index: dict[bytes, int] = {}
        self._keys: list[bytes] = []
        self._head = array("i")  # first row of the slot's chain
        # per component (row)
        self._slot = array("I")
        self._node = array("H")
        self._region = array("H")
        self._policy = array("I")
        self._admitted = array("q")
        self._denied = array("q")
        self._next = array("i")  # next row of the same slot
        self._state = bytearray()
        self._first_dirty_seq = array("q")
        # checkpoint bookkeeping
        self._dirty_queue: deque[int] = deque()
        self._redirty_seq: dict[int, int] = {}  # in-flight rows raised again -> seq
        self._buckets: dict[BucketKey, list[int]] = {}
        self._bucket_queue: deque[BucketKey] = deque()  # keys of _buckets, oldest first
        self._bucket_seq: dict[BucketKey, int] = {}
        self._pending_per_seq: dict[int, int] = {}  # seq -> dirty rows/buckets from it
        self._open_seqs: deque[int] = deque()  # seqs with pending work, ascending
        self._last_seq = 0

    # --- size ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def key_windows(self) -> int:
        return len(self._keys)

    @property
    def dirty(self) -> int:
        return len(self._dirty_queue)

    @property
    def pending_buckets(self) -> int:
        return len(self._buckets)

    # --- lookup --------------------------------------------------------------------

    def _slot_of(self, namespace: str, key_hash: str, window_start: int, *, create: bool
                 ) -> int:
        packed = pack_key(self.namespaces.id(namespace), key_hash,
                          self.windows.id(window_start))
        slot = self._key_index.get(packed)
        if slot is None:
            if not create:
                return NO_ROW
            slot = self._key_index[packed] = len(self._keys)
            self._keys.append(packed)
            self._head.append(NO_ROW)
        return slot

    def _row_of(self, slot: int, node: int) -> int:
        row = self._head[slot]
        while row != NO_ROW and self._node[row] != node:
            row = self._next[row]
        return row

    def get(self, namespace: str, key_hash: str, window_start: int, node_id: str
            ) -> tuple[int, int] | None:
        """(admitted, denied) of one component, or None if never merged."""
        slot = self._slot_of(namespace, key_hash, window_start, create=False)
        if slot == NO_ROW:
            return None
        row = self._row_of(slot, self.nodes.id(node_id))
        return None if row == NO_ROW else (self._admitted[row], self._denied[row])

    def components_of(self, namespace: str, key_hash: str, window_start: int
                      ) -> dict[str, tuple[int, int]]:
        """node id -> (admitted, denied) of one key-window."""
        slot = self._slot_of(namespace, key_hash, window_start, create=False)
        found: dict[str, tuple[int, int]] = {}
        row = NO_ROW if slot == NO_ROW else self._head[slot]
        while row != NO_ROW:
            found[self.nodes.values[self._node[row]]] = (self._admitted[row],
                                                         self._denied[row])
            row = self._next[row]
        return found

    # --- merge ---------------------------------------------------------------------

    def merge(self, *, namespace: str, key_hash: str, window_start: int, node_id: str,
              region: str, admitted: int, denied: int, policy: Hashable, hour: int,
              seq: int) -> Increase:
        """Raise one component to (admitted, denied) if higher; returns the increase.

        ``seq`` is the caller's number of the message this came from: non-decreasing
        across calls (a message redelivered later gets a new, higher number).
        """
        if admitted < 0 or denied < 0:
            raise InvalidField("admitted" if admitted < 0 else "denied",
                               "must not be negative")
        if seq < self._last_seq:
            raise InvalidField("seq", f"must not decrease ({seq} < {self._last_seq})")
        self._last_seq = seq
        slot = self._slot_of(namespace, key_hash, window_start, create=True)
        node = self.nodes.id(node_id)
        row = self._row_of(slot, node)
        policy_id = self.policies.id(policy)
        created = row == NO_ROW
        if created:
            row = len(self._slot)
            self._slot.append(slot)
            self._node.append(node)
            self._region.append(self.regions.id(region))
            self._policy.append(policy_id)
            self._admitted.append(0)
            self._denied.append(0)
            self._next.append(self._head[slot])
            self._head[slot] = row
            self._state.append(_CLEAN)
            self._first_dirty_seq.append(0)
        more_admitted = max(0, admitted - self._admitted[row])
        more_denied = max(0, denied - self._denied[row])
        if not more_admitted and not more_denied:
            return _CREATED_EMPTY if created else NO_INCREASE
        self._admitted[row] += more_admitted
        self._denied[row] += more_denied
        self._policy[row] = policy_id
        self._mark_dirty(row, seq)
        self._add_to_bucket((self.namespaces.id(namespace), key_hash, self._region[row], hour),
                            more_admitted, more_denied, seq)
        return Increase(more_admitted, more_denied, created)

    def load(self, *, namespace: str, key_hash: str, window_start: int, node_id: str,
             region: str, admitted: int, denied: int, policy: Hashable) -> None:
        """Restore a component read from the ledger: clean (already durable), no bucket."""
        slot = self._slot_of(namespace, key_hash, window_start, create=True)
        node = self.nodes.id(node_id)
        row = self._row_of(slot, node)
        if row != NO_ROW:  # loaded twice: keep the maximum
            self._admitted[row] = max(self._admitted[row], admitted)
            self._denied[row] = max(self._denied[row], denied)
            return
        self._slot.append(slot)
        self._node.append(node)
        self._region.append(self.regions.id(region))
        self._policy.append(self.policies.id(policy))
        self._admitted.append(admitted)
        self._denied.append(denied)
        self._next.append(self._head[slot])
        self._head[slot] = len(self._slot) - 1
        self._state.append(_CLEAN)
        self._first_dirty_seq.append(0)

    # --- checkpoint bookkeeping ----------------------------------------------------

    def _pending(self, seq: int, delta: int) -> None:
        count = self._pending_per_seq.get(seq, 0) + delta
        if count:
            if seq not in self._pending_per_seq:
                self._insert_open_seq(seq)
            self._pending_per_seq[seq] = count
        else:
            del self._pending_per_seq[seq]
            if not self._pending_per_seq:  # an emptied dict keeps its table: drop it
                self._pending_per_seq = {}

    def _insert_open_seq(self, seq: int) -> None:
        # Almost always the newest; a released batch can bring back older ones.
        if not self._open_seqs or seq > self._open_seqs[-1]:
            self._open_seqs.append(seq)
            return
        ordered = sorted({*self._open_seqs, seq})
        self._open_seqs = deque(ordered)

    def _mark_dirty(self, row: int, seq: int) -> None:
        state = self._state[row]
        if state == _CLEAN:
            self._state[row] = _DIRTY
            self._first_dirty_seq[row] = seq
            self._pending(seq, 1)
            self._dirty_queue.append(row)
        elif state == _TAKEN:
            # In flight with older values: still owed after the confirm, from this seq.
            self._state[row] = _TAKEN_DIRTY
            self._redirty_seq[row] = seq
            self._pending(seq, 1)

    def _add_to_bucket(self, key: BucketKey, admitted: int, denied: int, seq: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [admitted, denied]
            self._bucket_seq[key] = seq
            self._bucket_queue.append(key)
            self._pending(seq, 1)
        else:
            bucket[0] += admitted
            bucket[1] += denied

    def take_checkpoint(self, *, max_rows: int, max_buckets: int) -> Checkpoint:
        """Up to ``max_rows`` dirty components and ``max_buckets`` bucket increases,
        oldest first. They stay owed until ``confirm`` (or come back on ``release``)."""
        rows: list[int] = []
        values: list[ComponentValue] = []
        while self._dirty_queue and len(rows) < max_rows:
            row = self._dirty_queue.popleft()
            self._state[row] = _TAKEN
            rows.append(row)
            values.append(self._value(row))
        buckets: list[BucketValue] = []
        keys: list[BucketKey] = []
        seqs: list[int] = []
        # Oldest first, in O(batch) (popping a dict's first keys over and over would
        # make each iteration skip all the holes left at its front).
        while self._bucket_queue and len(keys) < max_buckets:
            key = self._bucket_queue.popleft()
            admitted, denied = self._buckets.pop(key)
            seqs.append(self._bucket_seq.pop(key))
            keys.append(key)
            namespace, key_hash, region, hour = key
            buckets.append(BucketValue(self.namespaces.values[namespace], key_hash,
                                       self.regions.values[region], hour, admitted, denied))
        if not self._buckets:  # an emptied dict keeps its table (~50 B a slot): drop it
            self._buckets, self._bucket_seq = {}, {}
            self._bucket_queue = deque()
        return Checkpoint(tuple(rows), tuple(values), tuple(buckets), tuple(keys),
                          tuple(seqs))

    def _value(self, row: int) -> ComponentValue:
        packed = self._keys[self._slot[row]]
        return ComponentValue(
            namespace=self.namespaces.values[int.from_bytes(packed[:3], "big")],
            key_hash=unpack_key_hash(packed),
            window_start=self.windows.values[int.from_bytes(packed[3:6], "big")],
            node_id=self.nodes.values[self._node[row]],
            region=self.regions.values[self._region[row]],
            admitted=self._admitted[row], denied=self._denied[row],
            policy_id=self._policy[row])

    def confirm(self, checkpoint: Checkpoint) -> None:
        """The checkpoint is durable: its rows are clean unless raised since it was taken."""
        for row in checkpoint.rows:
            seq = self._first_dirty_seq[row]
            if self._state[row] == _TAKEN_DIRTY:
                # The newer values still need a write, owed from the seq that raised them.
                self._state[row] = _DIRTY
                self._first_dirty_seq[row] = self._redirty_seq.pop(row)
                self._dirty_queue.append(row)
            else:
                self._state[row] = _CLEAN
            self._pending(seq, -1)
        for seq in checkpoint.bucket_seqs:
            self._pending(seq, -1)

    def release(self, checkpoint: Checkpoint) -> None:
        """The write failed: everything in the checkpoint is owed again, nothing lost."""
        for row in reversed(checkpoint.rows):
            if self._state[row] == _TAKEN_DIRTY:  # owed from its older seq, still pending
                self._pending(self._redirty_seq.pop(row), -1)
            self._state[row] = _DIRTY
            self._dirty_queue.appendleft(row)
        owed = zip(checkpoint.bucket_keys, checkpoint.bucket_seqs, checkpoint.buckets,
                   strict=True)
        for key, seq, bucket in reversed(list(owed)):  # back at the front, in order
            existing = self._buckets.get(key)
            if existing is None:
                self._buckets[key] = [bucket.admitted, bucket.denied]
                self._bucket_seq[key] = seq
                self._bucket_queue.appendleft(key)
                continue
            # Merged again meanwhile: one increase owed from the older of both seqs.
            existing[0] += bucket.admitted
            existing[1] += bucket.denied
            newer = self._bucket_seq[key]
            self._bucket_seq[key] = min(seq, newer)
            self._pending(max(seq, newer), -1)

    def note_seq(self, seq: int) -> None:
        """A message numbered ``seq`` was merged, whether or not it raised anything (a
        message of rejected entries only is durable at once)."""
        if seq < self._last_seq:
            raise InvalidField("seq", f"must not decrease ({seq} < {self._last_seq})")
        self._last_seq = seq

    def durable_through(self) -> int:
        """Every merge with a seq up to this is durable (or raised nothing)."""
        while self._open_seqs and self._open_seqs[0] not in self._pending_per_seq:
            self._open_seqs.popleft()
        if self._open_seqs:
            return self._open_seqs[0] - 1
        return self._last_seq

    # --- pruning -------------------------------------------------------------------

    def without_key_windows(self, dropped: Iterable[tuple[str, str, int]]
                            ) -> ComponentTable:
        """A new table without the components of ``dropped`` key-windows (namespace, key
        hash, window start): rows live in arrays, so dropping means rebuilding.

        Dirty state carries over (a dropped dirty row is owed no more: its window is past
        retention, the ledger prunes it too); pending buckets carry over unchanged. Must
        not run while a checkpoint is in flight: rows are renumbered.
        """
        if any(state in (_TAKEN, _TAKEN_DIRTY) for state in self._state):
            raise RuntimeError("cannot rebuild the table while a checkpoint is in flight")
        drop_slots = set()
        for namespace, key_hash, window_start in dropped:
            slot = self._slot_of(namespace, key_hash, window_start, create=False)
            if slot != NO_ROW:
                drop_slots.add(slot)
        new = ComponentTable()
        # Same ids, so pending bucket keys (namespace and region ids) stay valid.
        new.namespaces, new.windows, new.nodes = self.namespaces, self.windows, self.nodes
        new.regions, new.policies = self.regions, self.policies
        new._buckets, new._bucket_queue = self._buckets, self._bucket_queue
        new._bucket_seq = self._bucket_seq
        new._pending_per_seq, new._open_seqs = self._pending_per_seq, self._open_seqs
        new._last_seq = self._last_seq
        moved: dict[int, int] = {}
        for slot, packed in enumerate(self._keys):
            if slot in drop_slots:
                continue
            new_slot = new._key_index[packed] = len(new._keys)
            new._keys.append(packed)
            new._head.append(NO_ROW)
            row = self._head[slot]
            while row != NO_ROW:
                moved[row] = len(new._slot)
                new._slot.append(new_slot)
                new._node.append(self._node[row])
                new._region.append(self._region[row])
                new._policy.append(self._policy[row])
                new._admitted.append(self._admitted[row])
                new._denied.append(self._denied[row])
                new._next.append(new._head[new_slot])
                new._head[new_slot] = moved[row]
                new._state.append(self._state[row])
                new._first_dirty_seq.append(self._first_dirty_seq[row])
                row = self._next[row]
        for row in self._dirty_queue:
            if row in moved:
                new._dirty_queue.append(moved[row])
            else:  # owed no more
                new._pending(self._first_dirty_seq[row], -1)
        return new
