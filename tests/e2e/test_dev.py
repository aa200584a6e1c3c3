"""`regionlimit dev`: one command starts NATS, central and three nodes that enforce one
limit together, and Ctrl-C stops all of them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import avoid_window_boundary, wait_until
from tests.support.processes import base_env


def four_free_ports() -> int:
    for base in range(20_000, 60_000, 97):
        sockets = []
        try:
            for port in range(base, base + 4):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no four consecutive free ports")


def test_dev_runs_three_regions_enforcing_one_limit(tmp_path: Path) -> None:
    base = four_free_ports()
    env = base_env()
    del env["REGIONLIMIT_IDENTIFIER_SECRET"], env["REGIONLIMIT_ADMIN_TOKEN"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "regionlimit.cli", "dev", "--port-base", str(base),
         "--state-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if "REGIONLIMIT_CENTRAL_URL" in line:
                break
        text = "".join(banner)
        assert f"http://127.0.0.1:{base + 1}" in text, text
        assert "REGIONLIMIT_ADMIN_TOKEN=" in text
        nodes = [f"http://127.0.0.1:{base + i}" for i in (1, 2, 3)]
        check = {"namespace": "devtest", "identifier": "k", "limit": 6, "duration": "1d",
                 "algorithm": "fixed_window", "cost": 2}
        avoid_window_boundary(86_400_000, span_s=60)
        with httpx.Client() as client:
            for node in nodes:
                assert client.post(node + "/v1/check", json=check).json()["allowed"]

            def all_exhausted() -> bool:
                return all(client.post(n + "/v1/check", json={**check, "cost": 0}).json()
                           ["remaining"] == 0 for n in nodes)

            wait_until(all_exhausted, what="three regions sharing one limit")
            assert httpx.get(f"http://127.0.0.1:{base}/readyz").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "regionlimit dev stopped" in out


def test_dev_credentials_come_from_the_environment_or_survive_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionlimit.dev import DevSystem

    for name in ("REGIONLIMIT_IDENTIFIER_SECRET", "REGIONLIMIT_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    first = DevSystem(port_base=8080, nats_url=None, state_dir=state)
    again = DevSystem(port_base=8080, nats_url=None, state_dir=state)
    # A restart on the same state directory: the token the user exported still works.
    assert (again.secret, again.admin_token) == (first.secret, first.admin_token)
    assert len(first.secret) >= 32 and first.secret != first.admin_token
    saved = state / "credentials.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    # Another state directory is another system.
    other = DevSystem(port_base=8080, nats_url=None, state_dir=tmp_path / "other")
    assert other.admin_token != first.admin_token

    monkeypatch.setenv("REGIONLIMIT_ADMIN_TOKEN", "my-admin-token")
    monkeypatch.setenv("REGIONLIMIT_IDENTIFIER_SECRET", "my-identifier-secret")
    given = DevSystem(port_base=8080, nats_url=None, state_dir=state)
    assert (given.secret, given.admin_token) == ("my-identifier-secret", "my-admin-token")
    assert given.env()["REGIONLIMIT_ADMIN_TOKEN"] == "my-admin-token"
    assert "my-admin-token" not in saved.read_text()  # the environment's are not stored
    monkeypatch.delenv("REGIONLIMIT_ADMIN_TOKEN")
    # Only the secret from the environment: the token is the saved one.
    mixed = DevSystem(port_base=8080, nats_url=None, state_dir=state)
    assert (mixed.secret, mixed.admin_token) == ("my-identifier-secret", first.admin_token)
