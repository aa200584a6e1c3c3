"""The docs match the code: every setting and command documented, CI runs the README's
commands, and every relative link in the docs leads to a file of the repository."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from pydantic_settings import BaseSettings

from regionlimit.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETTINGS_DOC = DOCS / "settings.md"
# Where the product's Python packages live (the client package has its own root).
SOURCE_ROOTS = (ROOT, ROOT / "clients" / "python")
NOT_PRODUCT = {".venv", ".git", "tests", "bench", "examples", "deploy", "docs", "build",
               "dist", "__pycache__", "migrations", "clients"}
NOT_SCANNED = {".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
               ".hypothesis", "node_modules", "build", "dist", "out"}


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------

def _product_modules() -> Iterator[str]:
    """Dotted names of the product modules that define a pydantic-settings class."""
    for source_root in SOURCE_ROOTS:
        if not source_root.is_dir():
            continue
        for path in sorted(source_root.rglob("*.py")):
            relative = path.relative_to(source_root)
            skip = NOT_PRODUCT - ({"clients"} if source_root != ROOT else set())
            if any(part in skip or part.endswith(".egg-info") for part in relative.parts):
                continue
            if source_root == ROOT and len(relative.parts) == 1:
                continue  # top-level scripts are not packages
            tree = ast.parse(path.read_text(), str(path))
            if any(isinstance(node, ast.ClassDef)
                   and any(ast.unparse(base).endswith("BaseSettings") for base in node.bases)
                   for node in ast.walk(tree)):
                yield ".".join(relative.with_suffix("").parts)


def _settings_classes() -> list[type[BaseSettings]]:
    classes: list[type[BaseSettings]] = []
    for module_name in _product_modules():
        module = importlib.import_module(module_name)
        classes += [value for value in vars(module).values()
                    if isinstance(value, type) and issubclass(value, BaseSettings)
                    and value is not BaseSettings and value.__module__ == module_name]
    return classes


SETTINGS_CLASSES = _settings_classes()


def test_the_settings_classes_are_found() -> None:
    names = {cls.__name__ for cls in SETTINGS_CLASSES}
    assert {"NodeSettings", "CentralSettings", "ClientSettings"} <= names


@pytest.mark.parametrize("settings", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_setting_is_in_the_settings_doc(settings: type[BaseSettings]) -> None:
    text = SETTINGS_DOC.read_text()
    prefix = settings.model_config.get("env_prefix", "")
    assert prefix == "REGIONLIMIT_"
    missing = [f"{prefix}{name.upper()}" for name in settings.model_fields
               if f"`{prefix}{name.upper()}`" not in text]
    assert missing == []


def test_the_access_log_setting_is_documented_off_by_default() -> None:
    # The node writes no line per check unless asked (issue 12).
    row = next(line for line in SETTINGS_DOC.read_text().splitlines()
               if line.startswith("| `REGIONLIMIT_ACCESS_LOG`"))
    assert "`false`" in row


# --------------------------------------------------------------------------------------
# README commands and CI
# --------------------------------------------------------------------------------------

INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e ./clients/python -e '.[dev]'"


def _sh_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_the_readme_installs_the_client_and_the_server() -> None:
    blocks = _sh_blocks(README.read_text())
    install = [b for b in blocks if ".venv/bin/pip install" in b]
    assert install == [INSTALL]


def test_ci_runs_exactly_the_readme_commands() -> None:
    blocks = _sh_blocks(README.read_text())
    install = next(b for b in blocks if ".venv/bin/pip install" in b)
    test = next(b for b in blocks if b == ".venv/bin/pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci
    assert test in ci


def test_the_readme_shows_the_client_package_for_apps() -> None:
    assert "pip install regionlimit-client" in README.read_text()


def test_the_readme_stays_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


# --------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------

def _commands(parser: argparse.ArgumentParser,
              prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                               argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(build_parser()))


def test_the_commands_are_found() -> None:
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"node", "central", "central migrate", "dev", "hash", "usage",
            "namespaces set", "overrides delete"} <= names


@pytest.mark.parametrize("words", [words for words, _ in COMMANDS], ids=" ".join)
def test_every_cli_command_is_documented(words: tuple[str, ...]) -> None:
    assert f"regionlimit {' '.join(words)}" in SETTINGS_DOC.read_text()


@pytest.mark.parametrize("words, parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_cli_flag_is_documented(words: tuple[str, ...],
                                      parser: argparse.ArgumentParser) -> None:
    text = SETTINGS_DOC.read_text()
    flags = [option for action in parser._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert [flag for flag in flags
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)] == []


# --------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------

LINK_RE = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_RE = re.compile(r"```.*?```", flags=re.S)


def _doc_files() -> list[Path]:
    files = [README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md",
             *sorted((ROOT / "bench" / "results").glob("*.md"))]
    return [path for path in files if path.exists()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = CODE_RE.sub("", path.read_text())
    return {_slug(match) for match in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def _relative_links(path: Path) -> list[str]:
    text = CODE_RE.sub("", path.read_text())
    links = [a or b for a, b in LINK_RE.findall(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for link in _relative_links(doc):
        target, _, fragment = link.partition("#")
        resolved = (doc.parent / unquote(target)).resolve() if target else doc
        inside = resolved == ROOT or ROOT in resolved.parents
        if not inside or not resolved.exists():
            broken.append(link)
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(link)
    assert broken == []


def test_the_docs_link_nothing_outside_the_repository() -> None:
    # The contract and design used to live beside the repository (../shared): a clone does
    # not have them, so the repository's own files must say everything.
    outside = "../" + "shared"
    found = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if (not path.is_file() or path == Path(__file__).resolve()
                or any(part in NOT_SCANNED or part.endswith(".egg-info")
                       for part in relative.parts)):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if outside in text:
            found.append(str(relative))
    assert found == []
