"""POST /v1/usage/query in process (central's real app, no NATS needed) on SQLite and
Postgres: auth, validation, JSON and CSV, the clock-injected default month, period edges
through the real ingest merge, and answers that survive a rollup."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from central.app import build_central_app
from central.billing.rollups import RollupJob
from central.billing.usage_query import DAY_MS, HOUR_MS, parse_csv, parse_time
from central.billing.usage_store import STREAM_CHUNK
from central.ledger import BucketIncrement, LedgerStore
from central.migrate import run_migrations
from central.service import CentralService
from central.settings import CentralSettings
from central.totals import GlobalTotals
from sync.messages import UsageBatch, UsageEntry
from sync.policy import build_policy
from sync.windows import hour_start
from tests.support.processes import free_port

TOKEN = "usage-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
URL = "/v1/usage/query"


def ms(text: str) -> int:
    return parse_time(text, "t")


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(ms("2026-11-23T11:40:00Z"))


@pytest.fixture
async def service(ledger_url: str, clock: Clock) -> AsyncIterator[CentralService]:
    await run_migrations(ledger_url)
    settings = CentralSettings(nats_url="nats://127.0.0.1:1", admin_token=SecretStr(TOKEN),
                               identifier_secret=SecretStr("usage-test-secret"))
    service = CentralService(settings, database_url=ledger_url, clock=clock)
    try:
        yield service
    finally:
        await service.engine.dispose()


@pytest.fixture
async def client(service: CentralService) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = build_central_app(service)  # no lifespan: nothing connects to NATS
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://central") as client:
        yield client


async def write(service: CentralService, *increments: BucketIncrement) -> None:
    await LedgerStore(service.engine).write([], list(increments))


async def query(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post(URL, json=body, headers=AUTH)


def error_of(response: httpx.Response) -> dict[str, str]:
    error: dict[str, str] = response.json()["error"]
    return error


async def test_the_admin_token_is_required(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        response = await client.post(URL, json={"namespace": "api"}, headers=headers)
        assert response.status_code == 401
        assert error_of(response)["code"] == "unauthorized"


async def test_bad_requests_are_400_or_422_naming_the_field(client: httpx.AsyncClient
                                                            ) -> None:
    response = await client.post(URL, content=b"{not json", headers=AUTH)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "namespace"),
        ({"namespace": "api", "identifier": "a", "identifier_hash": "0" * 32},
         "identifier_hash"),
        ({"namespace": "api", "group_by": ["day", "month"]}, "group_by"),
        ({"namespace": "api", "from": "2026-11-01T10:30:00Z"}, "from"),
        ({"namespace": "api", "to": "next tuesday"}, "to"),
        ({"namespace": "api", "from": "2026-12-01", "to": "2026-11-01"}, "to"),
        ({"namespace": "api", "limit": 5}, "limit"),
        # December 9999 used to be planned into year 10000: a 500 (issue 10).
        ({"namespace": "api", "from": "2026-11-01", "to": "9999-12-31T00:00:00Z"}, "to"),
        ({"namespace": "api", "from": "9999-12-02", "to": "9999-12-03"}, "from"),
    ]
    for body, field in cases:
        response = await query(client, **body)
        assert response.status_code == 422, (body, response.text)
        assert error_of(response)["field"] == field
        assert error_of(response)["code"] == "invalid_field"
    response = await client.post(URL, json=[], headers=AUTH)
    assert response.status_code == 422 and "field" not in error_of(response)


async def test_a_raw_identifier_is_hashed_and_never_echoed(
        client: httpx.AsyncClient, service: CentralService) -> None:
    key = service.hasher.hash("sk_live_abc123")
    await write(service,
                BucketIncrement("api", key, "eu", ms("2026-11-05T10:00:00Z"), 40, 2),
                BucketIncrement("api", key, "us", ms("2026-11-20T23:00:00Z"), 2, 0),
                BucketIncrement("api", key, "us", ms("2026-10-31T23:00:00Z"), 7, 0),
                BucketIncrement("api", "f" * 32, "us", ms("2026-11-06T00:00:00Z"), 9, 9))
    response = await query(client, namespace="api", identifier="sk_live_abc123",
                           group_by=["region", "month"])
    assert response.status_code == 200
    assert "sk_live_abc123" not in response.text
    # Default range: the current month of the injected clock.
    assert response.json() == {
        "namespace": "api", "from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z",
        "rows": [
            {"identifier_hash": key, "region": "eu", "period": "2026-11", "admitted": 40,
             "denied": 2},
            {"identifier_hash": key, "region": "us", "period": "2026-11", "admitted": 2,
             "denied": 0},
        ]}
    by_hash = await query(client, namespace="api", identifier_hash=key, **{
        "from": ms("2026-10-01"), "to": "2026-12-01T00:00:00+00:00"})
    assert by_hash.json()["rows"] == [
        {"identifier_hash": key, "admitted": 49, "denied": 2}]
    by_day = await query(client, namespace="api", group_by=["day"])
    assert [(r["identifier_hash"][:1], r["period"]) for r in by_day.json()["rows"]] == [
        (key[:1], "2026-11-05"), (key[:1], "2026-11-20"), ("f", "2026-11-06")]


async def test_usage_admitted_in_the_last_millisecond_of_a_month_bills_to_that_month(
        client: httpx.AsyncClient, service: CentralService) -> None:
    """Through the real ingest merge: a batch flushed at 23:59:59.999 on 30 November."""
    flushed = ms("2026-11-30T23:59:59.999Z")
    totals = GlobalTotals(retention_ms=7 * DAY_MS)
    policy = build_policy(limit=100, duration="month", algorithm="fixed_window")
    window = ms("2026-11-01")
    key = service.hasher.hash("edge-key")
    totals.merge(UsageBatch("eu.n1", "eu", flushed,
                            [UsageEntry("api", key, window, 6, 1, policy)]), now=flushed)
    # The node's next flush, after midnight, in the same month-long limit window.
    totals.merge(UsageBatch("eu.n1", "eu", flushed + 2,
                            [UsageEntry("api", key, window, 9, 1, policy)]), now=flushed + 2)
    rows, increments = totals.take_unsaved(flushed + 2)
    await LedgerStore(service.engine).write(rows, increments)

    nov = await query(client, namespace="api", identifier="edge-key", group_by=["day"],
                      **{"from": "2026-11-01", "to": "2026-12-01"})
    dec = await query(client, namespace="api", identifier="edge-key", group_by=["day"],
                      **{"from": "2026-12-01", "to": "2027-01-01"})
    assert [(r["period"], r["admitted"], r["denied"]) for r in nov.json()["rows"]] == [
        ("2026-11-30", 6, 1)]
    assert [(r["period"], r["admitted"], r["denied"]) for r in dec.json()["rows"]] == [
        ("2026-12-01", 3, 0)]
    assert hour_start(flushed) == ms("2026-11-30T23:00:00Z")


async def test_csv_streams_the_same_rows_as_the_json(
        client: httpx.AsyncClient, service: CentralService) -> None:
    keys = [f"{i:032x}" for i in range(STREAM_CHUNK * 2 + 17)]  # several stream chunks
    await write(service, *(
        BucketIncrement("api", key, region, ms("2026-11-02T00:00:00Z") + (i % 48) * HOUR_MS,
                        i % 7 + 1, i % 3)
        for i, key in enumerate(keys) for region in ("eu", "us")))
    for group_by in ([], ["region"], ["region", "day"], ["month"]):
        body = {"namespace": "api", "group_by": group_by}
        as_json = await client.post(URL, json=body, headers=AUTH)
        as_csv = await client.post(URL, json=body, headers={**AUTH, "accept": "text/csv"})
        assert as_csv.status_code == 200
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in as_csv.headers["content-disposition"]
        header = as_csv.text.split("\r\n", 1)[0]
        columns = ["identifier_hash", *(["region"] if "region" in group_by else []),
                   *(["period"] if len(group_by) > group_by.count("region") else []),
                   "admitted", "denied"]
        assert header == ",".join(columns)
        assert parse_csv(as_csv.text) == as_json.json()["rows"]
        assert len(as_json.json()["rows"]) >= len(keys)


async def test_pruned_detail_is_a_422_naming_the_bound_and_totals_survive_a_rollup(
        client: httpx.AsyncClient, service: CentralService, clock: Clock) -> None:
    key = "a" * 32
    await write(service, *(
        BucketIncrement("api", key, region, ms("2026-08-01T00:00:00Z") + h * 7 * HOUR_MS,
                        h % 5 + 1, h % 2)
        for h in range(400) for region in ("eu", "us")))
    queries = [
        {"namespace": "api", "from": "2026-08-01", "to": "2026-12-01",
         "group_by": ["region", "month"]},
        {"namespace": "api", "identifier_hash": key, "from": "2026-08-01",
         "to": "2026-12-01"},
        {"namespace": "api", "from": "2026-08-01", "to": "2026-12-01", "group_by": ["day"]},
    ]
    before = [(await query(client, **body)).json() for body in queries]  # type: ignore[arg-type]
    fine = {"namespace": "api", "from": "2026-09-03T05:00:00Z", "to": "2026-09-04"}
    assert (await query(client, **fine)).status_code == 200  # type: ignore[arg-type]

    job = RollupJob.from_settings(service.engine, service.settings)
    try:
        report = await job.run_once(clock.now)
    finally:
        await job.aclose()
    assert report.days_folded > 0 and report.hourly_pruned > 0
    after = [(await query(client, **body)).json() for body in queries]  # type: ignore[arg-type]
    assert after == before
    refused = await query(client, **fine)  # type: ignore[arg-type]
    assert refused.status_code == 422
    assert error_of(refused)["field"] == "from"
    assert "hour-level usage is kept from 2026-10-19" in error_of(refused)["message"]


@pytest.mark.parametrize("accept", ["application/json", "text/csv"])
async def test_an_unreachable_ledger_is_a_503_not_a_500(accept: str) -> None:
    settings = CentralSettings(nats_url="nats://127.0.0.1:1", admin_token=SecretStr(TOKEN),
                               identifier_secret=SecretStr("usage-test-secret"))
    port = free_port()  # nothing listens there
    service = CentralService(settings, database_url=f"postgresql://u@127.0.0.1:{port}/x")
    try:
        app = build_central_app(service)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://central") as client:
            response = await client.post(URL, json={"namespace": "api"},
                                         headers={**AUTH, "accept": accept})
        assert response.status_code == 503
        assert error_of(response)["code"] == "ledger_unavailable"
    finally:
        await service.engine.dispose()


async def test_a_namespace_of_a_month_without_algorithm_is_a_fixed_window(
        client: httpx.AsyncClient) -> None:
    # The admin API shares the rule with inline checks and policy files.
    put = await client.put("/v1/namespaces/quota", json={"limit": 100, "duration": "month"},
                           headers=AUTH)
    assert put.status_code == 200, put.text
    assert put.json()["algorithm"] == "fixed_window"
    stored = await client.get("/v1/namespaces/quota", headers=AUTH)
    assert stored.json()["algorithm"] == "fixed_window"
    other = await client.put("/v1/namespaces/quota2", headers=AUTH, json={
        "limit": 100, "duration": "month", "algorithm": "sliding_window"})
    assert other.status_code == 422 and other.json()["error"]["field"] == "duration"
