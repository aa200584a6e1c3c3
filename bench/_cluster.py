"""Shared pieces of the sync benchmarks: a whole system on loopback, machine facts, stats.

`BenchCluster` starts its own nats-server (JetStream, free port, temp store), creates a
throwaway Postgres database (`rl_bench_<hex>`, dropped on exit) on the server named by
`--postgres` / `$REGIONLIMIT_BENCH_POSTGRES` (default postgresql://postgres@127.0.0.1:5432/
postgres), and runs `regionlimit central` and region nodes as real processes through
`tests.support.cluster.Cluster`, with the product's default intervals (flush 100 ms, tick
100 ms, commit 1 s) unless told otherwise. The processes' logs of the last run are left in
bench/out/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy.engine import make_url

from tests.support.cluster import Cluster, metric_value
from tests.support.nats_server import NatsServer

DEFAULT_POSTGRES = os.environ.get("REGIONLIMIT_BENCH_POSTGRES",
                                  "postgresql://postgres@127.0.0.1:5432/postgres")
OUT_DIR = Path(__file__).parent / "out"


# --- machine ---------------------------------------------------------------------------------

def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}; "
            f"Python {platform.python_version()}; load average before the run "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def load_after() -> str:
    load = os.getloadavg()
    return f"load average after the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES,
                        help="admin URL of a Postgres server to create a throwaway database on")


# --- statistics ------------------------------------------------------------------------------

def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``samples``."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def histogram_buckets(body: str, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of a Prometheus histogram, summed over labels."""
    buckets: dict[float, float] = {}
    for line in body.splitlines():
        match = re.match(rf'^{re.escape(name)}_bucket\{{.*le="([^"]+)".*\}} (\S+)$', line)
        if match:
            bound = float("inf") if match.group(1) == "+Inf" else float(match.group(1))
            buckets[bound] = buckets.get(bound, 0.0) + float(match.group(2))
    return sorted(buckets.items())


def bucket_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]
                 ) -> list[tuple[float, float]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in after]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5.0).text


# --- the system ------------------------------------------------------------------------------

class BenchCluster:
    """nats-server + throwaway Postgres database + central + region nodes, all on loopback."""

    def __init__(self, *, postgres: str, regions: tuple[str, ...] = ("us", "eu", "ap"),
                 policy_toml: str = "", env: dict[str, str] | None = None) -> None:
        self.admin_url = make_url(postgres).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.regions = regions
        self.policy_toml = policy_toml
        self.env = env or {}
        self.db_name = f"rl_bench_{uuid.uuid4().hex[:12]}"
        self.db_url = make_url(self.admin_url).set(database=self.db_name).render_as_string(
            hide_password=False)
        self.tmp = Path(tempfile.mkdtemp(prefix="rl-bench-"))
        self.nats: NatsServer | None = None
        self.cluster: Cluster | None = None
        self.central_url = ""
        self.node_urls: list[str] = []
        self.started = 0.0  # monotonic time central was started

    def __enter__(self) -> BenchCluster:
        try:
            self._admin(f'CREATE DATABASE "{self.db_name}"')
            self.nats = NatsServer(self.tmp / "nats").start()
            asyncpg_url = make_url(self.db_url).set(
                drivername="postgresql+asyncpg").render_as_string(hide_password=False)
            self.cluster = Cluster(nats=self.nats, database_url=asyncpg_url, tmp=self.tmp,
                                   policy_toml=self.policy_toml, env=self.env)
            self.started = time.monotonic()
            self.central_url = self.cluster.central().url
            self.node_urls = [self.cluster.node(region).url for region in self.regions]
            self._wait_in_sync()
        except BaseException:
            self.dump_logs()
            self.close()
            raise
        return self

    def _wait_in_sync(self, timeout: float = 60.0) -> None:
        """Central leads and every node has loaded a snapshot (sync: ok)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = metric_value(metrics(self.central_url), "regionlimit_central_leader")
            states = [httpx.get(url + "/readyz", timeout=5.0).json().get("sync")
                      for url in self.node_urls]
            if leader == 1.0 and all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise TimeoutError(f"system not in sync within {timeout}s (leader {leader}, nodes "
                           f"{states})")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.dump_logs()
        self.close()

    def dump_logs(self, lines: int = 30) -> None:
        """The tail of every process log (on failure; the logs are deleted on close)."""
        if self.cluster is None:
            return
        for proc in self.cluster.processes:
            tail = proc.log().splitlines()[-lines:]
            print(f"--- {' '.join(proc.args[2:5])} ({proc.url}) log tail ---")
            print("\n".join(tail))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            logs = OUT_DIR / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            names = ["central", *(f"node-{region}" for region in self.regions)]
            for name, proc in zip(names, self.cluster.processes, strict=False):
                # Kept for a look after the run (the last run's only), then removed.
                shutil.copyfile(proc.log_path, logs / f"{name}.log")
                proc.log_path.unlink(missing_ok=True)
            self.cluster = None
        if self.nats is not None:
            self.nats.close()
            self.nats = None
        try:
            self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"warning: could not drop database {self.db_name}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def pids(self) -> dict[str, int]:
        """Process ids: central, the nodes by region, nats-server."""
        assert self.cluster is not None and self.nats is not None and self.nats.proc
        procs = self.cluster.processes
        found = {"central": procs[0].proc.pid}  # type: ignore[union-attr]
        for region, proc in zip(self.regions, procs[1:], strict=True):
            found[f"node-{region}"] = proc.proc.pid  # type: ignore[union-attr]
        found["nats-server"] = self.nats.proc.pid
        return found

    def _admin(self, statement: str) -> None:
        async def run() -> None:
            connection = await asyncpg.connect(self.admin_url, timeout=30)
            try:
                await connection.execute(statement)
            finally:
                await connection.close()
        asyncio.run(run())

    def sql(self, statement: str) -> list[Any]:
        """Run a query on the bench database (a fresh connection each time)."""
        async def run() -> list[Any]:
            connection = await asyncpg.connect(self.db_url, timeout=30)
            try:
                return list(await connection.fetch(statement))
            finally:
                await connection.close()
        return asyncio.run(run())

    def central_metric(self, name: str, **labels: str) -> float:
        return metric_value(metrics(self.central_url), name, **labels)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks




# --- load ------------------------------------------------------------------------------------

class PacedBatches:
    """One thread per node URL, each posting `/v1/check/batch` bodies at a steady pace.

    ``bodies[i]`` is a list of (body bytes, checks in it) cycled through by thread i;
    thread i sends ``batches_per_s[i]`` bodies a second (catching up when behind, never
    bursting ahead). Counts answers and admissions from the responses.
    """

    def __init__(self, urls: list[str], bodies: list[list[tuple[bytes, int]]],
                 batches_per_s: list[float], *, duration_s: float) -> None:
        self.urls = urls
        self.bodies = bodies
        self.batches_per_s = batches_per_s
        self.duration_s = duration_s
        self.answered = [0] * len(urls)
        self.admitted = [0] * len(urls)
        self.requests = [0] * len(urls)
        self.errors: list[str] = []
        self.late_s = [0.0] * len(urls)  # how far behind schedule each thread ended
        self.max_rtt_s = [0.0] * len(urls)  # slowest request of each thread
        self.elapsed_s = 0.0

    def run(self) -> PacedBatches:
        start = time.monotonic() + 0.05
        threads = [threading.Thread(target=self._run, args=(i, start), daemon=True)
                   for i in range(len(self.urls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The schedule's span, or longer if the threads fell behind it.
        nominal = max(round(self.duration_s * rate) / rate for rate in self.batches_per_s)
        self.elapsed_s = max(time.monotonic() - start, nominal)
        return self

    def _run(self, index: int, start: float) -> None:
        url = self.urls[index] + "/v1/check/batch"
        bodies = self.bodies[index]
        period = 1.0 / self.batches_per_s[index]
        total = max(1, round(self.duration_s * self.batches_per_s[index]))
        headers = {"content-type": "application/json"}
        with httpx.Client(timeout=10.0, headers=headers) as client:
            for n in range(total):
                delay = start + n * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                body, _ = bodies[n % len(bodies)]
                sent = time.monotonic()
                try:
                    response = client.post(url, content=body)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.max_rtt_s[index] = max(self.max_rtt_s[index], time.monotonic() - sent)
                self.requests[index] += 1
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                for result in orjson.loads(response.content)["results"]:
                    if "allowed" not in result:
                        self.errors.append(str(result)[:200])
                        continue
                    self.answered[index] += 1
                    self.admitted[index] += result["allowed"]
            self.late_s[index] = max(0.0, time.monotonic() - (start + total * period))

    @property
    def total_answered(self) -> int:
        return sum(self.answered)

    @property
    def total_admitted(self) -> int:
        return sum(self.admitted)

    @property
    def achieved_rate(self) -> float:
        return self.total_answered / self.elapsed_s if self.elapsed_s else 0.0
