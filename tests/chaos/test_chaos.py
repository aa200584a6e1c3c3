"""The chaos suite's quick experiments (tests/chaos/experiments.py), run in CI.

``bench/chaos.py --full`` runs these and the slow ones (leader kill, NATS kill, Postgres
outage, node kills, consistent mode) and prints allowed vs billed per experiment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.experiments import QUICK, ChaosSystem
from tests.support.nats_server import NatsServer

pytestmark = pytest.mark.chaos


@pytest.fixture
def system(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[ChaosSystem]:
    chaos = ChaosSystem(nats_server=nats_server, database_url=postgres_url, tmp=tmp_path)
    try:
        yield chaos
    finally:
        chaos.close()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_experiment_holds(name: str, system: ChaosSystem) -> None:
    outcome = QUICK[name](system)
    assert outcome.passed, outcome
