"""The README matches the code: every setting documented, CI runs its exact commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from central.settings import CentralSettings
from region_node.settings import NodeSettings
from regionlimit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Settings may be documented in README.md or in a page under docs/.
SETTINGS_DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


@pytest.mark.parametrize("settings", [NodeSettings, CentralSettings])
def test_every_setting_is_in_the_readme(settings: type) -> None:
    missing = [f"REGIONLIMIT_{name.upper()}" for name in settings.model_fields
               if f"`REGIONLIMIT_{name.upper()}`" not in SETTINGS_DOCS]
    assert missing == []


def test_ci_runs_exactly_the_readme_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    install = next(b for b in blocks if "pip install" in b).strip()
    test = next(b for b in blocks if b.strip() == ".venv/bin/pytest").strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci
    assert test in ci


def test_every_cli_command_is_documented() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"regionlimit {name}" in README, name
