"""`regionlimit usage|namespaces|overrides` against a real central process (real NATS and
Postgres): tables, CSV and JSON output, raw identifiers only in bodies, one-line errors."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from central.billing.usage_query import parse_csv, parse_time
from central.database import make_engine
from central.ledger import BucketIncrement, LedgerStore
from regionlimit.cli import main
from regionlimit.operator import month_range, render_table
from tests.support.cluster import Cluster
from tests.support.nats_server import NatsServer
from tests.support.processes import (
    TEST_ADMIN_TOKEN,
    ManagedProcess,
    base_env,
    free_port,
    regionlimit_command,
)

RAW = "sk_live_cli_secret_1"


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path)
    try:
        yield system
    finally:
        system.close()


@pytest.fixture
def central(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> ManagedProcess:
    process = cluster.central()
    for name in ("REGIONLIMIT_CENTRAL_URL", "REGIONLIMIT_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REGIONLIMIT_CENTRAL_URL", process.url)
    monkeypatch.setenv("REGIONLIMIT_ADMIN_TOKEN", TEST_ADMIN_TOKEN)
    return process


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def failed(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1, out
    assert err.startswith("regionlimit: ") and err.count("\n") == 1, err
    return err


def write_usage(cluster: Cluster, increments: list[BucketIncrement]) -> None:
    async def go() -> None:
        engine = make_engine(cluster.database_url)
        try:
            await LedgerStore(engine).write([], increments)
        finally:
            await engine.dispose()
    asyncio.run(go())


def test_namespaces_and_overrides_round_trip(central: ManagedProcess, cluster: Cluster,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(capsys, "namespaces", "set", "api", "--limit", "100", "--duration", "1m",
             "--algorithm", "fixed_window", "--mode", "fast", "--on-unavailable", "closed")
    assert "limit" in out and "100" in out
    stored = json.loads(ok(capsys, "namespaces", "get", "api", "--json"))
    assert (stored["limit"], stored["duration"], stored["on_unavailable"]) == (100, "1m",
                                                                              "closed")
    ok(capsys, "namespaces", "set", "web", "--limit", "5", "--duration", "1h",
       "--shadow-mode")
    assert json.loads(ok(capsys, "namespaces", "get", "web", "--json"))["shadow_mode"] is True
    assert stored["shadow_mode"] is False
    table = ok(capsys, "namespaces", "list").splitlines()
    assert table[0].split()[:3] == ["namespace", "limit", "duration"]
    assert [line.split()[0] for line in table[2:]] == ["api", "web"]

    # Overrides: the raw identifier goes in the body; rows are keyed by its hash.
    key_hash = cluster.hasher.hash(RAW)
    ok(capsys, "overrides", "set", "api", "--identifier", RAW, "--limit", "1000")
    listed = ok(capsys, "overrides", "list", "api").splitlines()
    assert listed[2].split()[:2] == [key_hash, "1000"]
    by_raw = json.loads(ok(capsys, "overrides", "get", "api", "--identifier", RAW, "--json"))
    by_hash = json.loads(ok(capsys, "overrides", "get", "api", "--identifier-hash", key_hash,
                            "--json"))
    assert by_raw == by_hash and by_raw["identifier_hash"] == key_hash
    assert by_raw["limit"] == 1000
    ok(capsys, "overrides", "delete", "api", "--identifier-hash", key_hash)
    assert "404" in failed(capsys, "overrides", "get", "api", "--identifier-hash", key_hash)
    ok(capsys, "namespaces", "delete", "web")
    assert "404" in failed(capsys, "namespaces", "get", "web")
    assert "(limit)" in failed(capsys, "namespaces", "set", "x", "--limit", "0",
                               "--duration", "1m")
    assert RAW not in central.log()  # not in an access log line, not anywhere


def test_usage_as_table_csv_and_json(central: ManagedProcess, cluster: Cluster,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    key, other = cluster.hasher.hash(RAW), "0" * 32
    nov = parse_time("2026-11-01", "t")
    write_usage(cluster, [
        BucketIncrement("api", key, "eu", nov + 5 * 3_600_000, 120, 3),
        BucketIncrement("api", key, "us", nov + 50 * 3_600_000, 7, 0),
        BucketIncrement("api", other, "eu", nov + 9 * 3_600_000, 1, 1),
        BucketIncrement("api", key, "eu", nov - 3_600_000, 1000, 0),  # October
    ])
    table = ok(capsys, "usage", "--namespace", "api", "--month", "2026-11", "--by", "region")
    lines = table.splitlines()
    assert lines[0] == "namespace api, 2026-11-01T00:00:00Z to 2026-12-01T00:00:00Z"
    assert lines[1].split() == ["identifier_hash", "region", "admitted", "denied"]
    assert [line.split() for line in lines[3:]] == [
        [other, "eu", "1", "1"], [key, "eu", "120", "3"], [key, "us", "7", "0"],
        ["total", "128", "4"]]
    # Counts are right-aligned under their header.
    assert len({len(line) for line in lines[1:5]}) == 1

    as_json = json.loads(ok(capsys, "usage", "--namespace", "api", "--month", "2026-11",
                            "--by", "region,month", "--json"))
    as_csv = ok(capsys, "usage", "--namespace", "api", "--month", "2026-11", "--by", "region",
                "--by", "month", "--csv")
    assert as_csv.splitlines()[0] == "identifier_hash,region,period,admitted,denied"
    assert parse_csv(as_csv) == as_json["rows"]

    mine = ok(capsys, "usage", "--namespace", "api", "--identifier", RAW,
              "--from", "2026-10-31", "--to", "2026-11-04")
    assert mine.splitlines()[3].split() == [key, "1127", "3"]

    assert "--month must be YYYY-MM" in failed(capsys, "usage", "--namespace", "api",
                                               "--month", "2026-13")
    assert "cannot be combined" in failed(capsys, "usage", "--namespace", "api", "--month",
                                          "2026-11", "--from", "2026-11-01")
    assert "(group_by)" in failed(capsys, "usage", "--namespace", "api", "--by", "week")
    assert "(from)" in failed(capsys, "usage", "--namespace", "api", "--from",
                              "2026-11-01T00:30:00Z")
    assert "no usage" in ok(capsys, "usage", "--namespace", "nobody", "--month", "2026-11")
    assert RAW not in central.log()


def test_connection_problems_are_one_line_errors(
        central: ManagedProcess, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert "401" in failed(capsys, "namespaces", "list", "--admin-token", "wrong")
    monkeypatch.delenv("REGIONLIMIT_ADMIN_TOKEN")
    assert "admin token is required" in failed(capsys, "namespaces", "list")
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach central" in failed(capsys, "usage", "--namespace", "api",
                                            "--central-url", nowhere, "--admin-token", "t")


def test_the_installed_command_exits_non_zero_with_one_line(central: ManagedProcess) -> None:
    env = base_env(REGIONLIMIT_CENTRAL_URL=central.url)
    done = subprocess.run(
        regionlimit_command("usage", "--namespace", "api", "--by", "day", "--by", "month"),
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("regionlimit: central answered 422 (group_by)")
    assert done.stderr.count("\n") == 1


def test_month_ranges_and_tables() -> None:
    assert month_range("2026-11") == ("2026-11-01", "2026-12-01")
    assert month_range("2026-12") == ("2026-12-01", "2027-01-01")
    out = io.StringIO()
    render_table(["name", "admitted"], [["a", 5], ["longer", 1234], ["x", None]], out)
    assert out.getvalue().splitlines() == [
        "name    admitted",
        "------  --------",
        "a              5",
        "longer      1234",
        "x              -",
    ]
