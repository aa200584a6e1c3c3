"""Client and ASGI middleware for regionlimit region nodes (depends on httpx only)."""

from __future__ import annotations

from regionlimit_client.breaker import BreakerState, CircuitBreaker
from regionlimit_client.client import (
    AsyncRegionLimitClient,
    CheckError,
    CheckRequest,
    CheckResult,
    OnError,
    RegionLimitClient,
)
from regionlimit_client.errors import (
    CircuitOpen,
    LimiterUnavailable,
    RegionLimitClientError,
    RequestRejected,
)
from regionlimit_client.middleware import RateLimitMiddleware

__all__ = [
    "AsyncRegionLimitClient",
    "BreakerState",
    "CheckError",
    "CheckRequest",
    "CheckResult",
    "CircuitBreaker",
    "CircuitOpen",
    "LimiterUnavailable",
    "OnError",
    "RateLimitMiddleware",
    "RegionLimitClient",
    "RegionLimitClientError",
    "RequestRejected",
]
