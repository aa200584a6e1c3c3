"""The check endpoints as plain ASGI: body in, orjson out, no framework per request."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable
from typing import Any

import orjson

from region_node.check_result import CheckResult
from region_node.checker import Checker, Result
from region_node.ratelimit_fields import ietf_fields
from sync.api_errors import NOT_JSON, UNAUTHORIZED, ApiError

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_BATCH = 1000
Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
# The answer to a request whose body had not arrived when the server stopped (SIGTERM:
# uvicorn waits for requests in flight, then cancels them).
SHUTTING_DOWN = ApiError(503, "shutting_down",
                         "the node is stopping and the request body did not arrive in time; "
                         "retry on another node")

log = logging.getLogger("regionlimit.node")


def _ceil_seconds(ms: int) -> int:
    return max(0, -(-ms // 1000))


def rate_limit_headers(result: Result, now: int) -> Headers:
    headers = [
        (b"content-type", b"application/json"),
        (b"ratelimit-limit", str(result.limit).encode()),
        (b"ratelimit-remaining", str(result.remaining).encode()),
        (b"ratelimit-reset", str(_ceil_seconds(result.reset_at - now)).encode()),
    ]
    if not result.allowed and result.retry_after_ms is not None:
        headers.append((b"retry-after",
                        str(max(1, _ceil_seconds(result.retry_after_ms))).encode()))
    return headers


def error_reply(error: ApiError) -> Reply:
    # The access log is off by default, so a refused request is logged here: status, code,
    # field and message, which never quote the identifier.
    log.info("rejected request: %d %s%s: %s", error.status, error.code,
             f" (field {error.field})" if error.field else "", error.message)
    return error.status, JSON_HEADERS, error.to_json()


class CheckEndpoints:
    def __init__(self, checker: Checker, *, node_token: str | None = None,
                 ietf_ratelimit_fields: bool = True) -> None:
        self.checker = checker
        self._token = f"Bearer {node_token}".encode() if node_token else None
        self.ietf_ratelimit_fields = ietf_ratelimit_fields

    def authorized(self, authorization: bytes | None) -> bool:
        if self._token is None:
            return True
        return authorization is not None and hmac.compare_digest(authorization, self._token)

    async def check(self, body: bytes) -> Reply:
        if self.ietf_ratelimit_fields:
            return await self._check_with_fields(body)
        try:
            outcome = self.checker.check(_decode(body))
            result = outcome if isinstance(outcome, CheckResult) else await outcome
        except ApiError as exc:
            return error_reply(exc)
        return 200, rate_limit_headers(result, self.checker.clock()), orjson.dumps(result)

    async def _check_with_fields(self, body: bytes) -> Reply:
        try:
            check = _decode(body)
            policy, outcome = self.checker.check_with_policy(check)
            result = outcome if isinstance(outcome, CheckResult) else await outcome
        except ApiError as exc:
            return error_reply(exc)
        now = self.checker.clock()
        headers = rate_limit_headers(result, now)
        # A valid check is a dict with a str namespace (the checker refused anything else).
        headers += ietf_fields(check["namespace"], policy, result.remaining,
                               result.reset_at - now)
        return 200, headers, orjson.dumps(result)

    async def batch(self, body: bytes) -> Reply:
        try:
            envelope = _decode(body)
            if not isinstance(envelope, dict):
                raise ApiError(422, "invalid_body", "a batch must be a JSON object")
            checks = envelope.get("checks")
            if not isinstance(checks, list) or not 1 <= len(checks) <= MAX_BATCH:
                raise ApiError(422, "invalid_field",
                               f"checks must be a list of 1..{MAX_BATCH} checks", "checks")
        except ApiError as exc:
            return error_reply(exc)
        results: list[Any] = self.checker.check_batch(checks)
        pending: list[tuple[int, Awaitable[Result]]] = []
        for index, outcome in enumerate(results):
            if outcome.__class__ is CheckResult:
                continue
            if isinstance(outcome, ApiError):
                results[index] = outcome.body()
            else:
                pending.append((index, outcome))
        if pending:
            done = await asyncio.gather(*(awaitable for _, awaitable in pending))
            for (index, _), result in zip(pending, done, strict=True):
                results[index] = result
        return 200, JSON_HEADERS, orjson.dumps({"results": results})


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NOT_JSON from None


async def read_body(receive: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_reply(send: Any, reply: Reply) -> None:
    status, headers, payload = reply
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def check_route(endpoints: CheckEndpoints, path: str) -> Any:
    """A raw ASGI app for one check path, used ahead of FastAPI's router."""
    handler = endpoints.check if path == "/v1/check" else endpoints.batch

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        authorization = None
        if endpoints._token is not None:
            authorization = dict(scope["headers"]).get(b"authorization")
        if not endpoints.authorized(authorization):
            await send_reply(send, error_reply(UNAUTHORIZED))
            return
        try:
            body = await read_body(receive)
        except ApiError as exc:
            await send_reply(send, error_reply(exc))
            return
        except ConnectionResetError:
            return
        except asyncio.CancelledError:
            # Not re-raised: uvicorn would answer a cancelled request with a 500. The task
            # ends here either way, which is all the cancellation asks for.
            await send_reply(send, error_reply(SHUTTING_DOWN))
            return
        await send_reply(send, await handler(body))

    return app
