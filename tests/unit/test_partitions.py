"""Key partitions (sync/partitions.py) and the interest rule (sync/interest.py). Pure."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sync.errors import InvalidField
from sync.identifiers import IdentifierHasher
from sync.interest import (
    NOBODY,
    Audience,
    InterestSettings,
    blind_excess,
    delivery,
    is_hot,
    node_keeps,
    over_admission_bound,
)
from sync.partitions import (
    PartitionSettings,
    node_totals_subject,
    partition_of,
    partition_usage_filter,
    partition_usage_subject,
)
from sync.subjects import USAGE_SUBJECTS, usage_subject

names = st.text(min_size=1, max_size=64)


@given(names, names, st.integers(1, 1024))
def test_partition_is_in_range_and_depends_only_on_the_key(ns: str, key: str, n: int) -> None:
    p = partition_of(ns, key, partitions=n)
    assert 0 <= p < n
    assert partition_of(ns, key, partitions=n) == p


def test_partition_is_stable_across_processes() -> None:
    # hash() is salted per process; the partition must not be (nodes and central agree).
    code = ("from sync.partitions import partition_of;"
            "print([partition_of('api', f'k{i}') for i in range(50)])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"PYTHONHASHSEED": str(seed)},
                              cwd=Path(__file__).resolve().parents[2]).stdout
               for seed in (1, 2)}
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([partition_of("api", f"k{i}") for i in range(50)])


def test_partitions_are_uniform_over_hashed_identifiers() -> None:
    hasher = IdentifierHasher("secret")
    counts = Counter(partition_of("api", hasher.hash(f"user-{i}")) for i in range(32_000))
    assert sorted(counts) == list(range(16))
    # 2,000 expected per partition; 5 standard deviations (~43 each) is far outside luck.
    assert all(abs(c - 2000) < 5 * 44 for c in counts.values()), counts


def test_namespace_is_part_of_the_partition() -> None:
    moved = sum(partition_of("a", f"k{i}") != partition_of("b", f"k{i}") for i in range(200))
    assert moved > 100


@pytest.mark.parametrize("n", [0, -1, 1025])
def test_bad_partition_count_names_the_field(n: int) -> None:
    with pytest.raises(InvalidField) as info:
        partition_of("ns", "k", partitions=n)
    assert info.value.field == "partitions"


def test_partitions_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PartitionSettings().partitions == 16
    monkeypatch.setenv("REGIONLIMIT_PARTITIONS", "4")
    assert PartitionSettings().partitions == 4
    monkeypatch.setenv("REGIONLIMIT_PARTITIONS", "0")
    with pytest.raises(ValueError, match="partitions"):
        PartitionSettings()


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def test_partition_subjects_stay_in_the_usage_stream_apart_from_old_ones() -> None:
    subject = partition_usage_subject(3, "us")
    assert _matches(USAGE_SUBJECTS, subject)
    assert _matches(partition_usage_filter(3), subject)
    assert not _matches(partition_usage_filter(4), subject)
    # A region named like a partition token still can't reach a partition consumer.
    for region in ("part", "0003", "us"):
        assert not _matches(partition_usage_filter(3), usage_subject(region))


@pytest.mark.parametrize("node_id", ["", "a.b", "a*", "a>", "a b"])
def test_node_subject_rejects_ids_that_are_not_one_token(node_id: str) -> None:
    with pytest.raises(InvalidField) as info:
        node_totals_subject(node_id)
    assert info.value.field == "node_id"


# --- interest -------------------------------------------------------------------------------

def test_hot_from_half_the_limit_by_default() -> None:
    assert not is_hot(49, 100)
    assert is_hot(50, 100)
    assert is_hot(0, 0)
    assert not is_hot(0, 1, share=0.5)
    assert is_hot(0, 1, share=0.0)


@given(st.integers(0, 10**15), st.integers(0, 10**15), st.integers(0, 100))
def test_hot_is_exact_for_big_limits(total: int, limit: int, percent: int) -> None:
    share = percent / 100
    n, d = share.as_integer_ratio()
    assert is_hot(total, limit, share=share) == (total * d >= n * limit)


def test_delivery_cold_hot_blocked() -> None:
    assert delivery(total=10, limit=100, blocked=False, served_by=["a"]) == NOBODY
    hot = delivery(total=60, limit=100, blocked=False, served_by=["a", "b"])
    assert hot.audience is Audience.SERVING and hot.node_ids == {"a", "b"}
    # A block goes to everyone, even below the share (e.g. a lowered limit).
    blocked = delivery(total=10, limit=100, blocked=True, served_by=["a"])
    assert blocked.audience is Audience.EVERYONE


def test_node_keeps_only_what_concerns_it() -> None:
    assert not node_keeps(served_in_window=False, addressed=False, blocked=False)
    assert node_keeps(served_in_window=True, addressed=False, blocked=False)
    assert node_keeps(served_in_window=False, addressed=True, blocked=False)
    assert node_keeps(served_in_window=False, addressed=False, blocked=True)


def test_share_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert InterestSettings().broadcast_share == 0.5
    monkeypatch.setenv("REGIONLIMIT_BROADCAST_SHARE", "1.5")
    with pytest.raises(ValueError, match="broadcast_share"):
        InterestSettings()
    with pytest.raises(InvalidField):
        is_hot(1, 1, share=-0.1)


@given(st.integers(1, 10**6), st.integers(0, 100),
       st.lists(st.floats(0, 10**4), min_size=1, max_size=5), st.floats(0, 10))
@example(limit=6385, percent=100, rates=[9999.81404537994], delay=1.0)  # float rounding
def test_the_rule_does_not_widen_the_bound(limit: int, percent: int, rates: list[float],
                                           delay: float) -> None:
    share = percent / 100
    steady = sum(rates) * delay
    excess = blind_excess(limit=limit, share=share, rates_per_s=rates, delay_s=delay)
    assert excess <= steady * (1 + 1e-9) + 1e-9  # float rounding, not a wider bound
    assert over_admission_bound(limit=limit, share=share, rates_per_s=rates,
                                delay_s=delay) == steady


def _simulate(limit: int, share: float, admits: list[tuple[int, int]], nodes: int,
              delay_steps: int) -> int:
    """Nodes admit one unit per attempt when their view (own + last known others) is
    below the limit; central learns each admission at once and sends totals of hot keys,
    which nodes see ``delay_steps`` steps later. Returns the admitted total."""
    own = [0] * nodes
    others_seen = [0] * nodes
    pending: list[tuple[int, int, list[int]]] = []  # (due step, node, components)
    for step, node in admits:
        for _due, target, components in [p for p in pending if p[0] <= step]:
            others_seen[target] = max(others_seen[target],
                                      sum(components) - components[target])
        pending = [p for p in pending if p[0] > step]
        if own[node] + others_seen[node] < limit:
            own[node] += 1
            total = sum(own)
            if is_hot(total, limit, share=share):
                pending += [(step + delay_steps, n, list(own)) for n in range(nodes)]
    return sum(own)


@given(st.integers(1, 40), st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.integers(1, 3),
       st.integers(0, 5), st.lists(st.integers(0, 2), max_size=200))
def test_simulated_excess_stays_within_the_bound(limit: int, share: float, nodes: int,
                                                 delay: int, who: list[int]) -> None:
    admits = [(step, node % nodes) for step, node in enumerate(who)]
    admitted = _simulate(limit, share, admits, nodes, delay)
    # One attempt per step overall: sum of rates = 1 per step; D = delay steps (+1 for the
    # step the admission itself happens in).
    assert admitted - limit <= over_admission_bound(
        limit=limit, share=share, rates_per_s=[1.0], delay_s=delay + 1)
