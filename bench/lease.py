"""Lease mode vs fast and consistent mode, three regions behind a simulated WAN.

    .venv/bin/python -m bench.lease [--limits 100,1000,10000] [--shapes all|quick]
        [--delays us=0,eu=40,ap=90] [--postgres URL]

Topology, all on 127.0.0.1: a hub nats-server (JetStream) with central (one replica) and
Postgres next to it; per region a leaf nats-server whose link to the hub goes through
bench/delay_proxy.py (default one-way 0 ms us, 40 ms eu, 90 ms ap), and a region node on
that leaf. So a consistent check from ap waits >= 180 ms for the authority, a lease refill
from ap as long, and fast-mode usage from ap reaches the others 90 ms + later.

For each mode (fast, consistent, lease), each limit, each load shape, a fresh key in an
inline fixed-window namespace (a calendar month, on_unavailable closed, timeout 2 s; the
script refuses to start within 10 minutes of a month's end) gets 1.2 x limit
of cost in single checks, open loop (cost 1 per check, or limit / 1000 for limits above
1,000, so that a run stays within what one shared machine can generate):
- even: a third per region; skewed: 80% from eu, 10% each from us and ap;
- steady: spread evenly over the run; bursty: four bursts of 50 ms, one per quarter.
The run lasts max(3 s, checks / 400 s); at most 64 requests per region are in flight
(latency is measured from when a request is sent).

Printed per run: admitted (allowed answers), over-admission (admitted - limit, if > 0),
false denials (limit - admitted when fewer than the limit were admitted although more was
asked: budget unspent while checks were denied, e.g. held in other regions' slices),
fallbacks, the share of checks the nodes answered with no network wait (lease: 1 -
lease_waits / checks from the nodes' metrics; fast: 1; consistent: 0), and the p99 latency
of a check as the load generator saw it (HTTP included). The plot goes to
bench/out/lease.png and the figures to bench/out/lease.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy.engine import make_url

from bench._cluster import DEFAULT_POSTGRES, OUT_DIR, machine, metric_value, percentile
from bench.consistent_bench import RawPool
from central.migrate import run_migrations
from regionlimit.dev import nats_server_binary
from tests.support.processes import ManagedProcess, base_env, free_port, regionlimit_command

HOST = "127.0.0.1"
MODES = ("fast", "consistent", "lease")
SKEW_REGION = "eu"
RATE = 400.0  # checks per second at most, all regions together (a shared 2-core machine)
MAX_IN_FLIGHT = 64  # per region: beyond that the generator queues (latency from sending)


@dataclass
class Run:
    mode: str
    limit: int
    spread: str
    pattern: str
    checks: int
    admitted: int
    fallbacks: int
    over_admission: int
    false_denials: int
    no_wait_share: float
    p50_ms: float
    p99_ms: float


class WanSystem:
    """Hub + leaves behind delay proxies + central + one node per region."""

    def __init__(self, *, postgres: str, delays: dict[str, float]) -> None:
        self.delays = delays
        self.tmp = Path(tempfile.mkdtemp(prefix="rl-lease-bench-"))
        admin = make_url(postgres).set(drivername="postgresql")
        self.admin_url = admin.render_as_string(hide_password=False)
        self.db_name = f"rl_bench_{uuid.uuid4().hex[:12]}"
        self.db_url = admin.set(database=self.db_name).render_as_string(hide_password=False)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.services: list[ManagedProcess] = []
        self.node_urls: dict[str, str] = {}
        self.central_url = ""

    def _nats(self, name: str, config: str) -> None:
        path = self.tmp / f"{name}.conf"
        path.write_text(config)
        self.procs.append(subprocess.Popen(
            [nats_server_binary(), "-c", str(path), "-l", str(self.tmp / f"{name}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

    def __enter__(self) -> WanSystem:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.db_name}"'))
        asyncpg_url = make_url(self.db_url).set(drivername="postgresql+asyncpg")
        database_url = asyncpg_url.render_as_string(hide_password=False)
        asyncio.run(run_migrations(database_url))
        hub, hub_leaf = free_port(), free_port()
        self._nats("hub", f'listen: "{HOST}:{hub}"\njetstream {{ store_dir: '
                          f'"{self.tmp / "js"}" }}\nleafnodes {{ listen: "{HOST}:{hub_leaf}" }}\n')
        leaves = {}
        for region, delay in self.delays.items():
            proxy, leaf = free_port(), free_port()
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.delay_proxy", "--listen", str(proxy),
                 "--target", f"{HOST}:{hub_leaf}", "--delay-ms", str(delay)],
                stdout=subprocess.DEVNULL))
            self._nats(f"leaf-{region}", f'listen: "{HOST}:{leaf}"\nleafnodes {{ remotes: '
                                         f'[{{ url: "nats-leaf://{HOST}:{proxy}" }}] }}\n')
            leaves[region] = f"nats://{HOST}:{leaf}"
        time.sleep(1.0)
        port = free_port()
        central = ManagedProcess(
            regionlimit_command("central", "--port", str(port), "--database-url",
                                database_url, "--nats-url", f"nats://{HOST}:{hub}"),
            env=base_env(REGIONLIMIT_LOG_LEVEL="warning"), url=f"http://{HOST}:{port}")
        self.services.append(central.start())
        self.central_url = central.url
        for region, leaf_url in leaves.items():
            port = free_port()
            node = ManagedProcess(
                regionlimit_command("node", "--region", region, "--port", str(port),
                                    "--nats-url", leaf_url),
                env=base_env(REGIONLIMIT_SPILL_PATH=str(self.tmp / f"spill-{region}"),
                             REGIONLIMIT_LOG_LEVEL="warning"),
                url=f"http://{HOST}:{port}")
            self.services.append(node.start(ready_path="/readyz", timeout=60))
            self.node_urls[region] = node.url
        return self

    def __exit__(self, *exc: object) -> None:
        for service in self.services:
            service.kill()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        try:
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"warning: could not drop {self.db_name}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def _admin(self, statement: str) -> None:
        connection = await asyncpg.connect(self.admin_url, timeout=30)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def node_counter(self, name: str) -> float:
        return sum(metric_value(httpx.get(url + "/metrics").text, name)
                   for url in self.node_urls.values())


def schedule(regions: list[str], checks: int, spread: str, pattern: str, seconds: float,
             rng: random.Random) -> list[tuple[float, str]]:
    """(due offset in seconds, region) for every check, in time order."""
    weights = ([1.0] * len(regions) if spread == "even"
               else [0.8 if r == SKEW_REGION else 0.2 / (len(regions) - 1) for r in regions])
    chosen = rng.choices(regions, weights, k=checks)
    if pattern == "steady":
        times = [i * seconds / checks for i in range(checks)]
    else:
        times = sorted((i % 4) * seconds / 4 + rng.random() * 0.05 for i in range(checks))
    return list(zip(times, chosen, strict=True))


async def drive(system: WanSystem, mode: str, limit: int, spread: str, pattern: str,
                rng: random.Random) -> tuple[list[dict[str, Any]], list[float]]:
    cost = max(1, limit // 1000)
    checks = int(limit * 1.2) // cost
    seconds = max(3.0, checks / RATE)
    namespace = f"{mode}-{limit}-{spread}-{pattern}"
    body = orjson.dumps({"namespace": namespace, "identifier": "bench-key", "limit": limit,
                         "cost": cost,
                         # A calendar month: no window boundary falls inside a run (an
                         # hour's boundary would hand a run a second budget).
                         "duration": "month", "algorithm": "fixed_window", "mode": mode,
                         "timeout": "2s", "on_unavailable": "closed"})
    pools = {region: RawPool(url + "/v1/check") for region, url in system.node_urls.items()}
    results: list[dict[str, Any]] = []
    latencies: list[float] = []

    in_flight = {region: asyncio.Semaphore(MAX_IN_FLIGHT) for region in pools}

    async def one(due: float, region: str, start: float) -> None:
        delay = start + due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with in_flight[region]:
            sent = time.monotonic()
            status, content = await pools[region].post(body)
            latencies.append(time.monotonic() - sent)
        if status == 200:
            results.append(orjson.loads(content))

    start = time.monotonic() + 0.1
    await asyncio.gather(*(one(due, region, start) for due, region in
                           schedule(list(pools), checks, spread, pattern, seconds, rng)))
    for pool in pools.values():
        await pool.close()
    return results, latencies


def measure(system: WanSystem, mode: str, limit: int, spread: str, pattern: str,
            rng: random.Random) -> Run:
    waits_before = system.node_counter("regionlimit_lease_waits_total")
    results, latencies = asyncio.run(drive(system, mode, limit, spread, pattern, rng))
    waits = system.node_counter("regionlimit_lease_waits_total") - waits_before
    cost = max(1, limit // 1000)
    admitted = sum(r["allowed"] for r in results) * cost
    fallbacks = sum(r["source"] == "fallback" for r in results)
    share = {"fast": 1.0, "consistent": 0.0}.get(mode, 1 - waits / max(1, len(results)))
    ordered = sorted(latencies)
    return Run(mode, limit, spread, pattern, len(results), admitted, fallbacks,
               max(0, admitted - limit), max(0, limit - admitted), share,
               percentile(ordered, 50) * 1000, percentile(ordered, 99) * 1000)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (over, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({f"{r.limit}\n{r.spread}/{r.pattern}" for r in runs},
                    key=lambda s: (int(s.split("\n")[0]), s))
    width = 0.27
    for i, mode in enumerate(MODES):
        by = {f"{r.limit}\n{r.spread}/{r.pattern}": r for r in runs if r.mode == mode}
        xs = [j + (i - 1) * width for j in range(len(labels))]
        over.bar(xs, [100 * by[k].over_admission / by[k].limit if k in by else 0
                      for k in labels], width, label=mode)
        latency.bar(xs, [by[k].p99_ms if k in by else 0 for k in labels], width, label=mode)
    for axis, title in ((over, "over-admission (% of limit)"),
                        (latency, "p99 check latency at the client (ms)")):
        axis.set_xticks(range(len(labels)), labels, fontsize=7, rotation=60)
        axis.set_title(title)
        axis.legend()
    latency.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", default="100,1000,10000")
    parser.add_argument("--shapes", choices=["all", "quick"], default="all",
                        help="all: even/skewed x steady/bursty; quick: even-steady and "
                             "skewed-bursty")
    parser.add_argument("--delays", default="us=0,eu=40,ap=90")
    parser.add_argument("--postgres", default=os.environ.get(
        "REGIONLIMIT_BENCH_POSTGRES", DEFAULT_POSTGRES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    delays = {r: float(d) for r, d in (item.split("=") for item in args.delays.split(","))}
    limits = [int(x) for x in args.limits.split(",")]
    shapes = ([(s, p) for s in ("even", "skewed") for p in ("steady", "bursty")]
              if args.shapes == "all" else [("even", "steady"), ("skewed", "bursty")])
    rng = random.Random(args.seed)
    now = time.time()
    if time.gmtime(now + 600).tm_mon != time.gmtime(now).tm_mon:
        raise SystemExit("a month ends within 10 minutes: run it after the boundary")
    print(machine())
    print(f"one-way delays to the hub (ms): {delays}")
    runs: list[Run] = []
    with WanSystem(postgres=args.postgres, delays=delays) as system:
        for limit in limits:
            for spread, pattern in shapes:
                for mode in args.modes.split(","):
                    run = measure(system, mode, limit, spread, pattern, rng)
                    runs.append(run)
                    print(f"{mode:10} limit {limit:>6} {spread:6} {pattern:6}: admitted "
                          f"{run.admitted:>6} over {run.over_admission:>5} false-denials "
                          f"{run.false_denials:>5} fallbacks {run.fallbacks:>4} no-wait "
                          f"{run.no_wait_share:6.1%} p50 {run.p50_ms:7.1f} ms p99 "
                          f"{run.p99_ms:7.1f} ms", flush=True)
        system_counters = {name: system.node_counter(f"regionlimit_{name}_total")
                           for name in ("lease_requests", "lease_requests_failed",
                                        "lease_waits", "lease_returns")}
    counters = {name: system_counters[name] for name in system_counters}
    print(f"lease requests from the nodes: {counters}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "lease.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    plot(runs, OUT_DIR / "lease.png")
    print(f"wrote {OUT_DIR / 'lease.json'} and {OUT_DIR / 'lease.png'}")


if __name__ == "__main__":
    main()
