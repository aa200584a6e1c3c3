"""A real nats-server (with JetStream) that a test can stop, kill and restart."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from regionlimit.dev import nats_server_binary
from tests.support.processes import free_port

HOST = "127.0.0.1"


class NatsServer:
    """One nats-server process on a fixed 127.0.0.1 port and JetStream store directory.

    The port and the store survive ``stop()``/``kill()``, so ``start()`` again (or
    ``restart()``) brings back the same server, streams and consumers included, at the
    same URL that clients reconnect to.
    """

    def __init__(self, store_dir: Path | None = None, *, port: int | None = None) -> None:
        self._owns_store = store_dir is None
        self.store_dir = Path(tempfile.mkdtemp(prefix="nats-")) if store_dir is None else store_dir
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.store_dir / "nats-server.log"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # Once started, clients know the URL: later starts must keep the port.
        self._ever_started = False

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout: float = 20.0) -> NatsServer:
        if self.running:
            raise RuntimeError(f"nats-server already running at {self.url}")
        try:
            self._spawn(timeout)
        except _PortTaken:
            if self._fixed_port or self._ever_started:
                raise
            # free_port() only found a port that was free a moment ago; another process
            # may have taken it since. Before the first start nobody knows our URL yet,
            # so another port is as good.
            self.port = free_port()
            self._spawn(timeout)
        self._ever_started = True
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM); SIGKILL if it does not exit within ``timeout``."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): like a crashed server; JetStream recovers on start."""
        self._signal(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a stalled server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, *, timeout: float = 20.0) -> NatsServer:
        """Stop gracefully and start again on the same port with the same store."""
        self.stop()
        return self.start(timeout=timeout)

    def close(self) -> None:
        """Stop and remove the store if this object created it."""
        if self.running:
            self.kill()
        if self._owns_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.close()

    def _spawn(self, timeout: float) -> None:
        args = [
            nats_server_binary(),
            "-a", HOST,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.store_dir),
            "-l", str(self.log_path),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the port answers with a NATS INFO that has JetStream on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.log()
                if "address already in use" in log.lower():
                    raise _PortTaken(log)
                raise RuntimeError(f"nats-server exited {self.proc.returncode}:\n{log}")
            if self._info_has_jetstream():
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"nats-server not ready on {self.url} within {timeout}s:\n{self.log()}")

    def _info_has_jetstream(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                line = sock.makefile("rb").readline(65536)
        except OSError:
            return False
        if not line.startswith(b"INFO "):
            return False
        try:
            info = json.loads(line[5:])
        except ValueError:
            return False
        return bool(info.get("jetstream"))

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _PortTaken(RuntimeError):
    pass
