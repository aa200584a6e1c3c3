"""RateLimitMiddleware in a FastAPI app against a real region node process.

The app runs in-process (httpx.ASGITransport, which also lets a test choose the socket peer
address); the limiter is a real node over HTTP, or a stopped or blackholed one.
"""

from __future__ import annotations

import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from regionlimit_client.middleware import RateLimitMiddleware
from tests.support.processes import ManagedProcess, base_env, free_port, region_node

LIMIT = 3


def start_node(directory: Path) -> ManagedProcess:
    # A private spill file: nothing from another run leaks into this node's counters.
    env = {"REGIONLIMIT_SPILL_PATH": str(directory / "spill.msgpack")}
    return region_node(extra_env=env).start(ready_path="/readyz")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    process = start_node(tmp_path_factory.mktemp("node"))
    yield process
    process.stop()


def make_app(url: str, **options: Any) -> FastAPI:
    app = FastAPI()
    # A namespace per app keeps tests apart on the shared node, and across reruns.
    options = {
        "namespace": f"mw-{uuid.uuid4().hex[:12]}",
        "limit": LIMIT,
        "duration": "1h",
        **options,
    }
    app.add_middleware(RateLimitMiddleware, url=url, **options)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


@asynccontextmanager
async def client_for(app: FastAPI, peer: str = "192.0.2.10") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as http:
        yield http
    # ASGITransport runs no lifespan, so the middleware's pool is closed here instead.
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, RateLimitMiddleware):
        layer = getattr(layer, "app", None)
    if layer is not None:
        await layer.aclose()


async def statuses(app: FastAPI, count: int, *, peer: str = "192.0.2.10", **kw: Any) -> list[int]:
    async with client_for(app, peer) as http:
        return [(await http.get("/hello", **kw)).status_code for _ in range(count)]


def metric(namespace: str, action: str) -> float:
    value = REGISTRY.get_sample_value(
        "regionlimit_middleware_limiter_errors_total", {"namespace": namespace, "action": action}
    )
    return value or 0.0


# ------------------------------------------------------------------- limiting


async def test_n_requests_pass_then_429_and_another_key_is_unaffected(node: ManagedProcess) -> None:
    app = make_app(node.url, identifier_header="x-api-key")
    async with client_for(app) as http:
        first = [await http.get("/hello", headers={"x-api-key": "sk_a"}) for _ in range(LIMIT)]
        denied = await http.get("/hello", headers={"x-api-key": "sk_a"})
        other = await http.get("/hello", headers={"x-api-key": "sk_b"})

    assert [r.status_code for r in first] == [200] * LIMIT
    assert [r.headers["ratelimit-remaining"] for r in first] == ["2", "1", "0"]
    assert all(r.headers["ratelimit-limit"] == str(LIMIT) for r in first)
    assert all(int(r.headers["ratelimit-reset"]) > 0 for r in first)

    assert denied.status_code == 429
    # Sliding window: the wait may exceed one duration, never two.
    assert 1 <= int(denied.headers["retry-after"]) <= 7200
    body = denied.json()
    assert body["error"]["code"] == "rate_limited"
    assert 0 < body["error"]["retry_after_ms"] <= 7_200_000
    assert int(denied.headers["retry-after"]) * 1000 >= body["error"]["retry_after_ms"]
    assert denied.headers["ratelimit-remaining"] == "0"

    assert other.status_code == 200
    assert other.headers["ratelimit-remaining"] == "2"


async def test_identify_limits_the_principal(node: ManagedProcess) -> None:
    keys = {"sk_live_1": "customer-1", "sk_live_2": "customer-1"}

    def principal(scope: Any) -> str | None:
        value = dict(scope["headers"]).get(b"x-api-key", b"").decode()
        return keys.get(value)

    app = make_app(node.url, identify=principal)
    # Two keys of one customer share its limit; forged keys fall back to the client IP.
    assert await statuses(app, 2, headers={"x-api-key": "sk_live_1"}) == [200, 200]
    assert await statuses(app, 2, headers={"x-api-key": "sk_live_2"}) == [200, 429]
    forged = [
        (await statuses(app, 1, headers={"x-api-key": f"forged-{i}"}))[0] for i in range(LIMIT + 1)
    ]
    assert forged == [200] * LIMIT + [429]


async def test_anonymous_traffic_is_limited_per_ip(node: ManagedProcess) -> None:
    app = make_app(node.url, identifier_header="x-api-key")
    assert await statuses(app, LIMIT + 1, peer="198.51.100.1") == [200] * LIMIT + [429]
    assert await statuses(app, 1, peer="198.51.100.2") == [200]


# ------------------------------------------------------------- client address


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    node: ManagedProcess,
) -> None:
    app = make_app(node.url, trusted_proxies=["10.0.0.0/8"])
    results = [
        (
            await statuses(
                app, 1, peer="203.0.113.7", headers={"x-forwarded-for": f"198.51.100.{i}"}
            )
        )[0]
        for i in range(LIMIT + 1)
    ]
    # Every request claimed another client; all of them are the one peer.
    assert results == [200] * LIMIT + [429]


async def test_a_trusted_proxy_forwards_the_client_address(node: ManagedProcess) -> None:
    app = make_app(node.url, trusted_proxies=["10.0.0.0/8"])
    proxy = "10.0.0.5"
    # Clients behind the proxy get a limit each, not one for the proxy.
    for client in ("198.51.100.1", "198.51.100.2"):
        headers = {"x-forwarded-for": client}
        assert await statuses(app, LIMIT, peer=proxy, headers=headers) == [200] * LIMIT
    # What the client itself prepends is not trusted: the right-most untrusted hop counts.
    spoofed = {"x-forwarded-for": "6.6.6.6, 198.51.100.1, 10.0.0.9"}
    assert await statuses(app, 1, peer=proxy, headers=spoofed) == [429]


async def test_rfc7239_forwarded_header(node: ManagedProcess) -> None:
    app = make_app(node.url, trusted_proxies=["10.0.0.0/8"], forwarded_header="forwarded")
    headers = {"forwarded": 'for="[2001:db8:aa::1]:443";proto=https'}
    assert await statuses(app, LIMIT + 1, peer="10.0.0.5", headers=headers) == [200] * LIMIT + [429]
    other = {"forwarded": "for=198.51.100.77"}
    assert await statuses(app, 1, peer="10.0.0.5", headers=other) == [200]


async def test_ipv6_addresses_in_one_64_share_a_limit(node: ManagedProcess) -> None:
    app = make_app(node.url)
    same_64 = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2:abcd:1:2:3"]
    assert [(await statuses(app, 1, peer=peer))[0] for peer in same_64] == [200] * LIMIT
    assert await statuses(app, 1, peer="2001:db8:1:2::42") == [429]
    assert await statuses(app, 1, peer="2001:db8:1:3::1") == [200]  # the next /64


# ----------------------------------------------------------- limiter failures


@pytest.mark.parametrize(("on_error", "status"), [("open", 200), ("closed", 503)])
async def test_a_stopped_limiter_applies_on_error_within_the_timeout(
    tmp_path: Path, on_error: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    process = start_node(tmp_path)
    timeout = 0.5
    namespace = f"mw-stop-{uuid.uuid4().hex[:12]}"
    app = make_app(
        process.url,
        namespace=namespace,
        identifier_header="x-api-key",
        timeout=timeout,
        on_error=on_error,
    )
    before = metric(namespace, on_error)
    async with client_for(app) as http:
        # A warm pooled connection first, so the stop also tests a dead keep-alive socket.
        assert (await http.get("/hello", headers={"x-api-key": "sk_stop"})).status_code == 200
        process.stop()
        started = time.monotonic()
        response = await http.get("/hello", headers={"x-api-key": "sk_stop"})
        elapsed = time.monotonic() - started

    assert response.status_code == status
    assert elapsed < timeout + 1.0
    if on_error == "closed":
        assert response.json()["error"]["code"] == "limiter_unavailable"
        assert "retry-after" in response.headers
    else:
        assert response.json() == {"hello": "world"}
        assert "ratelimit-limit" not in response.headers  # no limiter numbers to report
    assert metric(namespace, on_error) == before + 1
    assert "identifier_hash=" in caplog.text and "sk_stop" not in caplog.text


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A limiter URL whose port accepts connections (kernel backlog) but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize(("on_error", "status"), [("open", 200), ("closed", 503)])
async def test_with_the_circuit_open_requests_no_longer_wait_the_timeout(
    blackhole: str, on_error: str, status: int
) -> None:
    timeout = 1.0
    app = make_app(
        blackhole,
        identifier_header="x-api-key",
        timeout=timeout,
        on_error=on_error,
        failure_threshold=2,
        cool_down=30.0,
    )
    async with client_for(app) as http:
        for _ in range(2):
            started = time.monotonic()
            response = await http.get("/hello", headers={"x-api-key": "sk_hole"})
            elapsed = time.monotonic() - started
            assert response.status_code == status
            # Each of these paid the timeout (the blackhole works), and no more.
            assert timeout * 0.9 <= elapsed < timeout + 1.0
        started = time.monotonic()
        for _ in range(5):
            assert (
                await http.get("/hello", headers={"x-api-key": "sk_hole"})
            ).status_code == status
        per_request = (time.monotonic() - started) / 5
    assert per_request < 0.5 * timeout


async def test_without_a_limiter_at_all_connections_are_refused_at_once() -> None:
    app = make_app(f"http://127.0.0.1:{free_port()}", timeout=0.25, on_error="closed")
    started = time.monotonic()
    assert await statuses(app, 1) == [503]
    assert time.monotonic() - started < 0.25 + 1.0


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # pools of event loops already gone
def test_starlette_testclient_which_runs_each_request_in_a_new_event_loop(
    node: ManagedProcess,
) -> None:
    from fastapi.testclient import TestClient

    app = make_app(node.url, identifier_header="x-api-key")
    key = {"x-api-key": "sk_tc"}
    plain = TestClient(app)  # no lifespan; every request on a fresh event loop
    assert [plain.get("/hello", headers=key).status_code for _ in range(LIMIT)] == [200] * LIMIT
    with TestClient(app) as managed:  # lifespan: the shutdown closes this loop's pool
        assert managed.get("/hello", headers=key).status_code == 429
    with TestClient(app) as managed:
        assert managed.get("/hello", headers={"x-api-key": "sk_tc2"}).status_code == 200


# ------------------------------------------------------------------ example app


def test_the_example_app_under_uvicorn(node: ManagedProcess) -> None:
    """examples/fastapi_app.py served by uvicorn, against the node, as the README runs it."""
    port = free_port()
    env = base_env(REGIONLIMIT_URL=node.url)
    args = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)]
    app = ManagedProcess(args, env=env, url=f"http://127.0.0.1:{port}").start(ready_path="/healthz")
    try:
        with httpx.Client(base_url=app.url) as http:
            key = {"x-api-key": "sk_demo_alice"}
            codes = [http.get("/hello", headers=key).status_code for _ in range(101)]
            assert codes == [200] * 100 + [429]
            assert http.get("/hello", headers={"x-api-key": "sk_demo_bob"}).status_code == 200
            assert http.get("/healthz").status_code == 200  # excluded
    finally:
        app.stop()
    # The middleware closes its pool on lifespan shutdown without disturbing it.
    assert "Application shutdown complete" in app.log()
