"""A real `regionlimit node` process (tests/support/processes.py): start-up and refusal,
readiness, the `hash` command, a monthly quota, exact admission under concurrency, and
no raw identifier in the log, the metrics or any response.

No test depends on the wall clock's luck: the quota test uses a calendar month and
repeats itself with a fresh key in the (one in millions) case a month boundary fell
inside it; the concurrency test uses a token bucket of 50 per day, which refills one
token in 28.8 minutes."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sync.identifiers import IdentifierHasher
from tests.support.processes import (
    TEST_SECRET,
    ManagedProcess,
    base_env,
    free_port,
    region_node,
    regionlimit_command,
)

HASH = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def node() -> Iterator[ManagedProcess]:
    process = region_node(region="proc").start()
    try:
        yield process
    finally:
        process.stop()


def env_without_secret() -> dict[str, str]:
    env = base_env()
    del env["REGIONLIMIT_IDENTIFIER_SECRET"]
    return env


def test_refuses_to_start_without_a_secret() -> None:
    result = subprocess.run(
        regionlimit_command("node", "--region", "x", "--port", str(free_port())),
        env=env_without_secret(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regionlimit: ")
    assert "REGIONLIMIT_IDENTIFIER_SECRET" in lines[0]
    assert "Traceback" not in result.stderr


def test_refuses_to_start_without_a_region() -> None:
    port = str(free_port())
    result = subprocess.run(regionlimit_command("node", "--port", port), env=base_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_refuses_a_bad_policy_file_in_one_line(tmp_path: Any) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[namespaces.api]\nlimit = 1\nduration = "1m"\noverrides = 5\n')
    result = subprocess.run(
        regionlimit_command("node", "--region", "x", "--port", str(free_port()),
                            "--config", str(config)),
        env=base_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0], result.stderr


def test_dev_flag_starts_without_a_secret_and_says_so() -> None:
    port = free_port()
    process = ManagedProcess(
        regionlimit_command("node", "--region", "dev", "--port", str(port), "--dev"),
        env=env_without_secret(), url=f"http://127.0.0.1:{port}")
    process.start(ready_path="/readyz")
    try:
        response = httpx.post(process.url + "/v1/check", json={
            "namespace": "n", "identifier": "x", "limit": 1, "duration": "1h"})
        assert response.status_code == 200
    finally:
        # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is a clean stop.
        assert process.stop() in (0, -signal.SIGTERM)
    log = process.log()
    assert "--dev" in log and "WARNING" in log
    assert "Application shutdown complete" in log


def test_readyz_reports_standalone(node: ManagedProcess) -> None:
    response = httpx.get(node.url + "/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["sync"] == "standalone" and body["ready"] is True
    assert httpx.get(node.url + "/healthz").status_code == 200


@pytest.mark.parametrize("identifier", ["sk_live_abc123", "203.0.113.7", "é" * 128])
def test_hash_command_matches_the_node_hasher(identifier: str) -> None:
    result = subprocess.run(regionlimit_command("hash", identifier), env=base_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert HASH.fullmatch(printed)
    assert printed == IdentifierHasher(TEST_SECRET).hash(identifier)


def test_hash_command_without_secret_fails_in_one_line() -> None:
    result = subprocess.run(regionlimit_command("hash", "x"), env=env_without_secret(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_override_by_hash_applies_in_a_real_node(tmp_path: Any) -> None:
    """The operator's path: `regionlimit hash` into the policy file, then a node."""
    printed = subprocess.run(regionlimit_command("hash", "sk_live_pro_1"), env=base_env(),
                             capture_output=True, text=True, timeout=60).stdout.strip()
    config = tmp_path / "node.toml"
    config.write_text(f'[namespaces.api]\nlimit = 2\nduration = "1h"\n'
                      f'[[namespaces.api.overrides]]\nidentifier_hash = "{printed}"\n'
                      f'limit = 1000\n')
    process = region_node(region="cfg", config=config).start()
    try:
        pro = httpx.post(process.url + "/v1/check",
                         json={"namespace": "api", "identifier": "sk_live_pro_1"})
        other = httpx.post(process.url + "/v1/check",
                           json={"namespace": "api", "identifier": "sk_live_free"})
        assert pro.json()["limit"] == 1000 and other.json()["limit"] == 2
    finally:
        process.stop()


def test_a_key_limited_to_100_per_month(node: ManagedProcess) -> None:
    for _attempt in range(2):
        policy = {"namespace": "monthly", "identifier": f"sk_live_{uuid.uuid4().hex}",
                  "limit": 100, "duration": "month", "algorithm": "fixed_window"}
        with httpx.Client(base_url=node.url) as client:
            responses = [client.post("/v1/check", json=policy) for _ in range(101)]
        bodies = [r.json() for r in responses]
        if len({b["reset_at"] for b in bodies}) > 1:
            continue  # a month boundary fell inside the test: once more, with a new key
        assert all(r.status_code == 200 for r in responses)
        assert [b["allowed"] for b in bodies] == [True] * 100 + [False]
        assert [b["remaining"] for b in bodies[:100]] == list(range(99, -1, -1))
        denied, headers = bodies[100], responses[100].headers
        assert denied["remaining"] == 0 and denied["limit"] == 100
        assert denied["retry_after_ms"] > 0
        assert int(headers["retry-after"]) == -(-denied["retry_after_ms"] // 1000)
        assert int(headers["retry-after"]) >= 1
        assert headers["ratelimit-remaining"] == "0"
        assert "retry-after" not in responses[99].headers
        return
    pytest.fail("two month boundaries within seconds")


async def test_200_concurrent_checks_against_50_admit_exactly_50(node: ManagedProcess
                                                                 ) -> None:
    body = {"namespace": "concurrent", "identifier": f"sk_live_{uuid.uuid4().hex}",
            "limit": 50, "duration": "1d", "algorithm": "token_bucket"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=30) as client:
        start = asyncio.Event()

        async def one() -> httpx.Response:
            await start.wait()
            return await client.post("/v1/check", json=body)

        tasks = [asyncio.create_task(one()) for _ in range(200)]
        await asyncio.sleep(0)
        start.set()
        responses = await asyncio.gather(*tasks)
    assert all(r.status_code == 200 for r in responses)
    allowed = sum(r.json()["allowed"] for r in responses)
    assert allowed == 50
    assert sorted(r.json()["remaining"] for r in responses if r.json()["allowed"]) == list(
        range(50))


def test_raw_identifiers_never_leave_the_node() -> None:
    canary = f"sk_live_LEAKCANARY_{uuid.uuid4().hex}"
    process = region_node(region="leak", extra_env={"REGIONLIMIT_ACCESS_LOG": "true"}).start(
        ready_path="/readyz")
    bodies: list[bytes] = []
    try:
        with httpx.Client(base_url=process.url) as client:
            def send(path: str, payload: Any) -> None:
                response = client.post(path, json=payload)
                assert response.status_code < 500, response.text
                bodies.append(response.content)
                bodies.append(str(response.headers).encode())

            inline = {"limit": 2, "duration": "1h", "algorithm": "fixed_window"}
            for _ in range(3):  # allowed, allowed, denied
                send("/v1/check", {"namespace": "leak", "identifier": canary, **inline})
            invalid = [
                {"namespace": "leak", "identifier": canary, "cost": -1, **inline},
                {"namespace": "leak", "identifier": canary, "cost": 3, **inline},
                {"namespace": "leak", "identifier": canary * 10, **inline},  # > 256 bytes
                {"namespace": "unknown", "identifier": canary},
                {"namespace": "bad/ns", "identifier": canary},
                {"namespace": "leak", "identifier": canary, "limit": 0, "duration": "1h"},
                {"namespace": "leak", "identifier": canary, "limit": 1, "duration": "1y"},
                {"namespace": "leak", "identifier": canary, "limit": 1, "duration": "month"},
                {"namespace": "leak", "identifier": canary, "cost": "1", **inline},
            ]
            for payload in invalid:
                send("/v1/check", payload)
            send("/v1/check/batch", {"checks": [
                {"namespace": "leak", "identifier": canary, **inline}, *invalid]})
            send("/v1/check/batch", {"checks": []})
            send("/v1/check/batch", {"checks": [{"identifier": canary}] * 1001})
            response = client.post("/v1/check", content=b'{"identifier": "' +
                                   canary.encode() + b'", ')  # not JSON
            assert response.status_code == 400
            bodies.append(response.content)
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            bodies.append(metrics.content)
    finally:
        process.stop()
    log = process.log()
    assert "POST /v1/check" in log  # the access log is there, and was read
    assert canary not in log
    for body in bodies:
        assert canary.encode() not in body
    # Nor a recognisable part of it.
    assert "LEAKCANARY" not in log and not any(b"LEAKCANARY" in body for body in bodies)


def test_no_line_per_check_by_default_but_refused_requests_are_logged() -> None:
    canary = f"sk_live_LEAKCANARY_{uuid.uuid4().hex}"
    process = region_node(region="quiet").start(ready_path="/readyz")
    try:
        with httpx.Client(base_url=process.url) as client:
            check = {"namespace": "quiet", "identifier": canary, "limit": 5, "duration": "1h"}
            for _ in range(3):
                assert client.post("/v1/check", json=check).status_code == 200
            assert client.post("/v1/check", json={**check, "cost": -1}).status_code == 422
            not_json = b'{"identifier": "' + canary.encode() + b'", '
            assert client.post("/v1/check", content=not_json).status_code == 400
    finally:
        process.stop()
    log = process.log()
    assert "POST /v1/check" not in log  # no access line per check
    rejected = [line for line in log.splitlines() if "rejected request" in line]
    assert len(rejected) == 2, log
    assert "422 invalid_field (field cost)" in rejected[0]
    assert "400 invalid_json" in rejected[1]
    assert canary not in log and "LEAKCANARY" not in log
