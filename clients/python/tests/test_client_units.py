"""Unit tests of the client, the breaker and the middleware's pure logic (no node process).

httpx.MockTransport stands in for the node at the I/O seam; everything above it is real.
They need only the client's own dependencies (the app under the middleware is a few lines
of plain ASGI), so they also run where the server is not installed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from regionlimit_client.client import (
    AsyncRegionLimitClient,
    CheckError,
    CheckRequest,
    CheckResult,
    CircuitBreaker,
    CircuitOpen,
    LimiterUnavailable,
    RegionLimitClient,
    RequestRejected,
)
from regionlimit_client.middleware import (
    LIMITER_ERRORS,
    RateLimitMiddleware,
    client_address,
    ip_identifier,
    normalize_identifier,
    parse_address,
    rate_limit_headers,
    retry_after_seconds,
)

try:  # optional: the middleware counts its metric only where prometheus-client is installed
    from prometheus_client import REGISTRY
except ImportError:
    REGISTRY = None

URL = "http://limiter.test"
ALLOWED = {
    "allowed": True,
    "limit": 10,
    "remaining": 7,
    "reset_at": 1_795_400_000_000,
    "retry_after_ms": None,
    "mode": "fast",
    "source": "local",
}
DENIED = {**ALLOWED, "allowed": False, "remaining": 0, "retry_after_ms": 1500}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A MockTransport handler that records request bodies and answers from a script."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        self.headers.append(request.headers)
        return self.answer(request)


def answer_json(body: object, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


def fail_with(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def sync_client(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> RegionLimitClient:
    return RegionLimitClient(URL, transport=httpx.MockTransport(handler), **kwargs)


# ------------------------------------------------------------------------ client


def test_check_request_sends_only_the_fields_given() -> None:
    assert CheckRequest("api", "k").to_json() == {"namespace": "api", "identifier": "k", "cost": 1}
    inline = CheckRequest("api", "k", cost=2, limit=5, duration="1m", mode="consistent")
    assert inline.to_json() == {
        "namespace": "api",
        "identifier": "k",
        "cost": 2,
        "limit": 5,
        "duration": "1m",
        "mode": "consistent",
    }


def test_check_parses_the_answer_and_sends_the_token() -> None:
    recorder = Recorder(answer_json(ALLOWED))
    with sync_client(recorder, token="node-token") as client:
        result = client.check("api", "sk_1", cost=3, limit=10, duration="1m")
    assert result == CheckResult(True, 10, 7, 1_795_400_000_000, None, "fast", "local")
    assert recorder.bodies == [
        {"namespace": "api", "identifier": "sk_1", "cost": 3, "limit": 10, "duration": "1m"}
    ]
    assert recorder.headers[0]["authorization"] == "Bearer node-token"


def test_check_reads_shadowed_when_the_node_sends_it() -> None:
    shadowed = {**ALLOWED, "remaining": 0, "shadowed": True}
    with sync_client(Recorder(answer_json(shadowed))) as client:
        assert client.check("api", "k").shadowed is True
    with sync_client(Recorder(answer_json({**ALLOWED, "shadowed": False}))) as client:
        assert client.check("api", "k").shadowed is False
    with sync_client(Recorder(answer_json(ALLOWED))) as client:  # an older node: no field
        assert client.check("api", "k").shadowed is False


def test_a_4xx_raises_request_rejected_with_fields_whatever_on_error() -> None:
    body = {"error": {"code": "invalid_field", "field": "cost", "message": "cost must be 0..10"}}
    client = sync_client(answer_json(body, 422), on_error="open")
    with pytest.raises(RequestRejected) as caught:
        client.check("api", "k", cost=99)
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        422,
        "invalid_field",
        "cost",
    )
    assert caught.value.message == "cost must be 0..10"
    # The node answered, so it is up: a 4xx never opens the circuit.
    assert client.breaker.state == "closed"


def test_a_4xx_without_the_error_shape_still_has_fields() -> None:
    client = sync_client(lambda request: httpx.Response(404, text="<html>not here</html>"))
    with pytest.raises(RequestRejected) as caught:
        client.check("api", "k")
    assert (caught.value.status, caught.value.code, caught.value.field) == (404, "http_404", None)


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (answer_json({"error": "boom"}, 503), "HTTP 503"),
        (fail_with(httpx.ReadTimeout("timed out")), "timeout after 0.25s"),
        (fail_with(httpx.ConnectError("refused")), "ConnectError: refused"),
        (answer_json({"allowed": "yes"}), "malformed response"),
        (answer_json({**ALLOWED, "limit": True}), "malformed response"),
    ],
)
def test_no_usable_answer_raises_limiter_unavailable(
    handler: Callable[[httpx.Request], httpx.Response], reason: str
) -> None:
    client = sync_client(handler)
    with pytest.raises(LimiterUnavailable) as caught:
        client.check("api", "k")
    assert caught.value.url == URL
    assert caught.value.reason.startswith(reason)


def test_on_error_synthesizes_a_result_with_source_error() -> None:
    refused = fail_with(httpx.ConnectError("refused"))
    opened = sync_client(refused, on_error="open").check("api", "k", limit=10, duration="1m")
    assert opened == CheckResult(True, 10, 0, 0, None, "fast", "error")
    closed = sync_client(refused, on_error="closed").check("api", "k")
    assert closed == CheckResult(False, 0, 0, 0, None, "fast", "error")


def test_batch_keeps_order_and_per_slot_errors() -> None:
    slot_error = {"error": {"code": "invalid_field", "field": "cost", "message": "too big"}}
    recorder = Recorder(answer_json({"results": [ALLOWED, slot_error, DENIED]}))
    checks = [CheckRequest("api", "a"), CheckRequest("api", "b", cost=99), CheckRequest("api", "c")]
    results = sync_client(recorder).check_batch(checks)
    assert results[0] == CheckResult(True, 10, 7, 1_795_400_000_000, None, "fast", "local")
    assert results[1] == CheckError("invalid_field", "cost", "too big")
    assert isinstance(results[2], CheckResult) and results[2].retry_after_ms == 1500
    assert recorder.bodies[0] == {"checks": [c.to_json() for c in checks]}


def test_batch_with_the_wrong_number_of_results_is_malformed() -> None:
    client = sync_client(answer_json({"results": [ALLOWED]}))
    with pytest.raises(LimiterUnavailable, match="malformed"):
        client.check_batch([CheckRequest("api", "a"), CheckRequest("api", "b")])


def test_batch_on_error_answers_every_slot() -> None:
    client = sync_client(fail_with(httpx.ConnectError("refused")), on_error="closed")
    results = client.check_batch([CheckRequest("api", "a"), CheckRequest("api", "b")])
    assert [r.source for r in results if isinstance(r, CheckResult)] == ["error", "error"]


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="on_error"):
        RegionLimitClient(URL, on_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        RegionLimitClient(URL, timeout=0)


async def test_async_client_parses_and_rejects() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        batch = request.url.path == "/v1/check/batch"
        return httpx.Response(200, json={"results": [DENIED]} if batch else DENIED)

    async with AsyncRegionLimitClient(URL, transport=httpx.MockTransport(answer)) as client:
        result = await client.check("api", "k")
        batch = await client.check_batch([CheckRequest("api", "k")])
    assert not result.allowed and result.retry_after_ms == 1500
    assert batch == [result]


async def test_async_timeout_bounds_the_whole_call() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=ALLOWED)

    client = AsyncRegionLimitClient(URL, timeout=0.1, transport=httpx.MockTransport(slow))
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable, match="timeout"):
        await client.check("api", "k")
    assert time.monotonic() - started < 1.0
    assert client.breaker.state == "closed"  # one failure is below the threshold


async def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=ALLOWED)

    client = AsyncRegionLimitClient(
        URL, timeout=10, breaker=breaker, transport=httpx.MockTransport(hang)
    )
    probe = asyncio.create_task(client.check("api", "k"))
    await asyncio.sleep(0.05)
    assert breaker.state == "half_open" and not breaker.allow()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.allow()  # the next request may probe


# ----------------------------------------------------------------------- breaker


def test_breaker_opens_after_threshold_and_probes_after_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cool_down=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    states = [breaker.state]
    breaker.record_failure()
    states.append(breaker.state)
    assert not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.allow()  # the probe
    states.append(breaker.state)
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    states.append(breaker.state)
    assert states == ["closed", "open", "half_open", "closed"]
    assert breaker.allow()


def test_a_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_a_straggling_failure_does_not_extend_the_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.5
    breaker.record_failure()  # a call that started before the circuit opened
    clock.now += 0.5
    assert breaker.allow()


def test_open_circuit_answers_without_a_request() -> None:
    clock = FakeClock()
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused")

    breaker = CircuitBreaker(failure_threshold=2, cool_down=5.0, clock=clock)
    client = sync_client(refuse, breaker=breaker)
    for _ in range(2):
        with pytest.raises(LimiterUnavailable):
            client.check("api", "k")
    with pytest.raises(CircuitOpen) as caught:
        client.check("api", "k")
    assert caught.value.retry_in == pytest.approx(5.0)
    assert len(calls) == 2
    denied = sync_client(refuse, breaker=breaker, on_error="closed").check("api", "k")
    assert denied.source == "error" and not denied.allowed
    assert len(calls) == 2


# -------------------------------------------------------------- client addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1:8080 ", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ('"[2001:db8::1]:443"', "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:192.0.2.9", "192.0.2.9"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("[2001:db8::1", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed else None) == expected


TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48")]


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert client_address(addr("203.0.113.7"), ["198.51.100.1"], TRUSTED) == addr("203.0.113.7")
    assert client_address(addr("10.0.0.1"), ["198.51.100.1"], []) == addr("10.0.0.1")


def test_behind_trusted_proxies_the_right_most_untrusted_address_is_the_client() -> None:
    # The client prepended a spoofed 6.6.6.6; the proxies appended what they saw.
    forwarded = ["6.6.6.6", "198.51.100.1", "10.1.1.1", "2001:db8:ffff::5"]
    assert client_address(addr("10.0.0.1"), forwarded, TRUSTED) == addr("198.51.100.1")


def test_an_unparseable_entry_stops_at_the_proxy_that_wrote_it() -> None:
    assert client_address(
        addr("10.0.0.1"), ["198.51.100.1", "garbage", "10.2.2.2"], TRUSTED
    ) == addr("10.2.2.2")


def test_when_every_hop_is_trusted_the_left_most_is_the_origin() -> None:
    assert client_address(addr("10.0.0.1"), ["10.9.9.9", "10.1.1.1"], TRUSTED) == addr("10.9.9.9")
    assert client_address(addr("10.0.0.1"), [], TRUSTED) == addr("10.0.0.1")


def test_ip_identifier() -> None:
    assert ip_identifier(addr("192.0.2.1"), ipv6_prefix=64) == "192.0.2.1"
    assert ip_identifier(addr("2001:db8:1:2:3:4:5:6"), ipv6_prefix=64) == "2001:db8:1:2::/64"
    assert ip_identifier(addr("2001:db8:1:2:3:4:5:6"), ipv6_prefix=56) == "2001:db8:1::/56"


ipv6_ints = st.integers(min_value=0, max_value=2**128 - 1)


@given(ipv6_ints, ipv6_ints)
def test_ipv6_addresses_share_an_identifier_exactly_when_they_share_a_64(a: int, b: int) -> None:
    first = ipaddress.IPv6Address(a)
    second = ipaddress.IPv6Address(b)
    same = (a >> 64) == (b >> 64)
    assert (ip_identifier(first, ipv6_prefix=64) == ip_identifier(second, ipv6_prefix=64)) == same


@given(ipv6_ints)
def test_an_address_and_its_64_neighbour_share(a: int) -> None:
    neighbour = ipaddress.IPv6Address(a ^ 0xFFFF_FFFF_FFFF_FFFF)  # flip every host bit
    assert ip_identifier(ipaddress.IPv6Address(a), ipv6_prefix=64) == ip_identifier(
        neighbour, ipv6_prefix=64
    )


def test_normalize_identifier() -> None:
    assert normalize_identifier("  sk_1 ") == "sk_1"
    assert normalize_identifier("   ") is None
    long_key = "k" * 300
    digest = normalize_identifier(long_key)
    assert digest is not None and digest.startswith("sha256:") and len(digest) <= 256
    assert normalize_identifier(long_key) == digest  # one bucket per value
    assert normalize_identifier("é" * 128) == "é" * 128  # 256 bytes: still fits


# ------------------------------------------------------------------------ headers


def test_rate_limit_headers_round_up_and_add_retry_after_when_denied() -> None:
    allowed = CheckResult(
        True, 10, 7, reset_at=10_001, retry_after_ms=None, mode="fast", source="local"
    )
    assert rate_limit_headers(allowed, now_ms=0) == [
        (b"ratelimit-limit", b"10"),
        (b"ratelimit-remaining", b"7"),
        (b"ratelimit-reset", b"11"),
    ]
    denied = CheckResult(
        False, 10, 0, reset_at=5_000, retry_after_ms=1001, mode="fast", source="local"
    )
    assert rate_limit_headers(denied, now_ms=6_000)[2:] == [
        (b"ratelimit-reset", b"0"),
        (b"retry-after", b"2"),
    ]


def test_rate_limit_headers_add_the_ietf_fields_when_given_a_policy_name() -> None:
    # draft-ietf-httpapi-ratelimit-headers-10: RateLimit-Policy "name";q=... and
    # RateLimit "name";r=...;t=..., after the RateLimit-Limit/-Remaining/-Reset triple.
    result = CheckResult(
        True, 10, 7, reset_at=5_500, retry_after_ms=None, mode="fast", source="local"
    )
    plain = rate_limit_headers(result, now_ms=0)
    assert [name for name, _ in plain] == [
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
    ]
    named = rate_limit_headers(result, now_ms=0, policy_name="api")
    assert named[:3] == plain
    assert named[3:] == [(b"ratelimit-policy", b'"api";q=10'), (b"ratelimit", b'"api";r=7;t=6')]
    denied = CheckResult(
        False, 10, 0, reset_at=5_000, retry_after_ms=1001, mode="fast", source="local"
    )
    assert rate_limit_headers(denied, now_ms=0, policy_name="api")[3:] == [
        (b"ratelimit-policy", b'"api";q=10'),
        (b"ratelimit", b'"api";r=0;t=5'),
        (b"retry-after", b"2"),
    ]


@pytest.mark.parametrize(("ms", "seconds"), [(1, 1), (999, 1), (1000, 1), (1001, 2), (None, 1)])
def test_retry_after_seconds(ms: int | None, seconds: int) -> None:
    assert retry_after_seconds(ms) == seconds


# ---------------------------------------------------- middleware against a mock


Route = Callable[[], tuple[object, dict[str, str]]]


class App:
    """A plain ASGI app with GET routes answering JSON, wrapped by `entry` (the middleware)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.entry: Any = self.dispatch

    def get(self, path: str) -> Callable[[Route], Route]:
        def register(route: Route) -> Route:
            self.routes[path] = route
            return route

        return register

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.entry(scope, receive, send)

    async def dispatch(self, scope: Any, receive: Any, send: Any) -> None:
        route = self.routes.get(scope["path"])
        body, headers = route() if route else ({"detail": "Not Found"}, {})
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if route else 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def make_app(handler: Callable[[httpx.Request], Any], **options: Any) -> App:
    app = App()
    options = {"url": URL, "namespace": "unit", **options}
    app.entry = RateLimitMiddleware(app.dispatch, transport=httpx.MockTransport(handler), **options)

    @app.get("/hello")
    def hello() -> tuple[object, dict[str, str]]:
        return {"hello": "world"}, {}

    @app.get("/healthz")
    def healthz() -> tuple[object, dict[str, str]]:
        return {"status": "ok"}, {}

    return app


def app_client(app: App, peer: str = "192.0.2.10") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://app.test")


async def test_allowed_requests_get_rate_limit_headers() -> None:
    recorder = Recorder(answer_json({**ALLOWED, "reset_at": int(time.time() * 1000) + 30_000}))
    async with app_client(make_app(recorder, identifier_header="x-api-key")) as http:
        response = await http.get("/hello", headers={"x-api-key": "sk_1"})
    assert response.status_code == 200 and response.json() == {"hello": "world"}
    assert response.headers["ratelimit-limit"] == "10"
    assert response.headers["ratelimit-remaining"] == "7"
    assert 29 <= int(response.headers["ratelimit-reset"]) <= 30
    assert "retry-after" not in response.headers
    assert recorder.bodies == [{"namespace": "unit", "identifier": "sk_1", "cost": 1}]


async def test_the_middleware_sends_the_ietf_fields_named_by_the_namespace() -> None:
    recorder = Recorder(answer_json({**ALLOWED, "reset_at": int(time.time() * 1000) + 30_000}))
    async with app_client(make_app(recorder, identifier_header="x-api-key")) as http:
        allowed = await http.get("/hello", headers={"x-api-key": "sk_1"})
        # No key: the anonymous namespace decides, and names the fields.
        recorder.answer = answer_json(DENIED)
        denied = await http.get("/hello")
    assert allowed.headers["ratelimit-policy"] == '"unit";q=10'
    assert allowed.headers["ratelimit"].startswith('"unit";r=7;t=')
    assert denied.status_code == 429
    assert denied.headers["ratelimit-policy"] == '"unit:ip";q=10'
    assert denied.headers["ratelimit"].startswith('"unit:ip";r=0;t=')


async def test_denied_requests_get_429_with_the_api_body() -> None:
    recorder = Recorder(answer_json(DENIED))
    async with app_client(make_app(recorder, limit=10, duration="1m")) as http:
        response = await http.get("/hello")
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.json()["error"]["retry_after_ms"] == 1500
    assert response.headers["retry-after"] == "2"
    assert response.headers["ratelimit-remaining"] == "0"
    assert recorder.bodies == [
        {
            "namespace": "unit:ip",
            "identifier": "192.0.2.10",
            "cost": 1,
            "limit": 10,
            "duration": "1m",
        }
    ]


async def test_identify_decides_alone_and_cost_is_sent() -> None:
    recorder = Recorder(answer_json(ALLOWED))

    async def principal(scope: Any) -> str | None:
        return "user-42" if dict(scope["headers"]).get(b"authorization") == b"Bearer good" else None

    app = make_app(
        recorder, identify=principal, identifier_header="x-api-key", cost=lambda scope: 3
    )
    async with app_client(app) as http:
        await http.get("/hello", headers={"authorization": "Bearer good", "x-api-key": "k"})
        # Unauthenticated: the forged x-api-key must not pick the bucket.
        await http.get("/hello", headers={"authorization": "Bearer bad", "x-api-key": "forged"})
    assert [(b["namespace"], b["identifier"], b["cost"]) for b in recorder.bodies] == [
        ("unit", "user-42", 3),
        ("unit:ip", "192.0.2.10", 3),
    ]


async def test_excluded_paths_skip_the_limiter() -> None:
    recorder = Recorder(answer_json(DENIED))
    async with app_client(make_app(recorder, exclude_paths=["/healthz"])) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/hello")).status_code == 429
    assert len(recorder.bodies) == 1


async def test_the_app_own_rate_limit_headers_win() -> None:
    app = make_app(answer_json(ALLOWED))

    @app.get("/inner")
    def inner() -> tuple[object, dict[str, str]]:
        return {}, {"RateLimit-Limit": "3"}

    async with app_client(app) as http:
        response = await http.get("/inner")
    assert response.headers.get_list("ratelimit-limit") == ["3"]
    assert response.headers["ratelimit-remaining"] == "7"


def metric(namespace: str, action: str) -> float:
    if REGISTRY is None:
        return 0.0
    value = REGISTRY.get_sample_value(
        "regionlimit_middleware_limiter_errors_total", {"namespace": namespace, "action": action}
    )
    return value or 0.0


@pytest.mark.parametrize(("on_error", "status"), [("open", 200), ("closed", 503)])
async def test_limiter_errors_apply_the_policy_log_a_hash_and_count(
    on_error: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"unit-{on_error}"
    before = metric(namespace, on_error)
    app = make_app(
        fail_with(httpx.ConnectError("refused")),
        namespace=namespace,
        identifier_header="x-api-key",
        on_error=on_error,
        hash_identifier=lambda identifier: f"H({len(identifier)})",
    )
    with caplog.at_level(logging.WARNING, logger="regionlimit_client.middleware"):
        async with app_client(app) as http:
            response = await http.get("/hello", headers={"x-api-key": "sk_live_secret"})
    assert response.status_code == status
    if status == 503:
        assert response.json()["error"]["code"] == "limiter_unavailable"
        assert int(response.headers["retry-after"]) >= 1
    if REGISTRY is not None:
        assert metric(namespace, on_error) == before + 1
    else:  # client-only install: no prometheus-client, so no metric to count
        assert LIMITER_ERRORS is None
    lines = [r.getMessage() for r in caplog.records if r.name == "regionlimit_client.middleware"]
    assert len(lines) == 1 and "identifier_hash=H(14)" in lines[0]
    assert "sk_live_secret" not in caplog.text


async def test_default_log_hash_is_keyed_and_hides_the_identifier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(fail_with(httpx.ConnectError("refused")), identifier_header="x-api-key")
    with caplog.at_level(logging.WARNING, logger="regionlimit_client.middleware"):
        async with app_client(app) as http:
            await http.get("/hello", headers={"x-api-key": "sk_live_secret"})
    assert "identifier_hash=" in caplog.text
    assert "sk_live_secret" not in caplog.text


async def test_a_rejected_check_is_an_error_log_and_follows_on_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = {"error": {"code": "invalid_field", "field": "cost", "message": "cost must be 0..10"}}
    app = make_app(answer_json(body, 422), on_error="closed", cost=lambda scope: 99)
    with caplog.at_level(logging.WARNING, logger="regionlimit_client.middleware"):
        async with app_client(app) as http:
            assert (await http.get("/hello")).status_code == 503
    assert [r.levelno for r in caplog.records if r.name == "regionlimit_client.middleware"] == [
        logging.ERROR
    ]


def test_middleware_options_are_validated() -> None:
    app = App()
    with pytest.raises(ValueError, match="both limit and duration"):
        RateLimitMiddleware(app, url=URL, namespace="api", limit=10)
    with pytest.raises(ValueError, match="namespace"):
        RateLimitMiddleware(app, url=URL, namespace="bad name")
    with pytest.raises(ValueError, match="ipv6_prefix"):
        RateLimitMiddleware(app, url=URL, namespace="api", ipv6_prefix=129)
    with pytest.raises(ValueError):
        RateLimitMiddleware(app, url=URL, namespace="api", trusted_proxies=["10.0.0.1/8"])
