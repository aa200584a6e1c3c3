"""The snapshot index (central/partitions/snapshot_index.py): pages in O(page). Pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from central.partitions.snapshot_index import SnapshotIndex, _Log


def all_pages(index: SnapshotIndex[str], node: str, limit: int) -> list[list[str]]:
    pages, cursor = [], 0
    while cursor is not None:
        page = index.page(node, cursor, limit)
        pages.append(page.keys)
        cursor = page.next_cursor
        assert len(pages) < 10_000
    return pages


def test_a_node_gets_its_keys_then_the_blocked_ones_once() -> None:
    index: SnapshotIndex[str] = SnapshotIndex()
    for i in range(5):
        index.served("a", f"a{i}")
    index.served("b", "b0")
    index.served("a", "a0")  # idempotent
    index.blocked("b0")
    index.blocked("a1")  # served by a and blocked: sent once
    pages = all_pages(index, "a", 2)
    assert [k for p in pages for k in p] == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert all(len(p) <= 2 for p in pages)
    assert [k for p in all_pages(index, "c", 10) for k in p] == ["b0", "a1"]
    assert index.keys_of("a") == 5 and index.keys_of("c") == 0


def test_removed_keys_leave_the_snapshot_and_cursors_survive_compaction() -> None:
    index: SnapshotIndex[str] = SnapshotIndex()
    for i in range(10):
        index.served("a", f"k{i}")
    first = index.page("a", 0, 3)
    assert first.keys == ["k0", "k1", "k2"]
    for i in range(7):  # more than half dead: the log compacts
        index.removed(f"k{i}", ["a"])
    rest = index.page("a", first.next_cursor or 0, 10)
    assert rest.keys == ["k7", "k8", "k9"]


def test_bad_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        SnapshotIndex[str]().page("a", 0, 0)


def test_a_page_looks_at_no_more_than_its_size_plus_tombstones() -> None:
    log: _Log[int] = _Log()
    for i in range(100_000):
        log.add(i)
    keys, resume, looked = log.page(50_000, 1000)
    assert keys == list(range(50_000, 51_000)) and resume == 51_000 and looked == 1000


op = st.one_of(
    st.tuples(st.just("serve"), st.sampled_from("ab"), st.integers(0, 15)),
    st.tuples(st.just("block"), st.integers(0, 15)),
    st.tuples(st.just("unblock"), st.integers(0, 15)),
    st.tuples(st.just("remove"), st.integers(0, 15)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.integers(1, 5), st.lists(op, max_size=20))
def test_paging_returns_what_the_node_needs(ops: list[tuple], limit: int,
                                            during: list[tuple]) -> None:
    index: SnapshotIndex[int] = SnapshotIndex()
    served: dict[str, set[int]] = {"a": set(), "b": set()}
    blocked: set[int] = set()

    def apply(o: tuple) -> None:
        if o[0] == "serve":
            index.served(o[1], o[2])
            served[o[1]].add(o[2])
        elif o[0] == "block":
            index.blocked(o[1])
            blocked.add(o[1])
        elif o[0] == "unblock":
            index.unblocked(o[1])
            blocked.discard(o[1])
        else:
            index.removed(o[1], [n for n in served if o[1] in served[n]])
            for keys in served.values():
                keys.discard(o[1])
            blocked.discard(o[1])

    for o in ops:
        apply(o)
    before = served["a"] | blocked
    throughout = set(before)  # needed at every moment of the paging
    got: list[int] = []
    cursor: int | None = 0
    pending = list(during)
    while cursor is not None:
        page = index.page("a", cursor, limit)
        assert len(page.keys) <= limit
        got += page.keys
        cursor = page.next_cursor
        if pending:  # changes between pages, as live traffic does
            apply(pending.pop(0))
            throughout &= served["a"] | blocked
    for o in pending:
        apply(o)
    after = served["a"] | blocked
    touched = {o[1] if o[0] != "serve" else o[2] for o in during}
    # A key changed mid-snapshot may come twice (harmless: nodes merge by maximum).
    twice = {k for k in got if got.count(k) > 1}
    assert twice <= touched
    # Everything needed throughout the paging is sent; nothing sent that was never needed
    # (keys that changed mid-snapshot reach the node through live updates anyway; one
    # removed and needed again is a new key, sent live).
    assert throughout & after <= set(got)
    assert set(got) <= before | after | touched


def test_a_blocked_key_the_node_starts_serving_mid_snapshot_still_comes() -> None:
    index: SnapshotIndex[str] = SnapshotIndex()
    index.served("a", "mine")
    index.blocked("blocked")
    first = index.page("a", 0, 1)
    assert first.keys == ["mine"] and first.next_cursor is not None
    index.served("a", "blocked")  # after phase 0 passed the end of a's log
    rest = all_pages_from(index, "a", first.next_cursor, 1)
    assert rest == ["blocked"]


def all_pages_from(index: SnapshotIndex[str], node: str, cursor: int | None, limit: int
                   ) -> list[str]:
    keys: list[str] = []
    while cursor is not None:
        page = index.page(node, cursor, limit)
        keys += page.keys
        cursor = page.next_cursor
    return keys


def test_a_blocked_key_first_served_during_paging_is_still_sent() -> None:
    index: SnapshotIndex[int] = SnapshotIndex()
    index.blocked(3)
    index.blocked(0)
    first = index.page("a", 0, 1)
    assert first.keys == [3]
    index.served("a", 0)  # after the node's own log was paged: not sent in phase 0
    rest = index.page("a", first.next_cursor or 0, 5)
    assert rest.keys == [0] and rest.next_cursor is None
