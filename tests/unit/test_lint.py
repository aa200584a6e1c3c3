"""ruff and mypy --strict stay clean (the style guide is enforced, not hoped for)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run(
        str(BIN / "mypy"), "region_node", "sync", "central", "regionlimit",
        "clients/python/regionlimit_client",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_central_and_sync_never_import_region_node() -> None:
    # DESIGN.md: region_node -> sync <- central. An import (even a lazy one inside a
    # function) of region_node from central/ or sync/, or of central from sync/, fails.
    wrong: list[str] = []
    for package, forbidden in (("central", ("region_node",)),
                               ("sync", ("region_node", "central"))):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                          for name in names if name.split(".")[0] in forbidden]
    assert wrong == []


def imports_of(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """Imports (even lazy ones) from files under `package` of any top-level `forbidden`."""
    wrong: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                      for name in names if name.split(".")[0] in forbidden]
    return wrong


def test_the_import_direction_has_no_cycle() -> None:
    # Top to bottom: regionlimit (the command line) -> central, region_node -> sync; the
    # client package stands alone (it installs without the server). Each may import only
    # what is below it, so no import cycle can form between the folders.
    server = ("central", "region_node", "regionlimit", "sync")
    rules = {
        "central": ("regionlimit", "region_node"),
        "region_node": ("regionlimit", "central"),
        "sync": ("regionlimit", "central", "region_node", "regionlimit_client"),
        "clients/python/regionlimit_client": server,
    }
    wrong = [line for package, forbidden in rules.items()
             for line in imports_of(package, forbidden)]
    assert wrong == []


def test_pure_central_modules_import_no_sql() -> None:
    # totals.py decides from rows in memory; the SQL that stores them is ledger.py's.
    wrong: list[str] = []
    for name in ("central/totals.py", "central/ledger_rows.py"):
        path = ROOT / name
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in ("sqlalchemy", "asyncpg", "aiosqlite")
                      or n in ("central.ledger", "central.models", "central.database")]
    assert wrong == []


def test_the_identifier_bound_has_one_home() -> None:
    # sync/identifiers.py owns 1..256 bytes; anything else spelling 256 out is a copy.
    copies = [f"{path.relative_to(ROOT)}:{number}"
              for package in ("central", "region_node", "regionlimit", "sync")
              for path in sorted((ROOT / package).rglob("*.py"))
              if path != ROOT / "sync" / "identifiers.py"
              for number, line in enumerate(path.read_text().splitlines(), start=1)
              if "identifier" in line.lower() and "256" in line]
    assert copies == []


def test_check_results_are_built_as_the_one_type() -> None:
    # region_node/check_result.py: no path writes the answer out as its own dict.
    dicts = [f"{path.relative_to(ROOT)}:{number}"
             for path in sorted((ROOT / "region_node").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if '"retry_after_ms":' in line or '"source":' in line]
    assert dicts == []


def test_only_sync_http_imports_a_web_framework() -> None:
    # sync/ is the shared bottom layer: wire messages and contract rules, importable by a
    # process without a web server. Its HTTP plumbing (used by both central and the node,
    # so it cannot live in either) is the one subpackage allowed a web framework.
    wrong = [line for line in imports_of("sync", ("fastapi", "starlette", "uvicorn"))
             if not line.startswith("sync/http/")]
    assert wrong == []


def test_callers_ask_the_algorithm_instead_of_branching_on_its_name() -> None:
    # sync/algorithms: blocks, past_windows, debits_remote, windowed_usage. Exempt: where
    # an override inherits `burst`, a field of the policy (only token buckets take one).
    names = ('"fixed_window"', '"sliding_window"', '"token_bucket"')
    exempt = {"central/config/store.py", "region_node/policy_file.py"}
    branches = [f"{name}:{number}"
                for package in ("central", "region_node")
                for path in sorted((ROOT / package).rglob("*.py"))
                if (name := str(path.relative_to(ROOT))) not in exempt
                for number, line in enumerate(path.read_text().splitlines(), start=1)
                if any(n in line for n in names) and "Literal[" not in line]
    assert branches == []
