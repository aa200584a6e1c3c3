"""Fixtures of the in-process integration tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No REGIONLIMIT_ variable of the caller's shell reaches the settings under test."""
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)
