"""Usage queries without I/O: request validation, period arithmetic, planning, CSV.

A query asks for the usage of a namespace (optionally one identifier) in a half-open
range ``[start, end)`` of epoch milliseconds. The ledger keeps usage at three levels
(hour, day, month; see ``central/billing/rollups.py``), and the coarse levels cannot be split:
``plan`` cuts the range into segments, each aligned to the level that answers it, and
refuses (422) only when the range needs detail that has been pruned.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from sync.errors import InvalidField
from sync.identifiers import KEY_HASH, check_identifier
from sync.policy import NAMESPACE
from sync.windows import month_bounds

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# The last time a query may name: 9999-12-01T00:00:00Z. Planning rounds a time up to the
# next month, and the month after December 9999 is not a date Python (or ISO) can hold.
MAX_TIME_MS = 253_399_622_400_000
MAX_TIME_TEXT = "9999-12-01T00:00:00Z"

DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")
FIELDS = frozenset({"namespace", "identifier", "identifier_hash", "from", "to", "group_by"})
GROUPS = ("region", "day", "month")

Period = Literal["day", "month"]
Level = Literal["hour", "day", "month"]


# --- calendar arithmetic (UTC; days are epoch-aligned because Unix time has no leap
# seconds) ---------------------------------------------------------------------------------

def floor_day(ms: int) -> int:
    return ms - ms % DAY_MS


def ceil_day(ms: int) -> int:
    return floor_day(ms + DAY_MS - 1)


def floor_month(ms: int) -> int:
    # Not month_bounds: that also builds the next month, which December 9999 lacks.
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()) * 1000


def next_month(ms: int) -> int:
    return month_bounds(ms)[1]


def ceil_month(ms: int) -> int:
    start = floor_month(ms)
    return start if start == ms else next_month(ms)


def month_starts(start: int, end: int) -> list[int]:
    """Starts of the months that overlap ``[start, end)``, ascending."""
    starts = []
    month = floor_month(start)
    while month < end:
        starts.append(month)
        month = next_month(month)
    return starts


def period_start(ms: int, period: Period) -> int:
    return floor_day(ms) if period == "day" else floor_month(ms)


def period_label(ms: int, period: Period) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def iso(ms: int) -> str:
    """``2026-11-01T00:00:00Z``; milliseconds only when there are any."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object, field: str) -> int:
    """ISO date (UTC midnight), ISO datetime (an offset is converted; none means UTC) or
    epoch milliseconds, as epoch milliseconds."""
    if isinstance(value, bool):  # bool is an int in Python, never a time in JSON
        raise _time_error(field, value)
    if isinstance(value, int):
        if not 0 <= value <= MAX_TIME_MS:
            raise _range_error(field)
        return value
    if not isinstance(value, str) or not value or len(value) > 64:
        raise _time_error(field, value)
    try:
        if DATE_ONLY.fullmatch(value):
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        raise _time_error(field, value) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if not 0 <= ms <= MAX_TIME_MS:
        raise _range_error(field)
    return ms


def _range_error(field: str) -> InvalidField:
    return InvalidField(field, f"{field} must be from 1970-01-01T00:00:00Z to {MAX_TIME_TEXT}")


def _time_error(field: str, value: object) -> InvalidField:
    return InvalidField(field, f"{field} must be an ISO date (2026-11-01), an ISO datetime "
                        f"(2026-11-01T00:00:00Z) or epoch milliseconds; got {value!r}"[:300])


# --- the request -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UsageQuery:
    namespace: str
    key_hash: str | None
    start: int
    end: int
    by_region: bool
    period: Period | None

    @property
    def columns(self) -> list[str]:
        """The row columns, in order: the JSON keys and the CSV header."""
        columns = ["identifier_hash"]
        if self.by_region:
            columns.append("region")
        if self.period:
            columns.append("period")
        return [*columns, "admitted", "denied"]


def parse_request(body: object, *, now_ms: int, hash_identifier: Callable[[str], str]
                  ) -> UsageQuery:
    """Validate a decoded JSON body into a query; ``InvalidField`` names what is wrong."""
    if not isinstance(body, dict):
        raise InvalidField(None, "the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InvalidField(unknown[0], f"unknown field {unknown[0]!r}; expected "
                           f"{', '.join(sorted(FIELDS))}"[:300])
    namespace = body.get("namespace")
    if not isinstance(namespace, str) or not NAMESPACE.fullmatch(namespace):
        raise InvalidField("namespace", "namespace is required: 1..64 of [A-Za-z0-9_.:-]")
    key_hash = _key_hash(body, hash_identifier)
    month_start, month_end = month_bounds(now_ms)
    start = parse_time(body["from"], "from") if body.get("from") is not None else month_start
    end = parse_time(body["to"], "to") if body.get("to") is not None else month_end
    for field, value in (("from", start), ("to", end)):
        if value % HOUR_MS:
            raise InvalidField(field, f"{field} must fall on a whole UTC hour: usage is "
                               "recorded per hour")
    if start >= end:
        raise InvalidField("to", f"to ({iso(end)}) must be after from ({iso(start)})")
    by_region, period = _group_by(body.get("group_by"))
    return UsageQuery(namespace, key_hash, start, end, by_region, period)


def _key_hash(body: dict[str, Any], hash_identifier: Callable[[str], str]) -> str | None:
    identifier = body.get("identifier")
    given_hash = body.get("identifier_hash")
    if identifier is not None and given_hash is not None:
        raise InvalidField("identifier_hash", "give identifier or identifier_hash, not both")
    if identifier is not None:
        return hash_identifier(check_identifier(identifier))
    if given_hash is not None:
        if not isinstance(given_hash, str) or not KEY_HASH.fullmatch(given_hash):
            raise InvalidField("identifier_hash",
                               "identifier_hash must be 32 lowercase hex characters")
        return given_hash
    return None


def _group_by(value: object) -> tuple[bool, Period | None]:
    if value is None:
        return False, None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidField("group_by", "group_by must be a list of region, day, month")
    bad = [v for v in value if v not in GROUPS]
    if bad:
        raise InvalidField("group_by", f"group_by accepts region, day, month; got {bad[0]!r}"
                           [:300])
    if len(set(value)) != len(value):
        raise InvalidField("group_by", "group_by lists a grouping twice")
    if "day" in value and "month" in value:
        raise InvalidField("group_by", "group_by takes day or month, not both")
    period: Period | None = "day" if "day" in value else "month" if "month" in value else None
    return "region" in value, period


# --- planning: which level answers which part of the range -------------------------------

@dataclass(frozen=True, slots=True)
class Segment:
    """``[start, end)`` answered by ``level``: ``hour`` sums hourly rows; ``day`` sums daily
    rows plus what hourly rows hold beyond them; ``month`` sums monthly rows plus what
    daily and hourly rows hold beyond those (see ``central/billing/rollups.py``)."""

    level: Level
    start: int
    end: int


def plan(query: UsageQuery, *, hourly_from: int, daily_from: int) -> list[Segment]:
    """Cut ``[start, end)`` into level-aligned segments, coarsest first where possible.

    ``hourly_from``/``daily_from``: hour (day) detail exists from there on. Raises
    ``InvalidField`` naming ``from`` or ``to`` when a part of the range needs detail that
    was pruned. Segments are ascending and adjacent; grouping by day never reads months.
    """
    start, end = query.start, query.end
    pieces: list[tuple[Level, int, int, str]] = []  # level, start, end, field at fault
    day_a, day_b = ceil_day(start), floor_day(end)
    if day_a >= day_b:
        pieces.append(("hour", start, end, "from"))
    else:
        if start < day_a:
            pieces.append(("hour", start, day_a, "from"))
        month_a, month_b = ceil_month(day_a), floor_month(day_b)
        if query.period == "day" or month_a >= month_b:
            pieces.append(("day", day_a, day_b, "from"))
        else:
            if day_a < month_a:
                pieces.append(("day", day_a, month_a, "from"))
            pieces.append(("month", month_a, month_b, "from"))
            if month_b < day_b:
                pieces.append(("day", month_b, day_b, "to"))
        if day_b < end:
            pieces.append(("hour", day_b, end, "to"))
    return [Segment(_available(level, a, field, hourly_from=hourly_from,
                               daily_from=daily_from, period=query.period), a, b)
            for level, a, b, field in pieces]


def _available(level: Level, start: int, field: str, *, hourly_from: int, daily_from: int,
               period: Period | None) -> Level:
    """The level that can answer a segment starting at ``start`` (day-aligned segments can
    fall back to hours when hourly detail outlives daily detail)."""
    if level == "month":
        return level
    if level == "day" and start >= daily_from:
        return level
    if start >= hourly_from:
        return "hour"
    if level == "hour":
        raise InvalidField(field, f"hour-level usage is kept from {iso(hourly_from)} on "
                           "(REGIONLIMIT_HOURLY_RETENTION); before that, use whole UTC days")
    hint = "group by month" if period == "day" else "use whole UTC months"
    raise InvalidField(field, f"day-level usage is kept from {iso(daily_from)} on "
                       f"(REGIONLIMIT_DAILY_RETENTION); before that, {hint}")


# --- rows and rendering ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UsageRow:
    identifier_hash: str
    region: str | None
    period: str | None
    admitted: int
    denied: int

    def as_dict(self, columns: list[str]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in columns}


def response_body(query: UsageQuery, rows: Iterable[UsageRow]) -> dict[str, Any]:
    columns = query.columns
    return {"namespace": query.namespace, "from": iso(query.start), "to": iso(query.end),
            "rows": [row.as_dict(columns) for row in rows]}


def csv_lines(columns: list[str], rows: Iterable[UsageRow]) -> str:
    """CSV (RFC 4180 line ends) of ``rows``, without the header."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([getattr(row, name) for name in columns] for row in rows)
    return buffer.getvalue()


def csv_header(columns: list[str]) -> str:
    return ",".join(columns) + "\r\n"


def parse_csv(text: str) -> list[dict[str, Any]]:
    """The inverse of the CSV rendering: rows as the JSON gives them (counts as ints)."""
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = dict(record)
        row["admitted"], row["denied"] = int(row["admitted"]), int(row["denied"])
        rows.append(row)
    return rows


def wants_csv(accept: str | None) -> bool:
    """True when the Accept header prefers ``text/csv`` over JSON."""
    if not accept:
        return False
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    csv_q = quality.get("text/csv", 0.0)
    # A wildcard loses a tie against an explicit text/csv; an explicit JSON wins one.
    json_q = max(quality.get("application/json", 0.0), quality.get("*/*", 0.0) * 0.999)
    return csv_q > json_q
