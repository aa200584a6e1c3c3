"""Python client for a region node's check API (POST /v1/check and /v1/check/batch).

Two clients with one behaviour: `RegionLimitClient` (blocking) and
`AsyncRegionLimitClient` (asyncio or trio). Each owns one pooled httpx client with
keep-alive, so a check costs one request on a warm connection, never a TCP handshake.

Failure model:
- the node answered 4xx: the request is wrong (bad field, unknown namespace, wrong token);
  `RequestRejected` is raised whatever `on_error` says, because retrying or guessing would
  hide a bug;
- the node did not answer usefully (timeout, connection error, 5xx, malformed body):
  `LimiterUnavailable`, or with `on_error="open"` / `"closed"` a synthesized `CheckResult`
  with `source="error"`;
- after `failure_threshold` consecutive failures the circuit breaker opens: for `cool_down`
  seconds calls fail at once (`CircuitOpen`, or the `on_error` answer) instead of each
  waiting out the timeout, then a single probe decides whether to close it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import anyio
import httpx

from regionlimit_client.breaker import BreakerState, CircuitBreaker
from regionlimit_client.errors import (
    CircuitOpen,
    LimiterUnavailable,
    RegionLimitClientError,
    RequestRejected,
)

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
    "RegionLimitClient",
    "RegionLimitClientError",
    "RequestRejected",
]

logger = logging.getLogger(__name__)

OnError = Literal["raise", "open", "closed"]

_T = TypeVar("_T")

# Idle pooled connections are dropped before uvicorn's default 5 s keep-alive closes them
# from the node's side: reusing a connection the server is closing at that very moment
# fails with "server disconnected without sending a response".
_KEEPALIVE_EXPIRY = 2.0


# -------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """One check. `limit`/`duration` (and the rest) define an inline namespace."""

    namespace: str
    identifier: str
    cost: int = 1
    limit: int | None = None
    duration: str | None = None
    algorithm: str | None = None
    burst: int | None = None
    mode: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "namespace": self.namespace,
            "identifier": self.identifier,
            "cost": self.cost,
        }
        # Unset inline fields are left out: a configured namespace then needs nothing more.
        for name in ("limit", "duration", "algorithm", "burst", "mode"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A node's answer (API.md), or with `source == "error"` the `on_error` answer.

    An error result carries no limiter numbers: `limit` echoes the request's inline limit
    (else 0), `remaining` and `reset_at` are 0, `retry_after_ms` is None, `mode` echoes the
    request's mode (else "fast"). Don't derive RateLimit-* headers from it.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_at: int
    retry_after_ms: int | None
    mode: str
    source: str
    # True when the namespace's shadow_mode admitted a check it would have denied. Nodes
    # without shadow mode leave the field out of their answer: False then.
    shadowed: bool = False


@dataclass(frozen=True, slots=True)
class CheckError:
    """A batch slot the node refused on its own (bad field, unknown namespace)."""

    code: str
    field: str | None
    message: str


# ------------------------------------------------------------------- shared logic


class _Core:
    """What the blocking and the async client share: everything except the I/O."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        on_error: OnError,
        token: str | None,
        breaker: CircuitBreaker | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if on_error not in ("raise", "open", "closed"):
            raise ValueError(f"on_error must be 'raise', 'open' or 'closed', not {on_error!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.on_error: OnError = on_error
        self.breaker = breaker or CircuitBreaker(name=self.url)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def refuse_if_open(self) -> None:
        if not self.breaker.allow():
            raise CircuitOpen(self.url, retry_in=self.breaker.retry_in())

    def transport_failure(self, exc: BaseException) -> LimiterUnavailable:
        self.breaker.record_failure()
        if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
            return LimiterUnavailable(self.url, f"timeout after {self.timeout}s")
        return LimiterUnavailable(self.url, f"{type(exc).__name__}: {exc}")

    def finish(self, response: httpx.Response, parse: Callable[[Any], _T]) -> _T:
        """Turn a response into a value or an error, and tell the breaker which it was."""
        status = response.status_code
        if 400 <= status < 500:
            # The node answered: it is up, the request is wrong.
            self.breaker.record_success()
            raise _rejected(response)
        if status != 200:
            self.breaker.record_failure()
            raise LimiterUnavailable(self.url, f"HTTP {status}")
        try:
            value = parse(response.json())
        except (ValueError, KeyError, TypeError) as exc:
            self.breaker.record_failure()
            reason = f"malformed response ({type(exc).__name__}: {exc})"
            raise LimiterUnavailable(self.url, reason) from exc
        self.breaker.record_success()
        return value

    def fallback(self, request: CheckRequest, error: LimiterUnavailable) -> CheckResult:
        if self.on_error == "raise":
            raise error
        # A breaker short-circuit was already announced when the circuit opened; logging
        # each one would flood the log for the whole cool-down.
        level = logging.DEBUG if isinstance(error, CircuitOpen) else logging.WARNING
        logger.log(
            level,
            "%s; answering %s for namespace %s",
            error,
            self.on_error,
            request.namespace,
        )
        return CheckResult(
            allowed=self.on_error == "open",
            limit=request.limit or 0,
            remaining=0,
            reset_at=0,
            retry_after_ms=None,
            mode=request.mode or "fast",
            source="error",
        )


def _rejected(response: httpx.Response) -> RequestRejected:
    try:
        error = response.json()["error"]
        return RequestRejected(
            response.status_code,
            str(error["code"]),
            error.get("field"),
            str(error.get("message", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not the API.md shape: e.g. a proxy in front of the node answered.
        return RequestRejected(
            response.status_code, f"http_{response.status_code}", None, response.text[:200]
        )


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    # bool is an int subclass; a JSON true where a count belongs is a broken response.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer, got {value!r}")
    return value


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def _bool(data: dict[str, Any], key: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be a boolean, got {value!r}")
    return value


def _parse_result(data: Any) -> CheckResult:
    if not isinstance(data, dict):
        raise TypeError("check result must be an object")
    allowed = data["allowed"]
    if not isinstance(allowed, bool):
        raise TypeError(f"allowed must be a boolean, got {allowed!r}")
    return CheckResult(
        allowed=allowed,
        limit=_int(data, "limit"),
        remaining=_int(data, "remaining"),
        reset_at=_int(data, "reset_at"),
        retry_after_ms=None if data.get("retry_after_ms") is None else _int(data, "retry_after_ms"),
        mode=_str(data, "mode"),
        source=_str(data, "source"),
        shadowed=_bool(data, "shadowed", default=False),
    )


def _batch_parser(expected: int) -> Callable[[Any], list[CheckResult | CheckError]]:
    def parse(data: Any) -> list[CheckResult | CheckError]:
        results = data["results"]
        if not isinstance(results, list) or len(results) != expected:
            raise ValueError(f"expected {expected} results")
        out: list[CheckResult | CheckError] = []
        for slot in results:
            if isinstance(slot, dict) and "error" in slot:
                error = slot["error"]
                out.append(
                    CheckError(str(error["code"]), error.get("field"), str(error["message"]))
                )
            else:
                out.append(_parse_result(slot))
        return out

    return parse


@dataclass(frozen=True, slots=True)
class _Call(Generic[_T]):
    """One prepared request: where it goes, what it sends, how its answer is read, and what
    it returns instead when the node gives no usable answer (`on_error`)."""

    path: str
    body: dict[str, Any]
    parse: Callable[[Any], _T]
    fallback: Callable[[LimiterUnavailable], _T]


def _check_call(core: _Core, request: CheckRequest) -> _Call[CheckResult]:
    return _Call(
        "/v1/check",
        request.to_json(),
        _parse_result,
        lambda error: core.fallback(request, error),
    )


def _batch_call(
    core: _Core, checks: Sequence[CheckRequest]
) -> _Call[list[CheckResult | CheckError]]:
    return _Call(
        "/v1/check/batch",
        {"checks": [check.to_json() for check in checks]},
        _batch_parser(len(checks)),
        lambda error: [core.fallback(check, error) for check in checks],
    )


def _http_options(timeout: float) -> dict[str, Any]:
    return {
        "timeout": httpx.Timeout(timeout),
        "limits": httpx.Limits(keepalive_expiry=_KEEPALIVE_EXPIRY),
    }


# ------------------------------------------------------------------------- clients
#
# The two clients differ only in how they send one request (`_send`); what to send, how to
# read the answer and what to do when there is none is the shared `_Call` and `_Core`.


class RegionLimitClient:
    """Blocking client. Thread-safe; share one per process and node.

    `timeout` bounds each phase of a request (connect, write, read, pool wait), as httpx
    does; a blocking call has no cheap way to bound their sum.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        on_error: OnError = "raise",
        token: str | None = None,
        breaker: CircuitBreaker | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, timeout=timeout, on_error=on_error, token=token, breaker=breaker)
        self._http = httpx.Client(
            base_url=self._core.url,
            headers=self._core.headers,
            transport=transport,
            **_http_options(timeout),
        )

    @property
    def breaker(self) -> CircuitBreaker:
        return self._core.breaker

    def check(
        self,
        namespace: str,
        identifier: str,
        *,
        cost: int = 1,
        limit: int | None = None,
        duration: str | None = None,
        algorithm: str | None = None,
        burst: int | None = None,
        mode: str | None = None,
    ) -> CheckResult:
        request = CheckRequest(
            namespace, identifier, cost, limit, duration, algorithm, burst, mode
        )
        return self._send(_check_call(self._core, request))

    def check_batch(self, checks: Sequence[CheckRequest]) -> list[CheckResult | CheckError]:
        """Decide 1..1000 checks in one request; each slot is a result or its own error."""
        return self._send(_batch_call(self._core, checks))

    def _send(self, call: _Call[_T]) -> _T:
        try:
            self._core.refuse_if_open()
            try:
                response = self._http.post(call.path, json=call.body)
            except httpx.TransportError as exc:
                raise self._core.transport_failure(exc) from exc
            except BaseException:
                self._core.breaker.release()
                raise
            return self._core.finish(response, call.parse)
        except LimiterUnavailable as error:
            return call.fallback(error)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegionLimitClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRegionLimitClient:
    """Async client (asyncio or trio). Share one per event loop and node.

    `timeout` bounds the whole call (connect, send, answer), not just each phase.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        on_error: OnError = "raise",
        token: str | None = None,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, timeout=timeout, on_error=on_error, token=token, breaker=breaker)
        self._http = httpx.AsyncClient(
            base_url=self._core.url,
            headers=self._core.headers,
            transport=transport,
            **_http_options(timeout),
        )

    @property
    def breaker(self) -> CircuitBreaker:
        return self._core.breaker

    async def check(
        self,
        namespace: str,
        identifier: str,
        *,
        cost: int = 1,
        limit: int | None = None,
        duration: str | None = None,
        algorithm: str | None = None,
        burst: int | None = None,
        mode: str | None = None,
    ) -> CheckResult:
        request = CheckRequest(
            namespace, identifier, cost, limit, duration, algorithm, burst, mode
        )
        return await self._send(_check_call(self._core, request))

    async def check_batch(self, checks: Sequence[CheckRequest]) -> list[CheckResult | CheckError]:
        """Decide 1..1000 checks in one request; each slot is a result or its own error."""
        return await self._send(_batch_call(self._core, checks))

    async def _send(self, call: _Call[_T]) -> _T:
        try:
            self._core.refuse_if_open()
            try:
                # httpx's timeout is per phase; the deadline makes `timeout` the whole
                # budget, which is what a request waiting on the limiter actually pays.
                with anyio.fail_after(self._core.timeout):
                    response = await self._http.post(call.path, json=call.body)
            except (httpx.TransportError, TimeoutError) as exc:
                raise self._core.transport_failure(exc) from exc
            except BaseException:
                self._core.breaker.release()
                raise
            return self._core.finish(response, call.parse)
        except LimiterUnavailable as error:
            return call.fallback(error)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRegionLimitClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
