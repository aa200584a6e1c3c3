"""The client distribution installs and passes its own tests without the server's dependencies.

An app that only wants the middleware must not pull FastAPI, SQLAlchemy, NATS or Postgres
drivers: this builds a fresh venv, installs ./clients/python (plus its test tools) from the
machine's pip cache or PyPI, proves the server's dependencies are absent there, and runs
clients/python/tests in it.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"

pytestmark = pytest.mark.e2e


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_client_installs_alone_and_its_tests_pass(tmp_path: Path) -> None:
    # A copy, so the build writes nothing into the repository.
    source = tmp_path / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    env_dir = tmp_path / "venv"
    try:
        venv.create(env_dir, with_pip=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a venv here: {exc}")
    python = env_dir / "bin" / "python"
    install = run(python, "-m", "pip", "install", "-q", f"{source}[test]", cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    for server_only in ("fastapi", "starlette", "sqlalchemy", "nats", "prometheus_client"):
        probe = run(python, "-c", f"import {server_only}", cwd=tmp_path)
        assert probe.returncode != 0, f"{server_only} is installed with the client"
    assert run(python, "-c", "import regionlimit_client", cwd=tmp_path).returncode == 0

    # The venv's own pytest (not `python -m`), so the installed package is what is imported.
    pytest_bin = env_dir / "bin" / "pytest"
    tests = run(pytest_bin, "-q", "-p", "no:cacheprovider", "tests", cwd=source)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout
