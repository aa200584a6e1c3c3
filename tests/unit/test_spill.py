"""The spill file (region_node/spill.py): usage a stopping node could not publish.

Only tmp files: each test writes under its own ``tmp_path``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from region_node.spill import read_spill, write_spill
from sync.messages import UsageBatch, UsageEntry, encode_usage, encode_usage_v1
from sync.policy import build_policy

KEY = "0123456789abcdef0123456789abcdef"
T0 = 1_717_201_230_250
FIXED = build_policy(limit=10, duration="1h", algorithm="fixed_window")
BUCKET = build_policy(limit=5, duration="1s", algorithm="token_bucket", burst=9)


def batch(flushed_at: int, *counts: int, node: str = "eu-host-1-boot0") -> UsageBatch:
    return UsageBatch(node, "eu", flushed_at, [
        UsageEntry("ns", f"{i:032x}", T0 - T0 % 3_600_000, n, i, FIXED if i % 2 else BUCKET)
        for i, n in enumerate(counts)])


def spill_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spill-eu.msgpack"


def test_round_trip(tmp_path: Path) -> None:
    path = spill_path(tmp_path)
    batches = [batch(T0, 3, 1), batch(T0 + 100, 5), batch(T0 + 200)]
    raw = [encode_usage(b) for b in batches]
    write_spill(path, raw)  # creates the missing directory
    assert path.exists()
    assert read_spill(path) == list(zip(raw, batches, strict=True))
    assert read_spill(path) == list(zip(raw, batches, strict=True))  # reading keeps it
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .tmp left


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.lists(st.tuples(st.integers(0, 2**40),
                               st.lists(st.integers(0, 2**40), max_size=5)),
                     min_size=1, max_size=6))
def test_round_trip_property(tmp_path: Path, spec: list[tuple[int, list[int]]]) -> None:
    path = spill_path(tmp_path)
    batches = [batch(flushed_at, *counts) for flushed_at, counts in spec]
    raw = [encode_usage(b) for b in batches]
    write_spill(path, raw)
    assert read_spill(path) == list(zip(raw, batches, strict=True))


def test_previous_message_version_is_read(tmp_path: Path) -> None:
    path = spill_path(tmp_path)
    b = batch(T0, 2, 7)
    write_spill(path, [encode_usage_v1(b)])
    # Version 1 predates addressed totals (sync/messages.py).
    assert [decoded for _, decoded in read_spill(path)] == [replace(b, addressed=False)]


def test_rewrite_replaces_the_previous_content(tmp_path: Path) -> None:
    path = spill_path(tmp_path)
    write_spill(path, [encode_usage(batch(T0, 1)), encode_usage(batch(T0 + 1, 2))])
    write_spill(path, [encode_usage(batch(T0 + 2, 3))])
    assert [b for _, b in read_spill(path)] == [batch(T0 + 2, 3)]


def test_empty_list_removes_the_file(tmp_path: Path) -> None:
    path = spill_path(tmp_path)
    write_spill(path, [encode_usage(batch(T0, 1))])
    write_spill(path, [])
    assert not path.exists()
    assert read_spill(path) == []
    write_spill(path, [])  # nothing to remove: no error
    assert not path.exists()


def test_missing_file_reads_empty(tmp_path: Path) -> None:
    assert read_spill(tmp_path / "nope.msgpack") == []
    assert list(tmp_path.iterdir()) == []


GOOD = encode_usage(batch(T0, 1))
DAMAGED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1garbage", id="garbage"),
    pytest.param(msgpack.packb({"v": 1, "batches": [GOOD]})[:-3], id="truncated"),
    pytest.param(msgpack.packb([GOOD]), id="not-a-map"),
    pytest.param(msgpack.packb(7), id="int"),
    pytest.param(msgpack.packb("batches"), id="str"),
    pytest.param(msgpack.packb(None), id="nil"),
    pytest.param(msgpack.packb({"v": 1}), id="no-batches"),
    pytest.param(msgpack.packb({"v": 1, "batches": 5}), id="batches-not-a-list"),
    pytest.param(msgpack.packb({"v": 1, "batches": [5]}), id="batch-not-bytes"),
    pytest.param(msgpack.packb({"v": 1, "batches": [GOOD, b"\x00junk"]}), id="bad-batch"),
    pytest.param(msgpack.packb({"v": 1, "batches": [msgpack.packb({"v": 99, "t": "usage"})]}),
                 id="newer-version"),
    pytest.param(msgpack.packb({1: 2}), id="int-key"),
    pytest.param(b"\xa2\xff\xfe", id="bad-utf8"),
    pytest.param(msgpack.packb({"v": 1, "batches": [GOOD]}) + b"\x00", id="extra-data"),
]


@pytest.mark.parametrize("content", DAMAGED)
def test_damaged_file_is_moved_aside(tmp_path: Path, content: bytes,
                                     caplog: pytest.LogCaptureFixture) -> None:
    path = spill_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert read_spill(path) == []
    assert not path.exists()
    aside = [p for p in path.parent.iterdir() if p.name.endswith(".damaged")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    # The next start finds no spill file, and can write a new one.
    assert read_spill(path) == []
    write_spill(path, [GOOD])
    assert [b for _, b in read_spill(path)] == [batch(T0, 1)]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64))
def test_any_bytes_never_raise(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.msgpack"
    path.write_bytes(content)
    result = read_spill(path)
    assert isinstance(result, list)
    for p in tmp_path.glob("*.damaged"):
        p.unlink()
    path.unlink(missing_ok=True)
