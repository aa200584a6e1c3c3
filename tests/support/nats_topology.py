"""The shipped NATS topology (deploy/nats/hub.conf + leaf.conf) as real nats-server
processes: one hub with JetStream and any number of leaf nodes, on free 127.0.0.1 ports.

Only ports, the store directory and the host in the hub's leafnode URL are substituted;
everything else (authorization, JetStream domain, leafnode settings) is the file as shipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from regionlimit.dev import nats_server_binary
from tests.support.processes import free_port

DEPLOY_NATS = Path(__file__).resolve().parents[2] / "deploy" / "nats"
NATS_PASSWORD = "nTestPassw0rd"
LEAF_PASSWORD = "nTestLeafPassw0rd"


def shipped_js_domain() -> str | None:
    """The JetStream domain that the shipped hub.conf declares (None: none declared)."""
    match = re.search(r"(?m)^\s*domain:\s*(\S+)\s*$", (DEPLOY_NATS / "hub.conf").read_text())
    return match.group(1) if match else None


def _substitute(text: str, pattern: str, replacement: str) -> str:
    rendered, count = re.subn(pattern, replacement, text)
    assert count == 1, f"shipped NATS config changed: {pattern!r} matched {count} times"
    return rendered


class ShippedNatsTopology:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hub_port, self.hub_http, self.hub_leaf_port = free_port(), free_port(), free_port()
        self.leaf_ports: dict[str, tuple[int, int]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def hub_url(self) -> str:
        return f"nats://regionlimit:{NATS_PASSWORD}@127.0.0.1:{self.hub_port}"

    def leaf_url(self, region: str) -> str:
        return f"nats://regionlimit:{NATS_PASSWORD}@127.0.0.1:{self.leaf_ports[region][0]}"

    def start_hub(self) -> None:
        text = (DEPLOY_NATS / "hub.conf").read_text()
        text = _substitute(text, r"(?m)^port: 4222$", f"port: {self.hub_port}")
        text = _substitute(text, r"(?m)^http_port: 8222$", f"http_port: {self.hub_http}")
        text = _substitute(text, r"(?m)^  port: 7422$", f"  port: {self.hub_leaf_port}")
        text = _substitute(text, r"store_dir: /data", f"store_dir: {self.tmp / 'hub-js'}")
        self._spawn("hub", text, {})
        self._wait(self.hub_http, "/jsz", lambda body: body.get("config") is not None)

    def start_leaf(self, region: str) -> None:
        port, http_port = self.leaf_ports.setdefault(region, (free_port(), free_port()))
        text = (DEPLOY_NATS / "leaf.conf").read_text()
        text = _substitute(text, r"(?m)^port: 4222$", f"port: {port}")
        text = _substitute(text, r"(?m)^http_port: 8222$", f"http_port: {http_port}")
        self._spawn(f"leaf-{region}", text, {
            "NATS_SERVER_NAME": f"leaf-{region}",
            "NATS_HUB_LEAF_URL": f"nats-leaf://leaf:{LEAF_PASSWORD}@127.0.0.1:{self.hub_leaf_port}",
        })
        self._wait(http_port, "/leafz", lambda body: bool(body.get("leafnodes")))

    def close(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, config: str, extra_env: dict[str, str]) -> None:
        path = self.tmp / f"{name}.conf"
        # The shipped configs listen on every interface (containers); tests only on loopback.
        path.write_text(f"host: 127.0.0.1\n{config}")
        env = {**os.environ, "NATS_PASSWORD": NATS_PASSWORD,
               "NATS_LEAF_PASSWORD": LEAF_PASSWORD, **extra_env}
        self.processes[name] = subprocess.Popen(
            [nats_server_binary(), "-c", str(path), "-l", str(self.tmp / f"{name}.log")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def _wait(self, http_port: int, path: str, ready: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}",
                                            timeout=2) as answer:
                    if ready(json.load(answer)):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"nats-server monitor {path} on {http_port} not ready")
