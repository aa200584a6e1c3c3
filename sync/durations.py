"""Duration strings of the contract: ``<integer><unit>`` or ``month``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sync.errors import InvalidDuration

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"([1-9][0-9]{0,10})(ms|s|m|h|d)")  # range: MAX_DURATION_MS
# Longer windows than a year are a billing concern, not a rate limit.
MAX_DURATION_MS = 366 * 86_400_000
MONTH = "month"


@dataclass(frozen=True, slots=True)
class Duration:
    """A window length. ``ms`` is 0 for the calendar month, whose length varies."""

    text: str
    ms: int

    @property
    def is_month(self) -> bool:
        return self.ms == 0


def parse_duration(value: object, *, field: str = "duration",
                   max_ms: int = MAX_DURATION_MS) -> Duration:
    if not isinstance(value, str):
        raise InvalidDuration(field, value)
    if value == MONTH:
        return Duration(MONTH, 0)
    # fullmatch: with match, "$" would also accept a trailing newline ("1s\n").
    match = _PATTERN.fullmatch(value)
    if match is None:
        raise InvalidDuration(field, value)
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms > max_ms:
        raise InvalidDuration(field, value)
    return Duration(value, ms)


def format_ms(ms: int) -> str:
    """The shortest exact duration string for ``ms`` milliseconds."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


MAX_SETTING_MS = 100 * 366 * 86_400_000  # retention may be years; windows may not


def setting_ms(value: str) -> int:
    """Milliseconds of a duration setting (intervals, timeouts, retentions)."""
    return parse_duration(value, field="interval", max_ms=MAX_SETTING_MS).ms


def check_interval(value: str) -> str:
    duration = parse_duration(value, field="interval", max_ms=MAX_SETTING_MS)
    if duration.is_month:
        raise ValueError("an interval cannot be 'month'")
    return value
