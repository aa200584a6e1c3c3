"""ASGI middleware that rate-limits every HTTP request through a region node.

Pure ASGI (like Starlette's own middleware): no request/response objects, no body
buffering, streaming responses pass through untouched. Per request it

1. picks the identifier: the principal from `identify(scope)` under `namespace`, else the
   `identifier_header` value under `namespace`, else the client IP under
   `anonymous_namespace` (IPv6 truncated to its /`ipv6_prefix` network);
2. asks the node (`AsyncRegionLimitClient`, pooled, `timeout` as a whole-call deadline,
   circuit breaker);
3. answers 429 (`Retry-After`, `RateLimit-*`, API.md body) or calls the app and adds
   `RateLimit-*` to its response. If the node gave no answer it applies `on_error`
   ("open": serve, "closed": 503), logs one line with a hashed identifier and counts
   `regionlimit_middleware_limiter_errors_total{namespace, action}`.

Client IPs come from the socket peer. The `forwarded_header` is read only when the peer is
one of `trusted_proxies`, and then from the right: the right-most address that is not a
trusted proxy is the client, since everything to its left was written by the client.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal

import httpx

from regionlimit_client.breaker import CircuitBreaker
from regionlimit_client.client import AsyncRegionLimitClient, CheckResult
from regionlimit_client.client_ip import (
    IPAddress,
    client_address,
    forwarded_entries,
    ip_identifier,
    parse_address,
)
from regionlimit_client.errors import CircuitOpen, LimiterUnavailable, RequestRejected

try:  # The metric is counted when the app exports Prometheus metrics; it is optional.
    import prometheus_client
except ImportError:  # the client-only install: no metric
    prometheus_client = None  # type: ignore[assignment]

__all__ = [
    "LIMITER_ERRORS",
    "IPAddress",
    "RateLimitMiddleware",
    "client_address",
    "ip_identifier",
    "normalize_identifier",
    "parse_address",
    "rate_limit_headers",
    "retry_after_seconds",
]

logger = logging.getLogger(__name__)

# The ASGI types, spelled out so the package needs no web framework (same shapes as
# starlette.types).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Identify = Callable[[Scope], str | Awaitable[str | None] | None]

# Module level: one registration however many middleware instances (apps, tests) exist.
LIMITER_ERRORS = (
    prometheus_client.Counter(
        "regionlimit_middleware_limiter_errors_total",
        "Requests the middleware decided by on_error because the limiter gave no answer",
        ["namespace", "action"],
    )
    if prometheus_client is not None
    else None
)

# The node's contract rules, restated here because this package must not import the
# server (it installs without it): identifier 1..256 bytes UTF-8, namespace 1..64 of
# [A-Za-z0-9_.:-]. The node enforces both; these copies only keep requests valid.
_MAX_IDENTIFIER_BYTES = 256
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_UNKNOWN_CLIENT = "unknown"

# Log lines carry a keyed hash, never the identifier. The key is random per process: lines
# of one process can be correlated, but nobody can enumerate IPs against them.
_LOG_HASH_KEY = secrets.token_bytes(32)


def _log_hash(identifier: str) -> str:
    return hashlib.blake2b(identifier.encode(), key=_LOG_HASH_KEY, digest_size=8).hexdigest()


# ------------------------------------------------------------ identifier helpers


def normalize_identifier(value: str) -> str | None:
    """A usable identifier, or None for a blank one.

    Values beyond the node's 256-byte cap are replaced by their SHA-256: still one bucket per
    value, where rejecting them would let anyone bypass the limit with a long key.
    """
    value = value.strip()
    if not value:
        return None
    if len(value.encode()) > _MAX_IDENTIFIER_BYTES:
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


# ------------------------------------------------------------------ header helpers


def retry_after_seconds(retry_after_ms: int | None) -> int:
    """`Retry-After`: whole seconds, rounded up, at least 1 (API.md)."""
    return max(1, math.ceil((retry_after_ms or 0) / 1000))


def rate_limit_headers(
    result: CheckResult, *, now_ms: int, policy_name: str | None = None
) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Limit/-Remaining/-Reset` (and `Retry-After` when denied), as the node sends.

    With ``policy_name`` (the namespace) also the structured fields of
    draft-ietf-httpapi-ratelimit-headers-10: `RateLimit-Policy: "name";q=LIMIT` and
    `RateLimit: "name";r=REMAINING;t=RESET`. The window ``w`` is left out: the answer does
    not carry the namespace's duration.

    The node has its own copy (region_node/http.py): this package cannot import the server,
    and the server must not depend on the client for its own headers.
    """
    reset = max(0, math.ceil((result.reset_at - now_ms) / 1000))
    headers = [
        (b"ratelimit-limit", str(result.limit).encode()),
        (b"ratelimit-remaining", str(result.remaining).encode()),
        (b"ratelimit-reset", str(reset).encode()),
    ]
    if policy_name is not None:
        headers.append((b"ratelimit-policy", f'"{policy_name}";q={result.limit}'.encode()))
        headers.append((b"ratelimit", f'"{policy_name}";r={result.remaining};t={reset}'.encode()))
    if not result.allowed:
        headers.append((b"retry-after", str(retry_after_seconds(result.retry_after_ms)).encode()))
    return headers


async def _send_json(
    send: Send, status: int, body: object, headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------------- middleware


class RateLimitMiddleware:
    """Rate-limit an ASGI app through a region node. See docs/client.md.

    Beyond the API.md keywords: `token` (node token, sent as a bearer token),
    `failure_threshold` / `cool_down` (circuit breaker), `hash_identifier` (how identifiers
    are hashed for log lines; default keyed BLAKE2b with a per-process random key) and
    `transport` (an httpx transport, e.g. `httpx.AsyncHTTPTransport(uds=...)`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        url: str,
        namespace: str,
        limit: int | None = None,
        duration: str | None = None,
        identifier_header: str | None = None,
        identify: Identify | None = None,
        anonymous_namespace: str | None = None,
        trusted_proxies: Sequence[str] = (),
        forwarded_header: str = "x-forwarded-for",
        ipv6_prefix: int = 64,
        cost: Callable[[Scope], int] | None = None,
        exclude_paths: Sequence[str] = (),
        timeout: float = 0.25,
        on_error: Literal["open", "closed"] = "open",
        token: str | None = None,
        failure_threshold: int = 5,
        cool_down: float = 5.0,
        hash_identifier: Callable[[str], str] = _log_hash,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        anonymous_namespace = anonymous_namespace or f"{namespace}:ip"
        for name in (namespace, anonymous_namespace):
            if not _NAMESPACE.fullmatch(name):
                raise ValueError(f"namespace {name!r} must be 1..64 of [A-Za-z0-9_.:-]")
        if (limit is None) != (duration is None):
            raise ValueError("give both limit and duration (inline policy) or neither")
        if on_error not in ("open", "closed"):
            raise ValueError(f"on_error must be 'open' or 'closed', not {on_error!r}")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 0..128")
        self.app = app
        self.namespace = namespace
        self.anonymous_namespace = anonymous_namespace
        self.limit = limit
        self.duration = duration
        self.identifier_header = identifier_header.lower().encode() if identifier_header else None
        self.identify = identify
        # strict=True: `10.0.0.1/8` is a typo for a network, and guessing would widen trust.
        self.trusted_proxies = tuple(ipaddress.ip_network(cidr) for cidr in trusted_proxies)
        self.forwarded_header = forwarded_header.lower().encode()
        self.ipv6_prefix = ipv6_prefix
        self.cost = cost
        self.exclude_paths = tuple(path.rstrip("/") for path in exclude_paths)
        self.on_error = on_error
        self.hash_identifier = hash_identifier
        self.breaker = CircuitBreaker(
            failure_threshold=failure_threshold, cool_down=cool_down, name=url
        )
        self._new_client = functools.partial(
            AsyncRegionLimitClient,
            url,
            timeout=timeout,
            on_error="raise",  # the middleware applies on_error itself, to log and count
            token=token,
            breaker=self.breaker,
            transport=transport,
        )
        # Pooled connections belong to the event loop that opened them, and some hosts run
        # each request in a fresh loop (Starlette's TestClient): one pool per running loop.
        self._clients: weakref.WeakKeyDictionary[object, AsyncRegionLimitClient] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_on_shutdown(send))
            return
        # WebSocket and other scopes pass: one handshake is not a request rate to limit here.
        if scope["type"] != "http" or self._excluded(scope["path"]):
            await self.app(scope, receive, send)
            return

        namespace, identifier = await self._identity(scope)
        try:
            result = await self._client().check(
                namespace,
                identifier,
                cost=self.cost(scope) if self.cost else 1,
                limit=self.limit,
                duration=self.duration,
            )
        except (LimiterUnavailable, RequestRejected) as error:
            await self._limiter_failed(scope, receive, send, namespace, identifier, error)
            return

        headers = rate_limit_headers(
            result, now_ms=time.time_ns() // 1_000_000, policy_name=namespace
        )
        if not result.allowed:
            body = {
                "error": {
                    "code": "rate_limited",
                    "retry_after_ms": result.retry_after_ms,
                    "message": "rate limit exceeded",
                }
            }
            await _send_json(send, 429, body, headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                # An inner limiter's own RateLimit-* headers describe a narrower policy; keep them.
                extra = [(name, value) for name, value in headers if name not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _excluded(self, path: str) -> bool:
        # `/static` excludes `/static` and `/static/x`, but not `/staticfoo`.
        return any(path == p or path.startswith(p + "/") for p in self.exclude_paths)

    async def _identity(self, scope: Scope) -> tuple[str, str]:
        """(namespace, identifier) for this request."""
        if self.identify is not None:
            # identify decides alone: when it vouches for nobody, a header it did not
            # vouch for must not pick the bucket (anyone could mint fresh keys).
            principal = self.identify(scope)
            if inspect.isawaitable(principal):
                principal = await principal
            if principal is not None and (identifier := normalize_identifier(principal)):
                return self.namespace, identifier
        elif self.identifier_header is not None:
            for name, value in scope["headers"]:
                if name == self.identifier_header:
                    if identifier := normalize_identifier(value.decode("latin-1")):
                        return self.namespace, identifier
                    break
        return self.anonymous_namespace, self._client_ip(scope)

    def _client_ip(self, scope: Scope) -> str:
        peer_host = (scope.get("client") or (None, None))[0]
        peer = parse_address(peer_host) if peer_host else None
        if peer is None:
            # No socket peer (e.g. a unix socket) or a non-IP one (test clients): one bucket
            # per such name, so this traffic stays limited rather than unlimited.
            return normalize_identifier(peer_host or "") or _UNKNOWN_CLIENT
        forwarded: list[str] = []
        if self.trusted_proxies:
            values = [
                v.decode("latin-1") for n, v in scope["headers"] if n == self.forwarded_header
            ]
            forwarded = forwarded_entries(values, rfc7239=self.forwarded_header == b"forwarded")
        address = client_address(peer, forwarded, self.trusted_proxies)
        return ip_identifier(address, ipv6_prefix=self.ipv6_prefix)

    async def _limiter_failed(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        namespace: str,
        identifier: str,
        error: LimiterUnavailable | RequestRejected,
    ) -> None:
        if LIMITER_ERRORS is not None:
            LIMITER_ERRORS.labels(namespace=namespace, action=self.on_error).inc()
        if isinstance(error, CircuitOpen):
            level = logging.DEBUG  # announced once when the circuit opened
        elif isinstance(error, RequestRejected):
            level = logging.ERROR  # our configuration is wrong (namespace, cost, token)
        else:
            level = logging.WARNING
        logger.log(
            level,
            "rate limit check failed (%s): %s request namespace=%s identifier_hash=%s",
            error,
            "serving" if self.on_error == "open" else "rejecting (503)",
            namespace,
            self.hash_identifier(identifier),
        )
        if self.on_error == "open":
            await self.app(scope, receive, send)
            return
        retry_in = error.retry_in if isinstance(error, CircuitOpen) else 0.0
        body = {"error": {"code": "limiter_unavailable", "message": "rate limiter unavailable"}}
        retry_after = str(max(1, math.ceil(retry_in))).encode()
        await _send_json(send, 503, body, [(b"retry-after", retry_after)])

    def _client(self) -> AsyncRegionLimitClient:
        loop = _event_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._new_client()
        return client

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def send_and_close(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        return send_and_close

    async def aclose(self) -> None:
        """Close this event loop's pooled connections (done on lifespan shutdown)."""
        client = self._clients.pop(_event_loop(), None)
        if client is not None:
            await client.aclose()


class _NotAsyncio:
    """Stands for the event loop under trio, where a process runs one loop at a time."""


_NOT_ASYNCIO = _NotAsyncio()


def _event_loop() -> object:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return _NOT_ASYNCIO
