"""The error tree shared by both sides of the sync contract."""

from __future__ import annotations


class RegionLimitError(Exception):
    """Base of every error regionlimit raises on purpose."""


class InvalidField(RegionLimitError):
    """A value supplied by a client or an operator is wrong; ``field`` names it."""

    code = "invalid_field"

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class InvalidDuration(InvalidField):
    def __init__(self, field: str, value: object) -> None:
        super().__init__(
            field,
            f"{field} must be <integer><unit> with unit ms, s, m, h or d, or 'month'; "
            f"got {value!r}"[:300],
        )
        self.value = value


class MalformedMessage(RegionLimitError):
    """A NATS payload that cannot be decoded or fails validation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedVersion(RegionLimitError):
    """A message of a schema version newer than this process understands."""

    def __init__(self, version: int, newest: int) -> None:
        super().__init__(f"message version {version} is newer than {newest}")
        self.version = version
        self.newest = newest


class PayloadTooLarge(RegionLimitError):
    def __init__(self, size: int, max: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds {max}")
        self.size = size
        self.max = max
