"""Usage queries without I/O (central/billing/usage_query.py): validation, periods,
planning, CSV."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from central.billing.usage_query import (
    DAY_MS,
    HOUR_MS,
    MAX_TIME_MS,
    Segment,
    UsageQuery,
    UsageRow,
    ceil_month,
    csv_header,
    csv_lines,
    floor_day,
    floor_month,
    iso,
    month_starts,
    next_month,
    parse_csv,
    parse_request,
    parse_time,
    period_label,
    plan,
    response_body,
    wants_csv,
)
from central.totals import GlobalTotals
from sync.errors import InvalidField
from sync.messages import UsageBatch, UsageEntry
from sync.policy import build_policy
from sync.windows import hour_start

PROPERTY = settings(max_examples=200, deadline=None)


def ms(text: str) -> int:
    return parse_time(text, "t")


NOW = ms("2026-11-23T11:40:00Z")
NOV, DEC = ms("2026-11-01"), ms("2026-12-01")
# Epoch ms of hours between 2020 and 2035.
hours = st.integers(ms("2020-01-01") // HOUR_MS, ms("2035-01-01") // HOUR_MS).map(
    lambda h: h * HOUR_MS)


def request(**fields: object) -> UsageQuery:
    body = {"namespace": "api", **fields}
    return parse_request(body, now_ms=NOW, hash_identifier=lambda raw: f"h({raw})")


def invalid(field: str | None, **fields: object) -> str:
    with pytest.raises(InvalidField) as caught:
        request(**fields)
    assert caught.value.field == field, caught.value.message
    return caught.value.message


# --- times -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-01", 1_793_491_200_000),
    ("2026-11-01T00:00:00Z", 1_793_491_200_000),
    ("2026-11-01T00:00:00", 1_793_491_200_000),  # no offset: UTC, as the API says
    ("2026-11-01T02:00:00+02:00", 1_793_491_200_000),
    ("2026-10-31T19:00:00-05:00", 1_793_491_200_000),
    ("2026-11-30T23:59:59.999Z", 1_796_083_199_999),
])
def test_iso_dates_and_datetimes_become_utc_epoch_ms(text: str, expected: int) -> None:
    assert parse_time(text, "from") == expected


def test_epoch_ms_pass_through_and_nonsense_is_named() -> None:
    assert parse_time(1_793_491_200_000, "from") == 1_793_491_200_000
    for bad in [True, -1, 1.5, "", "yesterday", "2026-13-01", "2026-11-31", [], None,
                "2026-11-01T25:00:00Z"]:
        with pytest.raises(InvalidField) as caught:
            parse_time(bad, "to")
        assert caught.value.field == "to"


@given(hours)
@PROPERTY
def test_iso_round_trips(t: int) -> None:
    assert parse_time(iso(t), "from") == t


# --- requests ----------------------------------------------------------------------------

def test_defaults_are_the_current_calendar_month_ungrouped() -> None:
    query = request()
    assert (query.start, query.end) == (NOV, DEC)
    assert (query.key_hash, query.by_region, query.period) == (None, False, None)
    assert query.columns == ["identifier_hash", "admitted", "denied"]


def test_a_raw_identifier_is_hashed_and_a_hash_is_taken_as_is() -> None:
    assert request(identifier="sk_live_abc").key_hash == "h(sk_live_abc)"
    assert request(identifier_hash="ab" * 16).key_hash == "ab" * 16


def test_group_by_gives_columns() -> None:
    query = request(group_by=["month", "region"])
    assert (query.by_region, query.period) == (True, "month")
    assert query.columns == ["identifier_hash", "region", "period", "admitted", "denied"]
    assert request(group_by=["day"]).period == "day"
    assert request(group_by=[]).columns == ["identifier_hash", "admitted", "denied"]


def test_bad_fields_are_named() -> None:
    invalid("namespace", namespace="")
    invalid("namespace", namespace="a b")
    invalid("namespace", namespace=7)
    assert "not both" in invalid("identifier_hash", identifier="x", identifier_hash="ab" * 16)
    invalid("identifier", identifier="")
    invalid("identifier", identifier="x" * 257)
    invalid("identifier", identifier=42)
    invalid("identifier_hash", identifier_hash="AB" * 16)
    invalid("identifier_hash", identifier_hash="abc")
    invalid("group_by", group_by="region")
    invalid("group_by", group_by=["week"])
    invalid("group_by", group_by=["region", "region"])
    assert "not both" in invalid("group_by", group_by=["day", "month"])
    assert "whole UTC hour" in invalid("from", **{"from": "2026-11-01T00:30:00Z"})
    invalid("to", to=NOV + 1)
    assert "after" in invalid("to", **{"from": "2026-12-01", "to": "2026-11-01"})
    invalid("to", **{"from": "2026-11-01", "to": "2026-11-01"})
    assert "unknown field" in invalid("groupby", groupby=["region"])
    with pytest.raises(InvalidField) as caught:
        parse_request([1], now_ms=NOW, hash_identifier=str)
    assert caught.value.field is None


def test_from_and_to_default_independently() -> None:
    assert request(**{"from": "2026-01-01"}).end == DEC
    assert request(to="2026-11-15").start == NOV


# --- periods -----------------------------------------------------------------------------

def test_the_last_millisecond_of_a_month_belongs_to_that_month() -> None:
    last = ms("2026-11-30T23:59:59.999Z")
    assert period_label(floor_month(hour_start(last)), "month") == "2026-11"
    assert period_label(floor_day(hour_start(last)), "day") == "2026-11-30"
    assert period_label(floor_month(last + 1), "month") == "2026-12"
    assert period_label(ms("2026-12-31T23:59:59.999Z"), "month") == "2026-12"


def test_central_buckets_a_batch_flushed_at_the_last_millisecond_into_that_month() -> None:
    """Ingest side: the increment goes to the hour of the flush time, 23:00 on the 30th."""
    totals = GlobalTotals(retention_ms=7 * DAY_MS)
    flushed = ms("2026-11-30T23:59:59.999Z")
    policy = build_policy(limit=10, duration="1h", algorithm="fixed_window")
    entry = UsageEntry("api", "k" * 32, hour_start(flushed), 3, 1, policy)
    totals.merge(UsageBatch("eu.node.1", "eu", flushed, [entry]), now=flushed + 5)
    _, increments = totals.take_unsaved(flushed + 5)
    assert [(i.hour_start, i.admitted, i.denied) for i in increments] == [
        (ms("2026-11-30T23:00:00Z"), 3, 1)]
    assert NOV <= increments[0].hour_start < DEC


@given(hours)
@PROPERTY
def test_month_and_day_arithmetic_agrees_with_the_calendar(t: int) -> None:
    moment = datetime.fromtimestamp(t / 1000, tz=UTC)
    assert period_label(t, "month") == f"{moment.year:04d}-{moment.month:02d}"
    assert period_label(t, "day") == moment.date().isoformat()
    start = floor_month(t)
    assert start <= t < next_month(t)
    assert datetime.fromtimestamp(start / 1000, tz=UTC).day == 1
    assert ceil_month(t) in (start, next_month(t))
    assert floor_day(t) % DAY_MS == 0


@given(hours, hours)
@PROPERTY
def test_month_starts_cover_a_range(a: int, b: int) -> None:
    start, end = min(a, b), max(a, b) + HOUR_MS
    starts = month_starts(start, end)
    assert starts[0] <= start < next_month(starts[0])
    assert all(next_month(x) == y for x, y in itertools.pairwise(starts))
    assert next_month(starts[-1]) >= end > starts[-1]


# --- planning ----------------------------------------------------------------------------

def query_for(start: int, end: int, period: str | None = None) -> UsageQuery:
    return UsageQuery("api", None, start, end, False, period)  # type: ignore[arg-type]


def aligned(segment: Segment) -> bool:
    if segment.level == "hour":
        return segment.start % HOUR_MS == 0 and segment.end % HOUR_MS == 0
    if segment.level == "day":
        return segment.start % DAY_MS == 0 and segment.end % DAY_MS == 0
    return segment.start == floor_month(segment.start) and segment.end == floor_month(
        segment.end)


@given(hours, hours, st.sampled_from([None, "day", "month"]))
@PROPERTY
def test_a_plan_tiles_the_range_with_aligned_segments(a: int, b: int, period: str | None
                                                      ) -> None:
    start, end = min(a, b), max(a, b) + HOUR_MS
    segments = plan(query_for(start, end, period), hourly_from=0, daily_from=0)
    assert segments[0].start == start and segments[-1].end == end
    assert all(x.end == y.start for x, y in itertools.pairwise(segments))
    assert all(s.start < s.end and aligned(s) for s in segments)
    if period == "day":
        assert all(s.level != "month" for s in segments)
    # Coarsest where possible: at most one hour piece and one day piece on each side.
    assert sum(s.level == "month" for s in segments) <= 1
    assert len(segments) <= 5


def test_a_plan_reads_months_for_whole_months_and_hours_at_the_edges() -> None:
    segments = plan(query_for(ms("2026-09-14T05:00:00Z"), ms("2026-11-02T07:00:00Z")),
                    hourly_from=0, daily_from=0)
    assert [(s.level, iso(s.start)[:13], iso(s.end)[:13]) for s in segments] == [
        ("hour", "2026-09-14T05", "2026-09-15T00"),
        ("day", "2026-09-15T00", "2026-10-01T00"),
        ("month", "2026-10-01T00", "2026-11-01T00"),
        ("day", "2026-11-01T00", "2026-11-02T00"),
        ("hour", "2026-11-02T00", "2026-11-02T07"),
    ]


def test_pruned_detail_is_refused_naming_the_bound_that_needs_it() -> None:
    hourly_from, daily_from = ms("2026-10-19"), ms("2025-10-01")
    marks = {"hourly_from": hourly_from, "daily_from": daily_from}
    # Whole months far back: answered by monthly rows.
    assert [s.level for s in plan(query_for(ms("2024-01-01"), DEC), **marks)] == [
        "month"]
    # Mid-day before hour detail is kept: refused, naming from / to.
    with pytest.raises(InvalidField) as caught:
        plan(query_for(ms("2026-10-05T06:00:00Z"), DEC), **marks)
    assert caught.value.field == "from" and "2026-10-19" in caught.value.message
    with pytest.raises(InvalidField) as caught:
        plan(query_for(ms("2026-09-01"), ms("2026-10-05T06:00:00Z")), **marks)
    assert caught.value.field == "to"
    # Whole days before hour detail is kept come from daily rows.
    assert [s.level for s in plan(query_for(ms("2026-10-05"), DEC), **marks)] == [
        "day", "month"]
    # Days before day detail is kept: refused; by month it is fine.
    with pytest.raises(InvalidField) as caught:
        plan(query_for(ms("2025-06-01"), DEC, "day"), **marks)
    assert caught.value.field == "from" and "group by month" in caught.value.message
    assert plan(query_for(ms("2025-06-01"), DEC, "month"), **marks)[0].level == "month"


def test_days_fall_back_to_hours_when_hourly_detail_outlives_daily() -> None:
    segments = plan(query_for(ms("2026-11-05"), ms("2026-11-07"), "day"),
                    hourly_from=ms("2026-11-01"), daily_from=DEC)
    assert [s.level for s in segments] == ["hour"]


# --- rendering ---------------------------------------------------------------------------

hashes = st.text("0123456789abcdef", min_size=32, max_size=32)
regions = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                  min_size=1, max_size=20)
counts = st.integers(0, 2**62)


@given(st.lists(st.tuples(hashes, regions, st.sampled_from(["2026-11", "2026-12"]),
                          counts, counts), max_size=30),
       st.booleans(), st.sampled_from([None, "day", "month"]))
@PROPERTY
def test_csv_parses_back_to_the_json_rows(raw: list[tuple[str, str, str, int, int]],
                                          by_region: bool, period: str | None) -> None:
    query = UsageQuery("api", None, NOV, DEC, by_region, period)  # type: ignore[arg-type]
    rows = [UsageRow(h, r if by_region else None, p if period else None, a, d)
            for h, r, p, a, d in raw]
    text = csv_header(query.columns) + csv_lines(query.columns, rows)
    assert parse_csv(text) == response_body(query, rows)["rows"]
    assert text.splitlines()[0] == ",".join(query.columns)


def test_response_body_echoes_the_range_in_iso() -> None:
    body = response_body(request(), [UsageRow("ab" * 16, None, None, 5, 1)])
    assert body == {"namespace": "api", "from": "2026-11-01T00:00:00Z",
                    "to": "2026-12-01T00:00:00Z",
                    "rows": [{"identifier_hash": "ab" * 16, "admitted": 5, "denied": 1}]}


@pytest.mark.parametrize(("accept", "csv"), [
    (None, False), ("", False), ("*/*", False), ("application/json", False),
    ("text/csv", True), ("text/csv; charset=utf-8", True), ("text/csv, */*", True),
    ("application/json, text/csv", False), ("text/csv;q=0.5, application/json", False),
    ("application/json;q=0.5, text/csv", True), ("text/csv;q=0", False),
    ("TEXT/CSV", True), ("text/csv;q=oops", False),
])
def test_csv_is_chosen_when_the_client_prefers_it(accept: str | None, csv: bool) -> None:
    assert wants_csv(accept) is csv


# --- the whole accepted range (issue 10: December 9999 was a 500) ----------------------------

every_hour = st.integers(0, MAX_TIME_MS // HOUR_MS).map(lambda h: h * HOUR_MS)
as_given = st.sampled_from([lambda t: t, iso, lambda t: iso(t)[:10] if t % DAY_MS == 0 else t])


@given(every_hour, every_hour, as_given, st.sampled_from([None, ["day"], ["month"],
                                                          ["region", "month"]]))
@PROPERTY
def test_every_range_the_api_accepts_can_be_planned(a: int, b: int, render: Any,
                                                     group_by: list[str] | None) -> None:
    start, end = min(a, b), max(a, b)
    try:
        query = request(**{"from": render(start), "to": render(end), "group_by": group_by})
    except InvalidField as exc:
        assert start == end and exc.field == "to"
        return
    segments = plan(query, hourly_from=0, daily_from=0)
    assert segments[0].start == start and segments[-1].end == end
    for segment in segments:
        period_label(segment.start, "month")
        month_starts(segment.start, segment.end)


@pytest.mark.parametrize("field", ["from", "to"])
@pytest.mark.parametrize("value", ["9999-12-15", "9999-12-31T23:00:00Z", MAX_TIME_MS + HOUR_MS,
                                   "9999-12-31T23:00:00-05:00", "1969-12-31T23:00:00Z"])
def test_times_past_the_accepted_range_are_named(field: str, value: object) -> None:
    body = {"from": 0, "to": MAX_TIME_MS, field: value}
    with pytest.raises(InvalidField) as caught:
        request(**body)
    assert caught.value.field == field
    assert "9999-12-01" in caught.value.message
