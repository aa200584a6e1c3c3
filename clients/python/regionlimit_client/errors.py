"""The one error tree of the client: every error it raises is a `RegionLimitClientError`."""

from __future__ import annotations

__all__ = ["CircuitOpen", "LimiterUnavailable", "RegionLimitClientError", "RequestRejected"]


class RegionLimitClientError(Exception):
    """Base of every error this client raises."""


class LimiterUnavailable(RegionLimitClientError):
    """The node gave no usable answer: timeout, connection error, 5xx or malformed body."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"rate limiter at {url} unavailable: {reason}")
        self.url = url
        self.reason = reason


class CircuitOpen(LimiterUnavailable):
    """Failed at once without a request: the breaker is open after repeated failures."""

    def __init__(self, url: str, *, retry_in: float) -> None:
        super().__init__(url, f"circuit open, next probe in {retry_in:.2f}s")
        self.retry_in = retry_in


class RequestRejected(RegionLimitClientError):
    """The node answered 4xx: the request itself is wrong (API.md error shape)."""

    def __init__(self, status: int, code: str, field: str | None, message: str) -> None:
        where = f" (field {field})" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status = status
        self.code = code
        self.field = field
        self.message = message
