"""Consistent mode against fast mode, through a region node on loopback.

    .venv/bin/python -m bench.consistent_bench [--seconds 10] [--rate 500] [--clients 64]
        [--keys 100] [--postgres URL] [--py-spy] [--client raw|httpx]
        [--lanes-seconds 3] [--json FILE]

A whole system runs as processes, the product's defaults: its own nats-server (free port,
temp JetStream store), a throwaway Postgres database (`rl_bench_<hex>`, dropped on exit)
on the server named by --postgres / $REGIONLIMIT_BENCH_POSTGRES, one `regionlimit
central` and one `regionlimit node` (bench/_cluster.py). Two namespaces are configured
through the admin API, both fixed_window 1h with a limit no run reaches (so every check
is admitted and the figures are the cost of the decision, not of denials):
- `cb`: mode consistent, timeout 1s, on_unavailable closed (a fallback would show as
  `source: fallback` and is counted, never mistaken for an authority answer);
- `fb`: mode fast.

Scenarios, each for --seconds, each with --keys identifiers round-robin and with one hot
identifier, after a warm-up that creates every key:
- paced: an open-loop generator (asyncio, pooled keep-alive connections) sends
  --rate checks/s on a fixed schedule whatever the answers do; latency is measured from
  each request's SCHEDULED send time, so a stall is charged to every request it delays
  (no coordinated omission). "late" is how far behind schedule the generator itself
  started requests (its own share of the latency on a busy machine).
- saturation: --clients closed-loop clients (one request in flight each), as fast as
  answers come; latency from the actual send.
The generator's HTTP client is a minimal keep-alive HTTP/1.1 client on asyncio streams
(--client raw, the default: a free list of connections, a new one whenever all are
busy) or httpx.AsyncClient with a connection pool (--client httpx). httpx is too costly
to share two cores with the system under test: measured here ~1.4 ms CPU per request
one at a time and ~11 ms per request with 64 requests in flight on one pool (httpcore's
pool bookkeeping), so with httpx the generator, not the system, sets the figures.

Targets (DESIGN, consistent mode): paced p99 <= 5 ms; saturation >= 2,000 checks/s per
central replica.

Also printed: central's `regionlimit_consistent_batch_size` histogram over each scenario
(decisions per transaction), the node's `regionlimit_check_duration_seconds` (the node's
wait for the authority, HTTP excluded), CPU seconds per process per scenario (load
generator, node, central, nats-server, all Postgres processes), an in-process timing of
one lane's transaction per batch size (no NATS, no HTTP), the same with 1 or 4 lanes
in flight (and whether the stored counts stay exact), and with
--py-spy a profile of central during a consistent saturation run.

Everything shares the machine: on a 2-core box the load generator, node, central,
nats-server and Postgres compete for the same two cores, so the figures are a floor for
a deployment where they do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench._cluster import (
    OUT_DIR,
    BenchCluster,
    bucket_delta,
    common_args,
    cpu_seconds,
    histogram_buckets,
    histogram_quantile,
    load_after,
    machine,
    metrics,
    percentile,
)
from central.consistent.tx import decisions_for
from central.database import make_engine
from sync.clock import wall_clock_ms
from sync.messages import ConsistentRequest
from sync.policy import build_policy
from tests.support.cluster import admin, metric_value, wait_until

CONSISTENT_NS = "cb"
FAST_NS = "fb"
LIMIT = 1_000_000_000_000
TARGET_P99_MS = 5.0
TARGET_RPS = 2000.0
HEADERS = {"content-type": "application/json"}
SHARED_NOTE = ("NOTE: {n} CPU core(s) shared by the load generator, the node, central, "
               "nats-server and Postgres: every figure below is measured with all of them "
               "competing for the same cores.")


# --- load --------------------------------------------------------------------------------------

def bodies(namespace: str, keys: int) -> list[bytes]:
    if keys == 1:
        return [orjson.dumps({"namespace": namespace, "identifier": "hot-key"})]
    return [orjson.dumps({"namespace": namespace, "identifier": f"key-{i}"})
            for i in range(keys)]


class Tally:
    def __init__(self) -> None:
        self.latency_ms: list[float] = []
        self.late_ms: list[float] = []
        self.sources: Counter[str] = Counter()
        self.denied = 0
        self.errors: Counter[str] = Counter()
        self.elapsed = 0.0

    def answer(self, status: int, content: bytes, latency_s: float) -> None:
        self.latency_ms.append(latency_s * 1000)
        if status != 200:
            self.errors[f"HTTP {status}"] += 1
            return
        result = orjson.loads(content)
        self.sources[result["source"]] += 1
        self.denied += not result["allowed"]


class RawPool:
    """Keep-alive HTTP/1.1 POSTs over raw asyncio streams: a free list of connections,
    a new one opened whenever all are busy (so an open-loop schedule is never throttled
    by the pool). Responses are Content-Length framed (uvicorn's are)."""

    def __init__(self, url: str) -> None:
        hostport, _, path = url.removeprefix("http://").partition("/")
        self.host, _, port = hostport.partition(":")
        self.port = int(port)
        self.head = (f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.free:
            reader, writer = self.free.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        start = head.lower().find(b"content-length:") + 15
        length = int(head[start:head.find(b"\r\n", start)])
        content = await reader.readexactly(length)
        self.free.append((reader, writer))
        return status, content

    async def close(self) -> None:
        for _, writer in self.free:
            writer.close()
        self.free.clear()


class HttpxPool:
    """The same interface over one httpx.AsyncClient with a connection pool (costly as
    a generator: see the module doc)."""

    def __init__(self, url: str, connections: int) -> None:
        self.url = url
        limits = httpx.Limits(max_connections=connections,
                              max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(limits=limits, timeout=30.0, headers=HEADERS)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        response = await self.client.post(self.url, content=body)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


def new_pool(kind: str, url: str, connections: int) -> RawPool | HttpxPool:
    return RawPool(url) if kind == "raw" else HttpxPool(url, connections)


async def paced(pool: RawPool | HttpxPool, payloads: list[bytes], rate: float,
                seconds: float) -> Tally:
    """Open loop: request i is due at start + i / rate, sent then whatever came back."""
    tally = Tally()
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    total = int(rate * seconds)
    try:
        await pool.post(payloads[0])  # one connection up before the clock

        async def one(i: int, due: float) -> None:
            tally.late_ms.append((clock() - due) * 1000)
            try:
                status, content = await pool.post(payloads[i % len(payloads)])
            except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                tally.errors[type(exc).__name__] += 1
                return
            tally.answer(status, content, clock() - due)

        start = clock() + 0.05
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        tally.elapsed = clock() - start
    finally:
        await pool.close()
    return tally


async def saturate(pool: RawPool | HttpxPool, payloads: list[bytes], clients: int,
                   seconds: float) -> Tally:
    """Closed loop: ``clients`` workers, one request in flight each."""
    tally = Tally()
    clock = time.perf_counter
    try:
        await asyncio.gather(*(pool.post(payloads[0]) for _ in range(clients)))
        start = clock()
        deadline = start + seconds

        async def worker(index: int) -> None:
            i = index
            while clock() < deadline:
                sent = clock()
                try:
                    status, content = await pool.post(payloads[i % len(payloads)])
                except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    continue
                tally.answer(status, content, clock() - sent)
                i += clients

        await asyncio.gather(*(worker(n) for n in range(clients)))
        tally.elapsed = clock() - start
    finally:
        await pool.close()
    return tally


def run_async(factory: Callable[..., Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(factory())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())


# --- measurement around a scenario -----------------------------------------------------------

def postgres_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {"load generator": time.process_time()}
    for name, pid in pids.items():
        try:
            snap[name] = cpu_seconds(pid)
        except OSError:
            snap[name] = 0.0
    total = 0.0
    for pid in postgres_pids():
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    snap["postgres (all)"] = total
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    snap["other processes"] = busy - sum(snap.values())
    return snap


class Probe:
    """Central and node metrics and per-process CPU, before and after a scenario."""

    BATCH = "regionlimit_consistent_batch_size"
    NODE_LATENCY = "regionlimit_check_duration_seconds"

    def __init__(self, bench: BenchCluster) -> None:
        self.bench = bench
        self.pids = {k: v for k, v in bench.pids.items() if k != "postgres"}

    def snapshot(self) -> dict[str, Any]:
        central = metrics(self.bench.central_url)
        node = metrics(self.bench.node_urls[0])
        return {"batch": histogram_buckets(central, self.BATCH),
                "batch_sum": metric_value(central, f"{self.BATCH}_sum"),
                "decisions": metric_value(central, "regionlimit_consistent_decisions_total"),
                "authority_errors": metric_value(central, "regionlimit_authority_errors_total"),
                "node_latency": histogram_buckets(node, self.NODE_LATENCY),
                "cpu": cpu_snapshot(self.pids), "wall": time.monotonic()}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        batch = bucket_delta(after["batch"], before["batch"])
        node = bucket_delta(after["node_latency"], before["node_latency"])
        wall = after["wall"] - before["wall"]
        transactions = batch[-1][1] if batch else 0.0
        decided = after["batch_sum"] - before["batch_sum"]
        return {
            "transactions": transactions,
            "decisions": after["decisions"] - before["decisions"],
            "authority_errors": after["authority_errors"] - before["authority_errors"],
            "batch_mean": decided / transactions if transactions else float("nan"),
            "batch_p50": histogram_quantile(0.5, batch),
            "batch_p90": histogram_quantile(0.9, batch),
            "batch_p99": histogram_quantile(0.99, batch),
            "batch_buckets": [(b, c) for b, c in batch],
            "node_wait_p50_ms": histogram_quantile(0.5, node) * 1000,
            "node_wait_p99_ms": histogram_quantile(0.99, node) * 1000,
            "cpu_pct": {name: 100 * (after["cpu"][name] - before["cpu"].get(name, 0.0)) / wall
                        for name in after["cpu"]},
        }


def summarize(name: str, tally: Tally, probe: dict[str, Any]) -> dict[str, Any]:
    lat = tally.latency_ms
    elapsed = tally.elapsed
    row: dict[str, Any] = {
        "scenario": name, "checks": len(lat), "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 50) if lat else float("nan"),
        "p90_ms": percentile(lat, 90) if lat else float("nan"),
        "p99_ms": percentile(lat, 99) if lat else float("nan"),
        "max_ms": max(lat) if lat else float("nan"),
        "late_p99_ms": percentile(tally.late_ms, 99) if tally.late_ms else None,
        "sources": dict(tally.sources), "denied": tally.denied, "errors": dict(tally.errors),
        **probe}
    return row


def print_row(row: dict[str, Any]) -> None:
    late = f"  gen-late p99 {row['late_p99_ms']:6.2f}" if row["late_p99_ms"] is not None else ""
    print(f"  {row['scenario']:<34} {row['rps']:8.0f}/s  p50 {row['p50_ms']:6.2f}  "
          f"p90 {row['p90_ms']:6.2f}  p99 {row['p99_ms']:7.2f}  max {row['max_ms']:7.1f} ms"
          f"{late}")
    extra = [f"sources {row['sources']}"]
    if row["denied"] or row["errors"]:
        extra.append(f"denied {row['denied']} errors {row['errors']}")
    if row["transactions"]:
        extra.append(f"central: {row['decisions']:.0f} decisions in {row['transactions']:.0f} "
                     f"tx, batch mean {row['batch_mean']:.1f} p50 {row['batch_p50']:.1f} "
                     f"p90 {row['batch_p90']:.1f} p99 {row['batch_p99']:.1f}; node wait for "
                     f"authority p50 {row['node_wait_p50_ms']:.2f} p99 "
                     f"{row['node_wait_p99_ms']:.2f} ms")
    print("      " + "; ".join(extra))
    cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in row["cpu_pct"].items())
    print(f"      CPU (100% = one core): {cpu}")
    if row["rps"]:
        generator = row["cpu_pct"]["load generator"] / 100 / row["rps"] * 1000
        print(f"      load generator CPU per check {generator:.3f} ms")


# --- the authority alone ----------------------------------------------------------------------

def _median(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


async def authority_alone(database_url: str, repeats: int) -> dict[str, Any]:
    """The authority's transaction without NATS or HTTP, against the bench database: one
    lane's decide per batch size, and the building blocks (a round trip, a pool checkout
    with its pre-ping, a commit's WAL flush)."""
    policy = build_policy(limit=LIMIT, duration="1h", algorithm="fixed_window",
                          mode="consistent", timeout="1s", on_unavailable="closed")
    engine = make_engine(database_url)
    decider = decisions_for(engine, wall_clock_ms)  # a lane's: one connection, kept
    decide: list[dict[str, Any]] = []
    try:
        for size in (1, 8, 32, 64, 128):
            for label, keys in (("distinct keys", size), ("one key", 1)):
                if size == 1 and label == "one key":
                    continue
                requests = [ConsistentRequest("alone", f"{i % keys:032x}", 1, policy,
                                              "bench-node", "us") for i in range(size)]
                await decider.decide(requests)  # rows exist from here on
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    await decider.decide(requests)
                    samples.append((time.perf_counter() - started) * 1000)
                median = _median(samples)
                decide.append({"batch": size, "keys": label, "median_ms": median,
                               "p90_ms": sorted(samples)[int(len(samples) * 0.9)],
                               "decisions_per_s": size / median * 1000})

        plain = make_url(database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        blocks: dict[str, float] = {}
        connection = await asyncpg.connect(plain)
        try:
            await connection.execute("CREATE TABLE IF NOT EXISTS bench_commit (k int primary "
                                     "key, v bigint)")
            await connection.execute("INSERT INTO bench_commit VALUES (1, 0) ON CONFLICT "
                                     "DO NOTHING")
            rtt = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                await connection.fetchval("SELECT 1")
                rtt.append((time.perf_counter() - t0) * 1000)
            blocks["one round trip (asyncpg SELECT 1)"] = _median(rtt)
            for setting in ("on", "off"):
                await connection.execute(f"SET synchronous_commit = {setting}")
                commits = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    async with connection.transaction():
                        await connection.execute("UPDATE bench_commit SET v = v + 1 "
                                                 "WHERE k = 1")
                    commits.append((time.perf_counter() - t0) * 1000)
                blocks[f"BEGIN + 1-row UPDATE + COMMIT, synchronous_commit={setting}"] = (
                    _median(commits))
            await connection.execute("DROP TABLE bench_commit")
        finally:
            await connection.close()
        for ping in (True, False):
            probe = make_engine(database_url, pool_pre_ping=ping)
            try:
                async with probe.begin():
                    pass
                empty = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    async with probe.begin():
                        pass
                    empty.append((time.perf_counter() - t0) * 1000)
            finally:
                await probe.dispose()
            blocks[f"SQLAlchemy engine.begin() empty (checkout, BEGIN, COMMIT), "
                   f"pool_pre_ping={ping}"] = _median(empty)
    finally:
        await decider.close()
        await engine.dispose()
    return {"decide": decide, "blocks": blocks}


async def lanes_in_process(database_url: str, seconds: float) -> list[dict[str, Any]]:
    """Decisions/s and transaction latency of the authority's transaction, in process,
    with 1 or 4 lanes in flight on disjoint keys; 'exact' = the stored counts equal the
    decisions made."""
    policy = build_policy(limit=LIMIT, duration="1h", algorithm="fixed_window",
                          mode="consistent", timeout="1s", on_unavailable="closed")
    engine = make_engine(database_url, pool_size=8)
    out = []
    try:
        for lanes in (1, 4):
            for batch in (1, 16, 64):
                namespace = f"lanes-{lanes}-{batch}-{time.time_ns()}"
                deciders = [decisions_for(engine, wall_clock_ms) for _ in range(lanes)]
                tx_ms: list[float] = []
                decided = 0

                async def lane(index: int, decider: Any, namespace: str = namespace,
                               batch: int = batch, tx_ms: list[float] = tx_ms) -> None:
                    nonlocal decided
                    requests = [ConsistentRequest(namespace, f"{index:04d}{i:028x}", 1,
                                                  policy, "bench", "us")
                                for i in range(batch)]
                    await decider.decide(requests)  # create the rows
                    decided += batch
                    deadline = time.perf_counter() + seconds
                    while time.perf_counter() < deadline:
                        t0 = time.perf_counter()
                        await decider.decide(requests)
                        tx_ms.append((time.perf_counter() - t0) * 1000)
                        decided += batch

                started = time.perf_counter()
                await asyncio.gather(*(lane(i, d) for i, d in enumerate(deciders)))
                elapsed = time.perf_counter() - started
                for decider in deciders:
                    await decider.close()
                async with engine.connect() as connection:
                    stored = (await connection.execute(text(
                        "SELECT COALESCE(SUM(cur), 0) FROM consistent_keys "
                        "WHERE namespace = :ns"), {"ns": namespace})).scalar_one()
                out.append({"lanes": lanes, "batch": batch,
                            "decisions_per_s": decided / elapsed,
                            "tx_p50_ms": percentile(tx_ms, 50),
                            "tx_p99_ms": percentile(tx_ms, 99),
                            "exact": int(stored) == decided})
    finally:
        await engine.dispose()
    return out


def collapse_summary(raw: Path, top: int = 25) -> list[str]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[_short(frame)] += count
        own[_short(frames[-1])] += count
    lines = [f"{total} samples; inclusive share:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines.append("own (self) share:")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return lines


def _short(frame: str) -> str:
    # "function (path/to/module.py:line)" -> "function (module.py:line)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else where
    return f"{name} ({tail})"


# --- main -------------------------------------------------------------------------------------

def configure(bench: BenchCluster) -> None:
    for name, mode in ((CONSISTENT_NS, "consistent"), (FAST_NS, "fast")):
        response = admin(bench.central_url, "PUT", f"/v1/namespaces/{name}", {
            "limit": LIMIT, "duration": "1h", "algorithm": "fixed_window", "mode": mode,
            "timeout": "1s", "on_unavailable": "closed"})
        assert response.status_code == 200, response.text
    node = bench.node_urls[0]

    def applied() -> bool:
        for name, mode in ((CONSISTENT_NS, "consistent"), (FAST_NS, "fast")):
            r = httpx.post(node + "/v1/check", json={"namespace": name, "identifier": "probe",
                                                     "cost": 0})
            if r.status_code != 200 or (r.json()["limit"], r.json()["mode"]) != (LIMIT, mode):
                return False
        return True
    wait_until(applied, timeout=20, what="both namespaces configured on the node")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--rate", type=float, default=500.0, help="paced checks/s")
    parser.add_argument("--clients", type=int, default=64, help="saturation concurrency")
    parser.add_argument("--keys", type=int, default=100, help="identifiers (besides the hot one)")
    parser.add_argument("--repeats", type=int, default=200,
                        help="in-process transaction samples per batch size")
    parser.add_argument("--py-spy", action="store_true",
                        help="profile central with py-spy during an extra consistent "
                             "saturation run")
    parser.add_argument("--lanes-seconds", type=float, default=3.0,
                        help="per configuration of the in-process lanes measurement")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="load generator HTTP client (see the module doc)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"also write the figures as JSON (e.g. {OUT_DIR}/consistent.json)")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(machine())
    print(SHARED_NOTE.format(n=cores))
    print(f"scenarios: {args.seconds:.0f} s each; paced {args.rate:.0f} checks/s (open loop); "
          f"saturation {args.clients} closed-loop clients; {args.keys} keys or 1 hot key\n")

    rows: list[dict[str, Any]] = []
    with BenchCluster(postgres=args.postgres, regions=("us",)) as bench:
        configure(bench)
        probe = Probe(bench)
        url = bench.node_urls[0] + "/v1/check"
        keysets = ((f"{args.keys} keys", args.keys), ("hot key", 1))

        print("warm-up (creates every key on both paths)...")
        for ns in (CONSISTENT_NS, FAST_NS):
            for _, keys in keysets:
                run_async(lambda ns=ns, keys=keys: saturate(
                    new_pool(args.client, url, args.clients), bodies(ns, keys),
                    args.clients, 1.5))

        print("\nscenario                               throughput      latency (ms, from "
              "scheduled send when paced)")
        for load in ("paced", "saturation"):
            for ns, mode in ((FAST_NS, "fast"), (CONSISTENT_NS, "consistent")):
                for label, keys in keysets:
                    name = (f"{mode} {load} "
                            f"{args.rate:.0f}/s" if load == "paced" else
                            f"{mode} {load} x{args.clients}") + f" {label}"
                    payloads = bodies(ns, keys)
                    before = probe.snapshot()
                    if load == "paced":
                        tally = run_async(lambda p=payloads: paced(
                            new_pool(args.client, url, 256), p, args.rate, args.seconds))
                    else:
                        tally = run_async(lambda p=payloads: saturate(
                            new_pool(args.client, url, args.clients), p, args.clients,
                            args.seconds))
                    row = summarize(name, tally, Probe.delta(before, probe.snapshot()))
                    row.update(mode=mode, load=load, keys=keys)
                    rows.append(row)
                    print_row(row)

        print("\none lane's transaction in process (no NATS, no HTTP), "
              "system otherwise idle:")
        alone = run_async(lambda: authority_alone(
            bench.cluster.database_url, args.repeats))  # type: ignore[union-attr]
        for a in alone["decide"]:
            print(f"  batch {a['batch']:>3} {a['keys']:<13} median {a['median_ms']:6.2f} ms  "
                  f"p90 {a['p90_ms']:6.2f} ms  -> {a['decisions_per_s']:8.0f} decisions/s "
                  f"back to back")
        print("  building blocks (median):")
        for part, ms in alone["blocks"].items():
            print(f"    {ms:6.2f} ms  {part}")

        print(f"\nthe authority's transaction in process ({args.lanes_seconds:.0f} s each), "
              "1 or 4 lanes in flight on disjoint keys; 'exact' = the stored counts equal "
              "the decisions made:")
        lanes = run_async(lambda: lanes_in_process(
            bench.cluster.database_url, args.lanes_seconds))  # type: ignore[union-attr]
        for w in lanes:
            print(f"  lanes {w['lanes']} batch {w['batch']:>3}: "
                  f"{w['decisions_per_s']:7.0f} decisions/s  tx p50 {w['tx_p50_ms']:6.2f} ms  "
                  f"p99 {w['tx_p99_ms']:6.2f} ms  exact {w['exact']}")

        profile: list[str] = []
        if args.py_spy:
            profile = profile_saturation(bench, url, args)

        pg = bench.sql("SELECT current_setting('synchronous_commit') AS sc, "
                       "current_setting('fsync') AS fs")[0]
        print(f"\nPostgres: synchronous_commit={pg['sc']}, fsync={pg['fs']} (every "
              "transaction waits for its WAL flush)")

    print(load_after())
    verdicts = report_targets(rows, args)
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "cores": cores, "rows": rows,
                                     "authority_alone": alone, "lanes": lanes,
                                     "profile": profile,
                                     "verdicts": verdicts}, indent=2, default=str))
    print(f"results: {args.json}")


def profile_saturation(bench: BenchCluster, url: str, args: argparse.Namespace) -> list[str]:
    out_dir = Path(tempfile.mkdtemp(prefix="rl-spy-"))
    raw = out_dir / "central.collapsed"
    spy = str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not installed (.venv/bin/pip install py-spy)")
        return []
    pid = bench.pids["central"]
    print(f"\npy-spy on central (pid {pid}) during {args.seconds:.0f} s of consistent "
          f"saturation x{args.clients}, {args.keys} keys:")
    spy_proc = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(args.seconds)),
                                 "-r", "200", "-f", "raw", "-o", str(raw), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    tally = run_async(lambda: saturate(new_pool(args.client, url, args.clients),
                                       bodies(CONSISTENT_NS, args.keys), args.clients,
                                       args.seconds))
    spy_proc.wait(timeout=60)
    print(f"  (throughput under the profiler: {len(tally.latency_ms) / tally.elapsed:.0f}/s)")
    if not raw.exists():
        print("  py-spy wrote nothing:", spy_proc.stderr.read().decode()[-500:]
              if spy_proc.stderr else "")
        return []
    lines = collapse_summary(raw)
    for line in lines:
        print("  " + line)
    shutil.rmtree(out_dir, ignore_errors=True)
    return lines


def report_targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    verdicts = []
    for row in rows:
        if row["mode"] != "consistent":
            continue
        if row["load"] == "paced":
            ok = row["p99_ms"] <= TARGET_P99_MS
            verdicts.append(f"{row['scenario']}: p99 {row['p99_ms']:.2f} ms vs target "
                            f"<= {TARGET_P99_MS:.0f} ms: {'MET' if ok else 'MISSED'}")
        else:
            ok = row["rps"] >= TARGET_RPS
            verdicts.append(f"{row['scenario']}: {row['rps']:.0f} checks/s vs target "
                            f">= {TARGET_RPS:.0f}/s per central replica: "
                            f"{'MET' if ok else 'MISSED'}")
    print("\ntargets (consistent mode):")
    for line in verdicts:
        print("  " + line)
    return verdicts


if __name__ == "__main__":
    main()
