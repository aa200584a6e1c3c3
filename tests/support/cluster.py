"""A whole regionlimit system as real processes: nats-server, central replicas, nodes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from central.database import make_engine
from central.migrate import run_migrations
from sync.identifiers import IdentifierHasher
from tests.support.nats_server import NatsServer
from tests.support.processes import (
    TEST_SECRET,
    ManagedProcess,
    base_env,
    free_port,
    regionlimit_command,
)

HOUR_MS = 3_600_000


def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
               ) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def avoid_window_boundary(duration_ms: int, *, span_s: float) -> None:
    """Sleep past the next window boundary if it would fall within the next ``span_s``."""
    now = time.time() * 1000
    to_boundary = duration_ms - now % duration_ms
    if to_boundary < span_s * 1000:
        time.sleep(to_boundary / 1000 + 0.05)


def metric_value(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in body.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def partitions_led(replica: ManagedProcess) -> list[int]:
    """The partitions a central replica leads (its /readyz); [] when it does not answer."""
    if replica.proc is None or replica.proc.poll() is not None:
        return []
    try:
        return list(httpx.get(replica.url + "/readyz", timeout=2).json()["partitions"])
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def partition0_holder(replicas: list[ManagedProcess]) -> ManagedProcess | None:
    """The replica leading partition 0 (which also splits per-region usage and answers
    the snapshot subject), once exactly one does."""
    holders = [r for r in replicas if 0 in partitions_led(r)]
    return holders[0] if len(holders) == 1 else None


class Cluster:
    def __init__(self, *, nats: NatsServer, database_url: str, tmp: Path,
                 policy_toml: str = "", env: dict[str, str] | None = None) -> None:
        self.nats = nats
        self.database_url = database_url
        self.tmp = tmp
        self.env = env or {}
        self.config = tmp / "policy.toml"
        self.config.write_text(policy_toml)
        self.hasher = IdentifierHasher(TEST_SECRET)
        self.processes: list[ManagedProcess] = []
        asyncio.run(run_migrations(database_url))

    def central(self, *, port: int | None = None) -> ManagedProcess:
        port = port or free_port()
        proc = ManagedProcess(
            regionlimit_command("central", "--port", str(port), "--database-url",
                                self.database_url, "--nats-url", self.nats.url),
            env=base_env(**self.env), url=f"http://127.0.0.1:{port}")
        self.processes.append(proc)
        return proc.start()

    def node(self, region: str, *, port: int | None = None, ready: bool = True
             ) -> ManagedProcess:
        port = port or free_port()
        env = base_env(REGIONLIMIT_SPILL_PATH=str(self.tmp / f"spill-{region}.msgpack"),
                       **self.env)
        proc = ManagedProcess(
            regionlimit_command("node", "--region", region, "--port", str(port), "--config",
                                str(self.config), "--nats-url", self.nats.url),
            env=env, url=f"http://127.0.0.1:{port}")
        self.processes.append(proc)
        proc.start(ready_path="/readyz" if ready else "/healthz")
        return proc

    def close(self) -> None:
        for proc in self.processes:
            proc.kill()

    # --- the ledger ------------------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[Any]:
        async def run() -> list[Any]:
            engine = make_engine(self.database_url)
            try:
                async with engine.connect() as connection:
                    return list(await connection.execute(text(sql), params))
            finally:
                await engine.dispose()
        return asyncio.run(run())

    def billed(self, namespace: str) -> tuple[int, int]:
        """Admitted and denied cost in the hourly usage buckets of ``namespace``."""
        row = self.query("SELECT COALESCE(SUM(admitted), 0), COALESCE(SUM(denied), 0) "
                         "FROM usage_hourly WHERE namespace = :ns", ns=namespace)[0]
        return int(row[0]), int(row[1])

    def components_total(self, namespace: str) -> int:
        row = self.query("SELECT COALESCE(SUM(admitted), 0) FROM components "
                         "WHERE namespace = :ns", ns=namespace)[0]
        return int(row[0])


def check(client: httpx.Client, url: str, namespace: str, identifier: str, cost: int = 1
          ) -> dict[str, Any]:
    response = client.post(f"{url}/v1/check", json={
        "namespace": namespace, "identifier": identifier, "cost": cost})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def paced(total: int, rate: float) -> Iterator[int]:
    """Yield 0..total-1 at a steady ``rate`` per second (catching up if behind)."""
    started = time.monotonic()
    for i in range(total):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def admin(url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    from tests.support.processes import TEST_ADMIN_TOKEN

    return httpx.request(method, url + path, json=body, timeout=10.0,
                         headers={"authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
