"""The admin API speaks only JSON: a body declared as anything else is read as JSON.

`curl -d` declares form encoding unless told otherwise; the region node already reads
every body as JSON, and central should not answer the same command with a 422.
"""

from __future__ import annotations

from typing import Any

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonBodies:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in WRITE_METHODS:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)
