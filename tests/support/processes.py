"""Start regionlimit processes (`regionlimit node`, `regionlimit central`) for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

TEST_SECRET = "test-identifier-secret"
TEST_ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """A child process whose output goes to a log file the test can read afterwards."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str], url: str) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.url = url
        self.log_path = Path(tempfile.mkstemp(prefix="regionlimit-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_path: str = "/healthz", timeout: float = 30.0) -> ManagedProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.wait_http(ready_path, timeout=timeout)
        return self

    def wait_http(self, path: str, *, timeout: float = 30.0) -> None:
        """Poll until ``path`` answers 200; fail with the process log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url}{path} not 200 within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def base_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONLIMIT_")}
    env["REGIONLIMIT_IDENTIFIER_SECRET"] = TEST_SECRET
    env["REGIONLIMIT_ADMIN_TOKEN"] = TEST_ADMIN_TOKEN
    env.update(overrides)
    return env


def regionlimit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "regionlimit.cli", *args]


def region_node(
    *,
    region: str = "test",
    port: int | None = None,
    config: Path | None = None,
    nats_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """A `regionlimit node` (not started yet: call ``.start()``)."""
    port = port or free_port()
    args = regionlimit_command("node", "--region", region, "--port", str(port))
    if config is not None:
        args += ["--config", str(config)]
    if nats_url is not None:
        args += ["--nats-url", nats_url]
    return ManagedProcess(args, env=base_env(**(extra_env or {})), url=f"http://127.0.0.1:{port}")
