"""Window arithmetic both sides share: epoch-aligned windows and calendar months (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime

from sync.durations import Duration

HOUR_MS = 3_600_000
# A token bucket's slices in lease mode belong to no window: this one, which never ends
# (9999-12-31, the latest time the wire accepts).
NO_END = 253_402_300_799_999


# The month asked for last: nearly every call (each merged entry, each check) falls in
# it, and datetime arithmetic costs more than the rest of a merge.
_last_month = (0, 0)


def month_bounds(now_ms: int) -> tuple[int, int]:
    """Start and end (epoch ms) of the UTC calendar month holding ``now_ms``."""
    global _last_month
    start, end = _last_month
    if start <= now_ms < end:
        return _last_month
    _last_month = _compute_month_bounds(now_ms)
    return _last_month


def _compute_month_bounds(now_ms: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    if moment.month == 12:
        end = datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    else:
        end = datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)
    return int(start.timestamp()) * 1000, int(end.timestamp()) * 1000


def window_bounds(duration: Duration, now_ms: int) -> tuple[int, int]:
    """The window ``[start, end)`` that holds ``now_ms``, aligned to the epoch."""
    if duration.is_month:
        return month_bounds(now_ms)
    start = now_ms - now_ms % duration.ms
    return start, start + duration.ms


def lease_window(windowed: bool, duration: Duration, now_ms: int) -> tuple[int, int]:
    """What a lease-mode slice belongs to: the window holding ``now_ms``, or when the
    algorithm has no windows (a token bucket; ``lease_windows``), one that never ends
    (docs/lease-mode.md)."""
    if not windowed:
        return 0, NO_END
    return window_bounds(duration, now_ms)


def window_end(duration: Duration, window_start: int) -> int:
    if duration.is_month:
        return month_bounds(window_start)[1]
    return window_start + duration.ms


def hour_start(now_ms: int) -> int:
    return now_ms - now_ms % HOUR_MS
