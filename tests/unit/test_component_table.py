"""One partition's compact component table (central/partitions/components.py). Pure.

The checkpoint contract is checked against a simulated ledger: whatever sequence of
merges, checkpoints, failed writes and confirmations, every merge up to
``durable_through`` is in the ledger, nothing is counted twice, and once drained the
ledger equals the table.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from central.partitions.components import (
    Checkpoint,
    ComponentTable,
    pack_key,
    unpack_key_hash,
)
from sync.errors import InvalidField

HOUR = 3_600_000


def merge(table: ComponentTable, key: str, node: str, admitted: int, denied: int = 0, *,
          seq: int, hour: int = 0, ns: str = "api", window: int = 0) -> tuple[int, int]:
    inc = table.merge(namespace=ns, key_hash=key, window_start=window, node_id=node,
                      region=f"r-{node}", admitted=admitted, denied=denied,
                      policy=("fixed_window", 100), hour=hour, seq=seq)
    return inc.admitted, inc.denied


def test_merge_takes_the_maximum_and_returns_the_increase() -> None:
    table = ComponentTable()
    assert merge(table, "ab12", "n1", 5, 1, seq=1) == (5, 1)
    assert merge(table, "ab12", "n1", 3, 0, seq=2) == (0, 0)  # stale redelivery
    assert merge(table, "ab12", "n1", 7, 1, seq=3) == (2, 0)
    assert merge(table, "ab12", "n2", 4, 0, seq=3) == (4, 0)
    assert table.get("api", "ab12", 0, "n1") == (7, 1)
    assert table.components_of("api", "ab12", 0) == {"n1": (7, 1), "n2": (4, 0)}
    assert table.get("api", "ab12", 1, "n1") is None
    assert len(table) == 2 and table.key_windows == 1


def test_bad_merges_name_the_field() -> None:
    table = ComponentTable()
    with pytest.raises(InvalidField) as info:
        merge(table, "k", "n", -1, seq=1)
    assert info.value.field == "admitted"
    merge(table, "k", "n", 1, seq=5)
    with pytest.raises(InvalidField) as info:
        merge(table, "k", "n", 2, seq=4)
    assert info.value.field == "seq"


@given(st.one_of(st.text(max_size=40), st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True)))
def test_key_packing_round_trips(key_hash: str) -> None:
    packed = pack_key(5, key_hash, 70_000)
    assert unpack_key_hash(packed) == key_hash
    assert packed != pack_key(5, key_hash, 70_001)


def test_hex_and_text_keys_that_look_alike_stay_apart() -> None:
    table = ComponentTable()
    merge(table, "ab", "n", 1, seq=1)
    merge(table, "AB", "n", 2, seq=1)
    assert table.get("api", "ab", 0, "n") == (1, 0)
    assert table.get("api", "AB", 0, "n") == (2, 0)


def test_buckets_coalesce_per_key_region_and_hour() -> None:
    table = ComponentTable()
    for i in range(1, 11):  # ten flushes of one cold key in one hour: one bucket row
        merge(table, "k", "n1", i, seq=i, hour=HOUR)
    merge(table, "k", "n1", 12, seq=11, hour=2 * HOUR)
    merge(table, "k", "n1", 1, seq=12, hour=2 * HOUR, window=HOUR * 24 * 31)  # new window
    cp = table.take_checkpoint(max_rows=100, max_buckets=100)
    assert [(b.hour, b.admitted) for b in cp.buckets] == [(HOUR, 10), (2 * HOUR, 3)]
    assert len(cp.components) == 2  # two key-windows, one node


def test_checkpoints_are_bounded_and_oldest_first() -> None:
    table = ComponentTable()
    for i in range(10):
        merge(table, f"k{i}", "n", 1, seq=i + 1)
    first = table.take_checkpoint(max_rows=4, max_buckets=3)
    assert [c.key_hash for c in first.components] == ["k0", "k1", "k2", "k3"]
    assert len(first.buckets) == 3
    assert table.dirty == 6 and table.pending_buckets == 7
    assert table.durable_through() == 0
    table.confirm(first)
    assert table.durable_through() == 3  # k3's component is written, its bucket is not


def test_a_failed_write_keeps_everything_owed() -> None:
    table = ComponentTable()
    merge(table, "k", "n", 5, seq=1)
    cp = table.take_checkpoint(max_rows=10, max_buckets=10)
    merge(table, "k", "n", 6, seq=2)  # raised while in flight
    table.release(cp)
    assert table.durable_through() == 0
    again = table.take_checkpoint(max_rows=10, max_buckets=10)
    assert [c.admitted for c in again.components] == [6]
    assert [b.admitted for b in again.buckets] == [6]  # 5 + 1 coalesced, not lost
    table.confirm(again)
    assert table.durable_through() == 2 and table.dirty == 0


def test_a_row_raised_in_flight_stays_dirty_after_confirm() -> None:
    table = ComponentTable()
    merge(table, "k", "n", 5, seq=1)
    cp = table.take_checkpoint(max_rows=10, max_buckets=10)
    merge(table, "k", "n", 9, seq=2)
    table.confirm(cp)
    assert table.durable_through() == 1  # seq 2's raise is not written yet
    rest = table.take_checkpoint(max_rows=10, max_buckets=10)
    assert [c.admitted for c in rest.components] == [9]
    table.confirm(rest)
    assert table.durable_through() == 2


def test_loaded_rows_are_clean_and_merge_from_their_value() -> None:
    table = ComponentTable()
    table.load(namespace="api", key_hash="k", window_start=0, node_id="n", region="r",
               admitted=10, denied=2, policy="p")
    assert table.dirty == 0 and table.durable_through() == 0
    assert merge(table, "k", "n", 10, 2, seq=1) == (0, 0)  # a replayed message: no-op
    assert merge(table, "k", "n", 12, 2, seq=2) == (2, 0)


# --- the contract under any interleaving ---------------------------------------------------

@dataclass
class Ledger:
    components: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: dict[tuple[str, int], int] = field(default_factory=dict)

    def write(self, cp: Checkpoint) -> None:
        for c in cp.components:  # an upsert keeping the greatest
            k = (c.key_hash, c.node_id)
            self.components[k] = max(self.components.get(k, 0), c.admitted)
        for b in cp.buckets:  # an upsert adding the increase
            self.buckets[(b.key_hash, b.hour)] = self.buckets.get((b.key_hash, b.hour),
                                                                  0) + b.admitted


operation = st.one_of(
    st.tuples(st.just("merge"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 30),
              st.integers(0, 2)),
    st.tuples(st.just("take"), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.just("confirm"), st.integers(0, 3)),
    st.tuples(st.just("release"), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=80))
def test_durable_through_never_runs_ahead_and_nothing_is_lost(ops: list[tuple]) -> None:
    table = ComponentTable()
    ledger = Ledger()
    in_flight: list[Checkpoint] = []
    seq = 0
    model: dict[tuple[str, str], int] = {}
    raises: list[tuple[int, tuple[str, str], int, tuple[str, int], int]] = []
    for op in ops:
        if op[0] == "merge":
            _, key, node, value, hour = op
            seq += 1
            k = (f"k{key}", f"n{node}")
            got, _ = merge(table, k[0], k[1], value, seq=seq, hour=hour)
            assert got == max(0, value - model.get(k, 0))
            if got:
                model[k] = value
                raises.append((seq, k, value, (k[0], hour), got))
        elif op[0] == "take":
            in_flight.append(table.take_checkpoint(max_rows=op[1], max_buckets=op[2]))
        elif in_flight:
            cp = in_flight.pop(op[1] % len(in_flight))
            if op[0] == "confirm":
                ledger.write(cp)
                table.confirm(cp)
            else:
                table.release(cp)
        durable = table.durable_through()
        assert durable <= seq
        for s, k, value, _, _ in raises:
            if s <= durable:
                assert ledger.components.get(k, 0) >= value, (s, k, durable)
        for bucket in {r[3] for r in raises}:
            owed = sum(r[4] for r in raises if r[3] == bucket)
            durable_part = sum(r[4] for r in raises if r[3] == bucket and r[0] <= durable)
            assert durable_part <= ledger.buckets.get(bucket, 0) <= owed
    for cp in in_flight:
        table.release(cp)
    while table.dirty or table.pending_buckets:
        cp = table.take_checkpoint(max_rows=3, max_buckets=3)
        ledger.write(cp)
        table.confirm(cp)
    assert table.durable_through() == seq
    assert ledger.components == {k: v for k, v in model.items() if v}
    for bucket in {r[3] for r in raises}:
        assert ledger.buckets[bucket] == sum(r[4] for r in raises if r[3] == bucket)


# --- memory ---------------------------------------------------------------------------------

def bytes_per_component(count: int) -> float:
    """Traced bytes per component of ``count`` cold keys (one node each), checkpointed."""
    rng = random.Random(7)
    keys = [rng.randbytes(16).hex() for _ in range(count)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = ComponentTable()
        for i, key in enumerate(keys):
            table.merge(namespace="api", key_hash=key, window_start=1_764_547_200_000,
                        node_id=f"node-{i % 3}", region=("us", "eu", "ap")[i % 3],
                        admitted=1 + i % 50, denied=0, policy="monthly", hour=0, seq=i + 1)
        while table.dirty or table.pending_buckets:  # steady state: all durable
            table.confirm(table.take_checkpoint(max_rows=10_000, max_buckets=10_000))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del table
    return used / count


def test_memory_per_component_is_within_target() -> None:
    per = bytes_per_component(50_000)
    print(f"component table: {per:.0f} B per component (50,000 cold keys)")
    assert per <= 250
