"""The region node's HTTP contract (API.md "Region node"), in process: build_app over a
RegionNode with an injectable clock, driven by httpx through ASGITransport (no lifespan:
the checks need none)."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from sync.identifiers import IdentifierHasher

SECRET = "s"
HASHER = IdentifierHasher(SECRET)
MINUTE = 60_000
HOUR = 60 * MINUTE
T0 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000  # midnight UTC
VIP = "sk_live_vip"
CONFIG = f"""
[namespaces.api]
limit = 3
duration = "1h"
algorithm = "fixed_window"

[[namespaces.api.overrides]]
identifier_hash = "{HASHER.hash(VIP)}"
limit = 5

[namespaces.bucket]
limit = 10
duration = "10s"
algorithm = "token_bucket"
burst = 4
"""
RESULT_FIELDS = {"allowed", "limit", "remaining", "reset_at", "retry_after_ms", "mode",
                 "source", "shadowed"}
INLINE = {"limit": 5, "duration": "1m", "algorithm": "fixed_window"}


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture(autouse=True)
def _no_regionlimit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 1_500)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(CONFIG)
    return path


@asynccontextmanager
async def node_client(clock: Clock, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    node = RegionNode(NodeSettings(region="t", **settings), secret=SECRET, clock=clock)
    transport = httpx.ASGITransport(build_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        yield client


@pytest.fixture
async def client(clock: Clock, config: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with node_client(clock, config=config) as c:
        yield c


async def check(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("namespace", "adhoc")
    body.setdefault("identifier", "sk_live_abc123")
    return await client.post("/v1/check", json=body)


def assert_error(response: httpx.Response, status: int, code: str,
                 field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if field is None:
        assert set(error) == {"code", "message"}
    else:
        assert set(error) == {"code", "field", "message"} and error["field"] == field


def ceil_seconds(ms: int) -> int:
    return math.ceil(ms / 1000)


# --- the response --------------------------------------------------------------------


async def test_allowed_check_fields_and_headers(client: httpx.AsyncClient,
                                                clock: Clock) -> None:
    response = await check(client, **INLINE)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == RESULT_FIELDS
    assert body == {"allowed": True, "limit": 5, "remaining": 4, "reset_at": T0 + MINUTE,
                    "retry_after_ms": None, "mode": "fast", "source": "local",
                    "shadowed": False}
    headers = response.headers
    assert headers["content-type"] == "application/json"
    assert headers["ratelimit-limit"] == "5"
    assert headers["ratelimit-remaining"] == "4"
    assert headers["ratelimit-reset"] == "59"  # 58.5 s, rounded up
    assert "retry-after" not in headers


async def test_denied_check_fields_and_headers(client: httpx.AsyncClient,
                                               clock: Clock) -> None:
    for _ in range(5):
        assert (await check(client, **INLINE)).json()["allowed"]
    response = await check(client, **INLINE)
    assert response.status_code == 200
    assert response.json() == {"allowed": False, "limit": 5, "remaining": 0,
                               "reset_at": T0 + MINUTE, "retry_after_ms": MINUTE - 1_500,
                               "mode": "fast", "source": "local", "shadowed": False}
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-reset"] == "59"
    assert response.headers["retry-after"] == "59"


@pytest.mark.parametrize(("offset", "seconds"), [
    (MINUTE - 1, 1),        # 1 ms left: rounds up to 1, never 0
    (MINUTE - 999, 1),
    (MINUTE - 1_000, 1),    # exactly 1 s
    (MINUTE - 1_001, 2),
    (MINUTE - 2_000, 2),    # whole seconds stay whole
    (1, 60),                # 59.999 s
])
async def test_retry_after_and_reset_round_up_to_whole_seconds(
        client: httpx.AsyncClient, clock: Clock, offset: int, seconds: int) -> None:
    clock.now = T0 + offset
    for _ in range(5):
        await check(client, **INLINE)
    response = await check(client, **INLINE)
    body = response.json()
    assert not body["allowed"]
    assert body["retry_after_ms"] == MINUTE - offset
    assert response.headers["retry-after"] == str(seconds)
    assert response.headers["ratelimit-reset"] == str(seconds)
    assert int(response.headers["retry-after"]) >= 1


async def test_token_bucket_reset_is_when_the_bucket_is_full(client: httpx.AsyncClient,
                                                             clock: Clock) -> None:
    policy = {"limit": 10, "duration": "10s", "algorithm": "token_bucket"}
    response = await check(client, cost=5, **policy)  # 1 token per second
    body = response.json()
    assert (body["remaining"], body["reset_at"]) == (5, clock.now + 5_000)
    assert response.headers["ratelimit-reset"] == "5"
    clock.now += 2_500
    response = await check(client, cost=8, **policy)  # 7.5 tokens now
    body = response.json()
    assert not body["allowed"] and body["remaining"] == 7
    assert body["retry_after_ms"] == 500
    assert body["reset_at"] == clock.now + 2_500
    assert response.headers["retry-after"] == "1"


async def test_sliding_window_is_the_default_algorithm(client: httpx.AsyncClient,
                                                       clock: Clock) -> None:
    body = (await check(client, limit=2, duration="1m", cost=2)).json()
    # Sliding: the admitted cost still weighs until the end of the next window.
    assert body["reset_at"] == T0 + 2 * MINUTE
    clock.now = T0 + MINUTE + MINUTE // 2  # previous window weighs 2 * 0.5 = 1
    assert (await check(client, limit=2, duration="1m")).json()["allowed"]
    denied = (await check(client, limit=2, duration="1m")).json()
    assert not denied["allowed"]


async def test_an_inline_month_without_algorithm_is_a_fixed_calendar_month(
        client: httpx.AsyncClient) -> None:
    now = datetime.fromtimestamp((T0 + 1_500) / 1000, tz=UTC)
    first_of_next = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    response = await check(client, limit=5, duration="month", cost=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["allowed"] and body["remaining"] == 0
    # Fixed window: everything comes back at the start of the next calendar month (UTC).
    assert body["reset_at"] == int(first_of_next.timestamp() * 1000)
    assert body["retry_after_ms"] is None


async def test_cost_zero_consumes_nothing_and_answers_remaining(
        client: httpx.AsyncClient) -> None:
    probe = (await check(client, cost=0, **INLINE)).json()
    assert probe["allowed"] and probe["remaining"] == 5
    assert (await check(client, cost=5, **INLINE)).json()["remaining"] == 0
    probe = (await check(client, cost=0, **INLINE)).json()
    assert not probe["allowed"] and probe["remaining"] == 0 and probe["retry_after_ms"] > 0


async def test_identifiers_are_limited_independently(client: httpx.AsyncClient) -> None:
    assert (await check(client, cost=5, identifier="a", **INLINE)).json()["allowed"]
    assert (await check(client, cost=5, identifier="b", **INLINE)).json()["allowed"]
    assert not (await check(client, identifier="a", **INLINE)).json()["allowed"]


async def test_consistent_mode_is_reported(client: httpx.AsyncClient) -> None:
    body = (await check(client, mode="consistent", **INLINE)).json()
    assert body["mode"] == "consistent"


# --- configuration -------------------------------------------------------------------


async def test_configured_namespace_wins_over_inline_fields(client: httpx.AsyncClient,
                                                            clock: Clock) -> None:
    ignored = {"limit": 1000, "duration": "1s", "algorithm": "token_bucket"}
    results = [(await check(client, namespace="api", **ignored)).json() for _ in range(4)]
    assert [r["allowed"] for r in results] == [True, True, True, False]
    assert {r["limit"] for r in results} == {3}
    assert results[-1]["reset_at"] == T0 + HOUR  # the file's 1h fixed window
    # Even invalid inline fields are ignored for a configured namespace.
    response = await check(client, namespace="api", identifier="other", limit=-1,
                           duration="nonsense")
    assert response.status_code == 200 and response.json()["limit"] == 3


async def test_per_identifier_override_from_the_file(client: httpx.AsyncClient) -> None:
    results = [(await check(client, namespace="api", identifier=VIP)).json()
               for _ in range(6)]
    assert [r["allowed"] for r in results] == [True] * 5 + [False]
    assert {r["limit"] for r in results} == {5}
    assert (await check(client, namespace="api", identifier="not-vip")).json()["limit"] == 3


async def test_configured_token_bucket_bounds_cost_by_burst(client: httpx.AsyncClient
                                                            ) -> None:
    assert (await check(client, namespace="bucket", cost=4)).json()["allowed"]
    assert_error(await check(client, namespace="bucket", cost=5), 422, "invalid_field",
                 "cost")


async def test_unknown_namespace_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await check(client, namespace="nope"), 404, "unknown_namespace",
                 "namespace")


async def test_inline_namespaces_can_be_disabled(clock: Clock, config: Path) -> None:
    async with node_client(clock, config=config, inline_namespaces=False) as client:
        assert_error(await check(client, **INLINE), 422, "inline_disabled", "limit")
        assert (await check(client, namespace="api")).status_code == 200


async def test_inline_namespaces_are_capped(clock: Clock) -> None:
    async with node_client(clock, max_inline_namespaces=2) as client:
        assert (await check(client, namespace="one", **INLINE)).status_code == 200
        assert (await check(client, namespace="two", **INLINE)).status_code == 200
        assert_error(await check(client, namespace="three", **INLINE), 422,
                     "too_many_inline_namespaces", "namespace")
        assert (await check(client, namespace="one", limit=7, duration="1h")).json()[
            "limit"] == 7


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/check", "/v1/check/batch"])
@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"namespace": }', b'"\xff"',
                                  b'{"a": NaN}', b'"\\ud800"'])
async def test_malformed_json_is_400(client: httpx.AsyncClient, path: str, body: bytes
                                     ) -> None:
    response = await client.post(path, content=body,
                                 headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(("body", "field"), [
    ({"identifier": "x"}, "namespace"),
    ({"namespace": "adhoc"}, "identifier"),
    ({"namespace": 5, "identifier": "x"}, "namespace"),
    ({"namespace": "", "identifier": "x"}, "namespace"),
    ({"namespace": "a" * 65, "identifier": "x"}, "namespace"),
    ({"namespace": "a/b", "identifier": "x"}, "namespace"),
    ({"namespace": "api\n", "identifier": "x"}, "namespace"),
    ({"namespace": "adhoc", "identifier": 5}, "identifier"),
    ({"namespace": "adhoc", "identifier": ""}, "identifier"),
    ({"namespace": "adhoc", "identifier": None}, "identifier"),
    ({"namespace": "adhoc", "identifier": ["x"]}, "identifier"),
    ({"namespace": "adhoc", "identifier": "x", "cost": "1", **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": 1.0, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": True, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": None, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": -1, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": 6, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "cost": 2**64, **INLINE}, "cost"),
    ({"namespace": "adhoc", "identifier": "x", "limit": "5", "duration": "1m"}, "limit"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 0, "duration": "1m"}, "limit"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5.5, "duration": "1m"}, "limit"),
    ({"namespace": "adhoc", "identifier": "x", "duration": "1m"}, "limit"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "1y"}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "0s"}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5, "duration": 60}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "1m\n"}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "limit": 5, "duration": "month",
      "algorithm": "token_bucket"}, "duration"),
    ({"namespace": "adhoc", "identifier": "x", "algorithm": "leaky", **{
        k: v for k, v in INLINE.items() if k != "algorithm"}}, "algorithm"),
    ({"namespace": "adhoc", "identifier": "x", "burst": 3, **INLINE}, "burst"),
    ({"namespace": "adhoc", "identifier": "x", "mode": "eventual", **INLINE}, "mode"),
    ({"namespace": "adhoc", "identifier": "x", "on_unavailable": "x", **INLINE},
     "on_unavailable"),
    ({"namespace": "adhoc", "identifier": "x", "timeout": "2m", **INLINE}, "timeout"),
])
async def test_bad_fields_are_422_naming_the_field(client: httpx.AsyncClient,
                                                   body: dict[str, Any], field: str) -> None:
    assert_error(await client.post("/v1/check", json=body), 422, "invalid_field", field)


@pytest.mark.parametrize("body", [[], [{"namespace": "a"}], "check", 5, None, True])
async def test_a_check_that_is_not_an_object_is_422(client: httpx.AsyncClient,
                                                    body: Any) -> None:
    response = await client.post("/v1/check", content=orjson.dumps(body))
    assert_error(response, 422, "invalid_body")


@pytest.mark.parametrize(("identifier", "ok"), [
    ("a" * 256, True),
    ("a" * 257, False),
    ("é" * 128, True),              # 2 bytes each: 256
    ("é" * 128 + "a", False),       # 257
    ("€" * 85 + "a", True),         # 3 bytes each: 255 + 1
    ("€" * 85 + "é", False),        # 255 + 2
    ("😀" * 64, True),              # 4 bytes each: 256 (64 characters)
    ("😀" * 63 + "abcd", True),     # 252 + 4: 67 characters, 256 bytes
    ("😀" * 63 + "abcde", False),   # 257 bytes
    ("😀" * 65, False),             # 260
])
async def test_identifier_is_limited_to_256_bytes_of_utf8(
        client: httpx.AsyncClient, identifier: str, ok: bool) -> None:
    response = await check(client, identifier=identifier, **INLINE)
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, 422, "invalid_field", "identifier")


@pytest.mark.parametrize(("policy", "cost", "ok"), [
    ({"limit": 5, "duration": "1m"}, 5, True),
    ({"limit": 5, "duration": "1m"}, 6, False),
    ({"limit": 5, "duration": "1m", "algorithm": "token_bucket"}, 5, True),
    ({"limit": 5, "duration": "1m", "algorithm": "token_bucket"}, 6, False),
    ({"limit": 10, "duration": "1m", "algorithm": "token_bucket", "burst": 3}, 3, True),
    ({"limit": 10, "duration": "1m", "algorithm": "token_bucket", "burst": 3}, 4, False),
    ({"limit": 10, "duration": "1m", "algorithm": "token_bucket", "burst": 20}, 20, True),
    ({"limit": 10, "duration": "1m", "algorithm": "token_bucket", "burst": 20}, 21, False),
    ({"limit": 100, "duration": "month", "algorithm": "fixed_window"}, 100, True),
    ({"limit": 100, "duration": "month", "algorithm": "fixed_window"}, 101, False),
])
async def test_cost_is_bounded_by_limit_or_burst(client: httpx.AsyncClient,
                                                 policy: dict[str, Any], cost: int,
                                                 ok: bool) -> None:
    response = await check(client, cost=cost, **policy)
    if ok:
        assert response.status_code == 200 and response.json()["allowed"]
    else:
        assert_error(response, 422, "invalid_field", "cost")


async def test_body_over_the_size_limit_is_413_not_500(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", content=b" " * (2 * 1024 * 1024 + 1))
    assert_error(response, 413, "body_too_large")


async def test_other_methods_and_paths_answer_with_the_error_shape(
        client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/check"), 405, "method_not_allowed")
    assert_error(await client.post("/v1/nothing", json={}), 404, "not_found")


@pytest.mark.parametrize("fields", [
    {"limit": [5], "duration": "1m"},
    {"limit": 5, "duration": {"text": "1m"}},
    {"limit": 5, "duration": "1m", "algorithm": ["fixed_window"]},
    {"limit": 5, "duration": "1m", "mode": {}},
])
async def test_unhashable_inline_fields_are_422_not_500(clock: Clock,
                                                        fields: dict[str, Any]) -> None:
    async with node_client(clock) as client:
        body = {"namespace": "adhoc", "identifier": "x", **fields}
        try:
            response = await client.post("/v1/check", json=body)
        except TypeError as exc:  # ASGITransport re-raises the app's exception
            pytest.fail(f"500: {exc!r}")
        assert response.status_code == 422
        batch = await client.post("/v1/check/batch", json={"checks": [body]})
        assert batch.status_code == 200
        assert batch.json()["results"][0]["error"]["code"] == "invalid_field"


# --- batch ---------------------------------------------------------------------------


async def test_batch_decides_in_order_with_errors_in_their_slots(
        client: httpx.AsyncClient) -> None:
    good = {"namespace": "adhoc", "identifier": "k", "limit": 2, "duration": "1h",
            "algorithm": "fixed_window"}
    checks = [good, {**good, "cost": -1}, {**good, "namespace": "nope", "limit": None},
              good, "not an object", {"namespace": "api", "identifier": "k"}, good,
              {**good, "identifier": "é" * 129}]
    response = await client.post("/v1/check/batch", json={"checks": checks})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(checks)
    assert results[0]["allowed"] and results[0]["remaining"] == 1
    assert results[1]["error"]["field"] == "cost"
    assert results[2] == {"error": {"code": "invalid_field", "field": "limit",
                                    "message": "limit is required"}}
    assert results[3]["allowed"] and results[3]["remaining"] == 0
    assert results[4]["error"]["code"] == "invalid_body"
    assert results[5]["allowed"] and results[5]["limit"] == 3
    assert not results[6]["allowed"] and results[6]["retry_after_ms"] > 0
    assert results[7]["error"]["field"] == "identifier"
    for result in results:
        assert set(result) in (RESULT_FIELDS, {"error"})
    unknown = await client.post("/v1/check/batch", json={"checks": [
        {"namespace": "nope", "identifier": "x"}]})
    assert unknown.json()["results"][0]["error"]["code"] == "unknown_namespace"


async def test_batch_and_single_checks_agree(clock: Clock) -> None:
    checks = [{"namespace": "n", "identifier": f"id{i % 3}", "limit": 4, "duration": "1m",
               "algorithm": algorithm, "cost": i % 3}
              for i in range(30) for algorithm in ("token_bucket",)]
    async with node_client(clock) as single, node_client(clock) as batch:
        one_by_one = [(await single.post("/v1/check", json=c)).json() for c in checks]
        together = (await batch.post("/v1/check/batch", json={"checks": checks})).json()
    assert together["results"] == one_by_one


async def test_batch_of_1000_is_accepted(client: httpx.AsyncClient) -> None:
    checks = [{"namespace": "adhoc", "identifier": f"user-{i}", **INLINE}
              for i in range(1000)]
    response = await client.post("/v1/check/batch", json={"checks": checks})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 1000 and all(r["allowed"] for r in results)


@pytest.mark.parametrize("envelope", [
    {"checks": []},
    {"checks": [{"namespace": "adhoc", "identifier": "x", **INLINE}] * 1001},
    {"checks": {"namespace": "adhoc"}},
    {"checks": None},
    {"checks": "x"},
    {},
])
async def test_batch_envelope_errors_are_422(client: httpx.AsyncClient,
                                             envelope: dict[str, Any]) -> None:
    assert_error(await client.post("/v1/check/batch", json=envelope), 422, "invalid_field",
                 "checks")


@pytest.mark.parametrize("envelope", [[], [{"namespace": "x"}], "checks", 5])
async def test_batch_envelope_that_is_not_an_object_is_422(client: httpx.AsyncClient,
                                                           envelope: Any) -> None:
    response = await client.post("/v1/check/batch", json=envelope)
    assert_error(response, 422, "invalid_body")


async def test_batch_over_1000_decides_nothing(client: httpx.AsyncClient) -> None:
    check_ = {"namespace": "adhoc", "identifier": "x", **INLINE}
    await client.post("/v1/check/batch", json={"checks": [check_] * 1001})
    assert (await check(client, identifier="x", **INLINE)).json()["remaining"] == 4


# --- node token ----------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer wrong", "bearer tok", "Bearer tok ", "tok", "Basic tok",
    "Bearer tok2",
])
async def test_node_token_guards_the_check_endpoints(clock: Clock,
                                                     authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    body = {"namespace": "adhoc", "identifier": "x", **INLINE}
    async with node_client(clock, node_token="tok") as client:
        assert_error(await client.post("/v1/check", json=body, headers=headers), 401,
                     "unauthorized")
        assert_error(await client.post("/v1/check/batch", json={"checks": [body]},
                                       headers=headers), 401, "unauthorized")
        # Nothing was counted.
        ok = await client.post("/v1/check", json=body, headers={"authorization": "Bearer tok"})
        assert ok.status_code == 200 and ok.json()["remaining"] == 4
        batch = await client.post("/v1/check/batch", json={"checks": [body]},
                                  headers={"authorization": "Bearer tok"})
        assert batch.status_code == 200 and batch.json()["results"][0]["remaining"] == 3
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


async def test_without_node_token_checks_are_open(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", json={"namespace": "api", "identifier": "x"},
                                 headers={"authorization": "Bearer anything"})
    assert response.status_code == 200


# --- health, readiness, metrics, OpenAPI ---------------------------------------------


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["sync"] == "standalone" and body["reason"]
    assert body["region"] == "t"


async def test_metrics_are_prometheus_text_with_configured_labels_only(
        client: httpx.AsyncClient) -> None:
    await check(client, namespace="api")
    await check(client, namespace="adhoc", **INLINE)
    await check(client, namespace="other-adhoc", **INLINE)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'regionlimit_checks_total{namespace="api",outcome="allowed"' in text
    assert 'namespace="inline",outcome="allowed"' in text
    assert "adhoc" not in text  # inline namespaces share one label


async def test_openapi_lists_every_endpoint(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = {(path, method) for path, item in document["paths"].items()
                  for method in item}
    assert operations >= {("/v1/check", "post"), ("/v1/check/batch", "post"),
                          ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")}
    schemas = document["components"]["schemas"]
    assert {"CheckRequest", "CheckResult", "BatchRequest", "BatchResponse",
            "ErrorBody"} <= set(schemas)
    check_op = document["paths"]["/v1/check"]["post"]
    assert {"200", "400", "401", "404", "422"} <= set(check_op["responses"])
    request_schema = check_op["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema == {"$ref": "#/components/schemas/CheckRequest"}
    assert set(schemas["CheckRequest"]["required"]) == {"namespace", "identifier"}


async def test_responses_are_compact_orjson(client: httpx.AsyncClient) -> None:
    response = await check(client, **INLINE)
    assert response.content == orjson.dumps(response.json())
    assert int(response.headers["content-length"]) == len(response.content)
