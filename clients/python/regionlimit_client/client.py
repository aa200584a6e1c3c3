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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import httpx

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
BreakerState = Literal["closed", "open", "half_open"]

_T = TypeVar("_T")

# Idle pooled connections are dropped before uvicorn's default 5 s keep-alive closes them
# from the node's side: reusing a connection the server is closing at that very moment
# fails with "server disconnected without sending a response".
_KEEPALIVE_EXPIRY = 2.0


# --------------------------------------------------------------------------- errors


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


@dataclass(frozen=True, slots=True)
class CheckError:
    """A batch slot the node refused on its own (bad field, unknown namespace)."""

    code: str
    field: str | None
    message: str


# ------------------------------------------------------------------ circuit breaker


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (cool-down) -> half-open (one probe).

    Thread-safe; the lock is never held across I/O, so it is equally cheap in async code.
    `clock` is injectable so tests step through cool-downs without sleeping.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cool_down: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "rate limiter",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cool_down < 0:
            raise ValueError("cool_down must be >= 0")
        self.failure_threshold = failure_threshold
        self.cool_down = cool_down
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go to the limiter now? In half-open, True for the one probe only."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if self._clock() - self._opened_at < self.cool_down:
                    return False
                self._state = "half_open"
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        logger.info("circuit to %s half-open: probing", self.name)
        return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 unless open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_at + self.cool_down - self._clock())

    def record_success(self) -> None:
        with self._lock:
            was = self._state
            self._state = "closed"
            self._failures = 0
            self._probe_in_flight = False
        if was != "closed":
            logger.warning("circuit to %s closed: the limiter answers again", self.name)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "open":
                # A call that started before the circuit opened: the cool-down stands.
                return
            if self._state == "closed" and self._failures < self.failure_threshold:
                return
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_in_flight = False
            failures = self._failures
        logger.warning(
            "circuit to %s open for %.1fs after %d consecutive failures",
            self.name,
            self.cool_down,
            failures,
        )

    def release(self) -> None:
        """A call ended with neither answer nor failure (cancelled): free the probe slot."""
        with self._lock:
            self._probe_in_flight = False


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


def _http_options(timeout: float) -> dict[str, Any]:
    return {
        "timeout": httpx.Timeout(timeout),
        "limits": httpx.Limits(keepalive_expiry=_KEEPALIVE_EXPIRY),
    }


# ------------------------------------------------------------------------- clients


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
            namespace=namespace,
            identifier=identifier,
            cost=cost,
            limit=limit,
            duration=duration,
            algorithm=algorithm,
            burst=burst,
            mode=mode,
        )
        try:
            return self._post("/v1/check", request.to_json(), _parse_result)
        except LimiterUnavailable as error:
            return self._core.fallback(request, error)

    def check_batch(self, checks: Sequence[CheckRequest]) -> list[CheckResult | CheckError]:
        """Decide 1..1000 checks in one request; each slot is a result or its own error."""
        body = {"checks": [check.to_json() for check in checks]}
        try:
            return self._post("/v1/check/batch", body, _batch_parser(len(checks)))
        except LimiterUnavailable as error:
            return [self._core.fallback(check, error) for check in checks]

    def _post(self, path: str, body: dict[str, Any], parse: Callable[[Any], _T]) -> _T:
        self._core.refuse_if_open()
        try:
            response = self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise self._core.transport_failure(exc) from exc
        except BaseException:
            self._core.breaker.release()
            raise
        return self._core.finish(response, parse)

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
            namespace=namespace,
            identifier=identifier,
            cost=cost,
            limit=limit,
            duration=duration,
            algorithm=algorithm,
            burst=burst,
            mode=mode,
        )
        try:
            return await self._post("/v1/check", request.to_json(), _parse_result)
        except LimiterUnavailable as error:
            return self._core.fallback(request, error)

    async def check_batch(self, checks: Sequence[CheckRequest]) -> list[CheckResult | CheckError]:
        """Decide 1..1000 checks in one request; each slot is a result or its own error."""
        body = {"checks": [check.to_json() for check in checks]}
        try:
            return await self._post("/v1/check/batch", body, _batch_parser(len(checks)))
        except LimiterUnavailable as error:
            return [self._core.fallback(check, error) for check in checks]

    async def _post(self, path: str, body: dict[str, Any], parse: Callable[[Any], _T]) -> _T:
        self._core.refuse_if_open()
        try:
            # httpx's timeout is per phase; the deadline makes `timeout` the whole budget,
            # which is what a request waiting on the limiter actually pays.
            with anyio.fail_after(self._core.timeout):
                response = await self._http.post(path, json=body)
        except (httpx.TransportError, TimeoutError) as exc:
            raise self._core.transport_failure(exc) from exc
        except BaseException:
            self._core.breaker.release()
            raise
        return self._core.finish(response, parse)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRegionLimitClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
