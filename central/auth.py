"""The admin bearer token: compared in constant time, never echoed or logged."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from region_node.errors import ApiError

AdminGuard = Callable[[Request], Awaitable[None]]


def admin_guard(token: str) -> AdminGuard:
    expected = f"Bearer {token}".encode()

    async def require_admin(request: Request) -> None:
        supplied = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(supplied, expected):
            raise ApiError(401, "unauthorized", "missing or wrong admin token")

    return require_admin
