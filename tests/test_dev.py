"""`regionlimit dev`: one command starts NATS, central and three nodes that enforce one
limit together, and Ctrl-C stops all of them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

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
