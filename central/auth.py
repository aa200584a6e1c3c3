"""The admin bearer token: checked once, in front of every /v1/ route, in constant time;
never echoed or logged."""

from __future__ import annotations

import hmac
from typing import Any

from sync.api_errors import ApiError


class AdminAuth:
    """Checks the admin token before anything reads the body, so a request without it is
    a 401 whatever it carries (FastAPI would parse and reject the body first)."""

    def __init__(self, app: Any, *, token: str, prefix: str = "/v1/") -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._prefix = prefix

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self._prefix):
            supplied = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(supplied, self._expected):
                body = ApiError(401, "unauthorized", "missing or wrong admin token").to_json()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
