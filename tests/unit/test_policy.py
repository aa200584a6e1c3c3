"""Policy validation (sync/policy.py), duration strings (sync/durations.py) and window
arithmetic (sync/windows.py): pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.durations import MAX_DURATION_MS, Duration, format_ms, parse_duration
from sync.errors import InvalidDuration, InvalidField
from sync.identifiers import check_identifier, is_identifier
from sync.policy import MAX_LIMIT, MAX_TIMEOUT_MS, Policy, build_policy, policy_from_dict
from sync.windows import HOUR_MS, hour_start, month_bounds, window_bounds, window_end

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_ms(*args: int) -> int:
    return (datetime(*args, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ms"), [
    ("250ms", 250), ("1ms", 1), ("30s", 30_000), ("5m", 300_000), ("1h", 3_600_000),
    ("1d", 86_400_000), ("366d", MAX_DURATION_MS), ("90s", 90_000),
    (f"{MAX_DURATION_MS}ms", MAX_DURATION_MS),  # 11 digits: the bound is the range
])
def test_parse_duration_accepts_contract_units(text: str, ms: int) -> None:
    assert parse_duration(text) == Duration(text, ms)
    assert not parse_duration(text).is_month


def test_month_is_a_duration_of_varying_length() -> None:
    month = parse_duration("month")
    assert month.is_month and month.text == "month"


@pytest.mark.parametrize("value", [
    "", "0s", "01s", "-1s", "+1s", "1.5s", "1 s", " 1s", "1s ", "1S", "1y", "1w", "s", "1",
    "1s\n", "\n1s", "1m\n", "month\n", "Month", "367d", f"{MAX_DURATION_MS + 1}ms",
    "999999999999ms", "1e3ms",
    "\u0661s",  # an Arabic-Indic digit one: \d would take it, the contract does not
    60, 1.5, None, True, ["1s"], {"ms": 1},
])
def test_parse_duration_rejects_everything_else(value: object) -> None:
    with pytest.raises(InvalidDuration) as caught:
        parse_duration(value, field="timeout")
    assert caught.value.field == "timeout"


@given(st.integers(1, MAX_DURATION_MS))
def test_format_ms_is_the_inverse_of_parse(ms: int) -> None:
    text = format_ms(ms)
    assert parse_duration(text).ms == ms
    assert len(text) <= len(f"{ms}ms")


# --- build_policy ----------------------------------------------------------------------


def test_build_policy_defaults() -> None:
    policy = build_policy(limit=100, duration="1m")
    assert policy == Policy(limit=100, duration=Duration("1m", 60_000))
    assert (policy.algorithm, policy.burst, policy.mode, policy.on_unavailable) == (
        "sliding_window", None, "fast", "open")
    assert policy.timeout == Duration("250ms", 250)
    assert policy.capacity == 100


def test_token_bucket_burst_defaults_to_limit_and_bounds_cost() -> None:
    assert build_policy(limit=10, duration="1s", algorithm="token_bucket").capacity == 10
    assert build_policy(limit=10, duration="1s", algorithm="token_bucket",
                        burst=3).capacity == 3
    assert build_policy(limit=10, duration="1s", algorithm="token_bucket",
                        burst=30).capacity == 30


@pytest.mark.parametrize(("fields", "field"), [
    ({"limit": None}, "limit"),
    ({"duration": None}, "duration"),
    ({"limit": 0}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": MAX_LIMIT + 1}, "limit"),
    ({"limit": True}, "limit"),
    ({"limit": 1.0}, "limit"),
    ({"limit": "10"}, "limit"),
    ({"duration": "1y"}, "duration"),
    ({"duration": 60}, "duration"),
    ({"duration": "month", "algorithm": "sliding_window"}, "duration"),  # month: fixed only
    ({"duration": "month", "algorithm": "token_bucket"}, "duration"),
    ({"algorithm": "leaky_bucket"}, "algorithm"),
    ({"algorithm": ["fixed_window"]}, "algorithm"),
    ({"burst": 5}, "burst"),                                  # not a token bucket
    ({"burst": 0, "algorithm": "token_bucket"}, "burst"),
    ({"burst": False, "algorithm": "token_bucket"}, "burst"),
    ({"mode": "eventual"}, "mode"),
    ({"on_unavailable": "maybe"}, "on_unavailable"),
    ({"timeout": "month"}, "timeout"),
    ({"timeout": f"{MAX_TIMEOUT_MS + 1}ms"}, "timeout"),
    ({"timeout": "0ms"}, "timeout"),
])
def test_build_policy_names_the_bad_field(fields: dict[str, object], field: str) -> None:
    raw: dict[str, object] = {"limit": 10, "duration": "1m", **fields}
    with pytest.raises(InvalidField) as caught:
        build_policy(**raw)
    assert caught.value.field == field
    assert caught.value.message


def test_month_only_with_fixed_window() -> None:
    policy = build_policy(limit=100, duration="month", algorithm="fixed_window")
    assert policy.duration.is_month and policy.capacity == 100


def test_limits_at_the_edges_are_accepted() -> None:
    assert build_policy(limit=1, duration="1ms").limit == 1
    assert build_policy(limit=MAX_LIMIT, duration="366d").limit == MAX_LIMIT
    assert build_policy(limit=1, duration="1m", timeout="60s").timeout.ms == MAX_TIMEOUT_MS


@given(st.sampled_from(["fixed_window", "sliding_window", "token_bucket"]),
       st.integers(1, MAX_LIMIT), st.sampled_from(["1s", "5m", "1h", "7d"]),
       st.sampled_from(["fast", "consistent"]), st.sampled_from(["open", "closed"]))
@settings(max_examples=50)
def test_policy_round_trips_through_its_dict(algorithm: str, limit: int, duration: str,
                                             mode: str, on_unavailable: str) -> None:
    burst = limit + 1 if algorithm == "token_bucket" and limit < MAX_LIMIT else None
    policy = build_policy(limit=limit, duration=duration, algorithm=algorithm, burst=burst,
                          mode=mode, on_unavailable=on_unavailable, timeout="1s")
    assert policy_from_dict(policy.to_dict()) == policy


# --- windows ---------------------------------------------------------------------------


def reference_month(now: int) -> tuple[int, int]:
    """Calendar arithmetic on integers only (no float timestamps)."""
    moment = EPOCH + timedelta(milliseconds=now)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    ms = timedelta(milliseconds=1)
    return (start - EPOCH) // ms, (end - EPOCH) // ms


@given(st.integers(0, utc_ms(2200, 1, 1)))
@settings(max_examples=300)
def test_month_bounds_match_the_calendar(now: int) -> None:
    assert month_bounds(now) == reference_month(now)


@given(st.integers(0, utc_ms(2200, 1, 1) // 1000))
@settings(max_examples=300)
def test_month_bounds_at_the_last_millisecond_before_a_boundary(second: int) -> None:
    start, end = reference_month(second * 1000)
    assert month_bounds(end - 1) == reference_month(end - 1)
    assert month_bounds(start) == (start, end)
    if start:
        assert month_bounds(start - 1)[1] == start


@pytest.mark.parametrize(("now", "bounds"), [
    (utc_ms(2025, 12, 31, 23, 59, 59) + 999, (utc_ms(2025, 12, 1), utc_ms(2026, 1, 1))),
    (utc_ms(2026, 1, 1), (utc_ms(2026, 1, 1), utc_ms(2026, 2, 1))),
    (utc_ms(2024, 2, 29, 23, 59, 59) + 999, (utc_ms(2024, 2, 1), utc_ms(2024, 3, 1))),
    (utc_ms(2100, 2, 28), (utc_ms(2100, 2, 1), utc_ms(2100, 3, 1))),   # 2100: not leap
    (utc_ms(2000, 2, 29), (utc_ms(2000, 2, 1), utc_ms(2000, 3, 1))),   # 2000: leap
])
def test_month_bounds_examples(now: int, bounds: tuple[int, int]) -> None:
    assert month_bounds(now) == bounds
    assert window_bounds(Duration("month", 0), now) == bounds
    assert window_end(Duration("month", 0), bounds[0]) == bounds[1]


@given(st.integers(0, 10**13), st.sampled_from(["1ms", "7ms", "1s", "90s", "1h", "1d"]))
def test_fixed_length_windows_are_epoch_aligned(now: int, text: str) -> None:
    duration = parse_duration(text)
    start, end = window_bounds(duration, now)
    assert start <= now < end and end - start == duration.ms and start % duration.ms == 0
    assert window_end(duration, start) == end


@given(st.integers(0, 10**13))
def test_hour_start(now: int) -> None:
    start = hour_start(now)
    assert start <= now < start + HOUR_MS and start % HOUR_MS == 0


def test_the_identifier_rule_counts_utf8_bytes() -> None:
    assert is_identifier("k") and is_identifier("a" * 256) and is_identifier("€" * 85)
    assert is_identifier("😀" * 64)  # 256 bytes in 64 characters
    assert not is_identifier("😀" * 65)  # 65 characters, 260 bytes
    assert not is_identifier("a" * 257) and not is_identifier("€" * 86)
    for bad in ("", None, 5, b"k", ["k"]):
        assert not is_identifier(bad)
    assert check_identifier("k") == "k"
    with pytest.raises(InvalidField) as caught:
        check_identifier("x" * 300)
    assert caught.value.field == "identifier"
