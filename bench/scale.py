"""Central at scale: key-window updates/s, commit lag, convergence, memory, node restart.

    .venv/bin/python -m bench.scale --quick                     # ~1 minute smoke run
    .venv/bin/python -m bench.scale --keys 100,10000,100000 --rates 1000,2000,4000,8000 \
        --stage-seconds 30 --results bench/out/scale.json
    .venv/bin/python -m bench.scale --stages sustain            # no node restart stage

What runs: per key count K, a fresh system on loopback: its own nats-server (JetStream,
temp store), a fresh Postgres database (created on the server of ``--postgres``, dropped
afterwards; or ``--database-url`` to use one as it is) and one real ``regionlimit
central`` process. No region nodes serve checks: a separate *load process* plays three
nodes (regions us, eu, ap) and publishes their usage batches exactly as nodes do
(``sync.publisher.UsagePublisher``, msgpack usage v2): every 100 ms each pseudo-node
flushes the cumulative counts of the keys it touched since its last flush. So the
figures are central's cost, not the nodes'.

Traffic: each *update* is one admission of cost 1 on a uniformly random key among K, on a
random pseudo-node, in a namespace with a monthly fixed window and a limit nobody
reaches. With K large almost every update raises a new (key, window, node) component: the
cold-key case of an API-key limiter. Rates ramp through ``--rates`` (updates/s), each for
``--stage-seconds``; a stage ends early once central is clearly broken (commit lag over
``--give-up-lag``).

Measured per stage (all by the load process, from outside central):
- offered/s: updates published (the load process may fall short of the target on a busy
  machine; it says so);
- entries/s: usage entries published (one per key a pseudo-node touched in a flush, so
  fewer than updates when K is small), and ingested/s, central's
  ``regionlimit_ingest_entries`` increase while the load ran (entries merged in memory:
  central merges fast and falls behind on its ledger commit, see commit lag);
- new comp.: the share of updates that raised a component from zero (pseudo-nodes get
  fresh node ids per stage, as a restarted node does);
- ledger rows/s: Postgres' n_tup_ins + n_tup_upd of ``components`` and ``usage_hourly``
  (Postgres flushes these statistics about once a second: approximate);
- commit lag: how long the oldest usage message not yet acked by central has been in the
  stream (central acks only after its ledger commit), sampled every 250 ms; p99 and max;
- convergence: every flush, pseudo-node us also publishes a fresh probe key, hot from its
  first unit (its policy's limit is 2, so 1 is at the default broadcast share): the time
  from its publish until the totals addressed to that node carry it (the observer listens
  on every totals subject, ``regionlimit.totals.>``); p50, p99, and probes never seen
  within 10 s. The bulk keys stay cold and travel to no node (the interest rule);
- lease losses: times central's ``regionlimit_central_leader`` gauge went from 1 to 0;
- central RSS (from /proc) and RSS per live component (RSS increase since the empty start
  divided by the components in central's ledger).

Then the restart stage: a real ``regionlimit node`` starts against central holding what
the stages left (about K x 3 components): the time from its process start until its
``/readyz`` reports ``sync: ok`` (bounded by ``--restart-timeout``).

Output: a table, a PNG (bench/out/scale.png, matplotlib) and optionally ``--results``
(JSON). The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgpack
from sqlalchemy.engine import make_url

from bench._cluster import OUT_DIR, load_after, machine, percentile
from tests.support.cluster import Cluster, metric_value
from tests.support.nats_server import NatsServer

NAMESPACE = "scale"
LIMIT = 1_000_000_000
REGIONS = ("us", "eu", "ap")
FLUSH_S = 0.1
LAG_SAMPLE_S = 0.25
PROBE_GIVE_UP_S = 10.0
POLICY_TOML = f"""
[namespaces.{NAMESPACE}]
limit = {LIMIT}
duration = "month"
algorithm = "fixed_window"
"""
DEFAULT_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class StageResult:
    keys: int
    target_rate: int
    seconds: float = 0.0
    offered_per_s: float = 0.0
    entries_per_s: float = 0.0  # usage entries published (a key touched twice in a flush
    # by one pseudo-node is one entry), probes included: what central has to ingest
    new_components_share: float = 0.0
    ingested_per_s: float = 0.0
    ledger_rows_per_s: float = 0.0
    commit_lag_p99_s: float = 0.0
    commit_lag_max_s: float = 0.0
    convergence_p50_ms: float = float("nan")
    convergence_p99_ms: float = float("nan")
    probes: int = 0
    probes_lost: int = 0
    lease_losses: int = 0
    central_rss_mb: float = 0.0
    components: int = 0
    rss_bytes_per_component: float = float("nan")
    gave_up: bool = False


@dataclass
class RestartResult:
    keys: int
    components: int
    seconds_to_sync_ok: float | None  # None: not within the timeout
    timeout_s: float


@dataclass
class Report:
    machine: str
    stages: list[StageResult] = field(default_factory=list)
    restarts: list[RestartResult] = field(default_factory=list)
    load_after: str = ""


# --- the load process ------------------------------------------------------------------------

def key_hash(index: int) -> str:
    """A key hash as nodes make them (32 hex characters)."""
    return hashlib.blake2b(f"bench-key-{index}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class LoadPlan:
    nats_url: str
    central_url: str
    central_pid: int
    keys: int
    rate: int
    seconds: float
    give_up_lag_s: float
    seed: int
    stage: int  # pseudo-nodes get new ids per stage: their counts start at 0 again


def load_process(plan: LoadPlan, results: Any) -> None:
    """Entry point of the load process (spawned): one stage, results into the queue."""
    results.put(asyncio.run(_load(plan)))


async def _load(plan: LoadPlan) -> dict[str, Any]:
    import nats

    from sync.messages import UsageEntry
    from sync.policy import build_policy
    from sync.publisher import UsagePublisher, ensure_usage_stream
    from sync.subjects import TOTALS, USAGE_CONSUMER, USAGE_STREAM
    from sync.windows import month_bounds

    rng = random.Random(plan.seed)
    nc = await nats.connect(plan.nats_url, max_reconnect_attempts=3)
    js = nc.jetstream()
    await ensure_usage_stream(js)
    policy = build_policy(limit=LIMIT, duration="month", algorithm="fixed_window")
    # Hot at once under the default share: addressed to the probing node every time.
    probe_policy = build_policy(limit=2, duration="month", algorithm="fixed_window")
    window = month_bounds(int(time.time() * 1000))[0]
    nodes = [UsagePublisher(js, node_id=f"bench-{region}-{plan.stage}", region=region)
             for region in REGIONS]
    # Cumulative admitted per (node, key): the state a node would flush.
    counts = [array("l", bytes(8 * plan.keys)) for _ in REGIONS]
    hashes = [key_hash(i) for i in range(plan.keys)]
    probes: dict[str, float] = {}
    delays_ms: list[float] = []
    lags_s: list[float] = []
    lease = {"losses": 0, "last": 1.0}
    offered = 0
    published_entries = 0
    new_components = 0
    stop = asyncio.Event()

    async def on_totals(msg: Any) -> None:
        seen = time.monotonic()
        try:
            rows = msgpack.unpackb(msg.data, raw=False).get("totals") or []
        except Exception:  # a bench observer: ignore what it can't read
            return
        for row in rows:
            sent = probes.pop(row[1], None) if isinstance(row, list) and len(row) > 1 else None
            if sent is not None:
                delays_ms.append((seen - sent) * 1000)

    sub = await nc.subscribe(f"{TOTALS}.>", cb=on_totals)  # addressed, partitions
    legacy_sub = await nc.subscribe(TOTALS, cb=on_totals)  # a central of the last release

    async def watch_lag() -> None:
        history: list[tuple[float, int]] = []  # (time, stream's last sequence)
        while not stop.is_set():
            try:
                stream = await js.stream_info(USAGE_STREAM)
                consumer = await js.consumer_info(USAGE_STREAM, USAGE_CONSUMER)
            except Exception:  # not created yet, or a slow server: sample again
                await asyncio.sleep(LAG_SAMPLE_S)
                continue
            now = time.monotonic()
            history.append((now, stream.state.last_seq))
            floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
            oldest = next((t for t, last in history if last > floor), None)
            lags_s.append(0.0 if oldest is None else now - oldest)
            history = [(t, last) for t, last in history if last > floor] or history[-1:]
            await asyncio.sleep(LAG_SAMPLE_S)

    async def watch_lease() -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    body = (await client.get(plan.central_url + "/metrics")).text
                    leader = metric_value(body, "regionlimit_central_leader")
                    if lease["last"] == 1.0 and leader == 0.0:
                        lease["losses"] += 1
                    lease["last"] = leader
                await asyncio.sleep(0.5)

    watchers = [asyncio.create_task(watch_lag()), asyncio.create_task(watch_lease())]
    started = time.monotonic()
    flushes = 0
    carry = 0.0
    gave_up = False
    while time.monotonic() - started < plan.seconds:
        due = started + flushes * FLUSH_S
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        flushes += 1
        carry += plan.rate * FLUSH_S
        updates, carry = int(carry), carry - int(carry)
        touched: list[dict[int, int]] = [{} for _ in REGIONS]
        for _ in range(updates):
            node = rng.randrange(len(REGIONS))
            key = rng.randrange(plan.keys)
            if counts[node][key] == 0:
                new_components += 1
            counts[node][key] += 1
            touched[node][key] = counts[node][key]
        offered += updates
        flushed_at = int(time.time() * 1000)
        # A fresh key of the identifier hash shape: central drops a message carrying any
        # other shape as malformed (with every other entry of it).
        probe = uuid.uuid4().hex
        batches = []
        for node, keys in enumerate(touched):
            entries = [UsageEntry(NAMESPACE, hashes[k], window, value, 0, policy)
                       for k, value in keys.items()]
            if node == 0:
                entries.append(UsageEntry(NAMESPACE, probe, window, 1, 0, probe_policy))
                probes[probe] = time.monotonic()
            published_entries += len(entries)
            batches.append(nodes[node].publish(flushed_at, entries))
        await asyncio.gather(*batches)
        if lags_s and lags_s[-1] > plan.give_up_lag_s:
            gave_up = True
            break
    elapsed = time.monotonic() - started
    ingested_at_end = float("nan")
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=5.0) as client:
            ingested_at_end = metric_value((await client.get(plan.central_url + "/metrics")).text,
                                           "regionlimit_ingest_entries_total")
    # Give the last probes their chance, then stop.
    deadline = time.monotonic() + PROBE_GIVE_UP_S
    while probes and time.monotonic() < deadline:
        if all(time.monotonic() - sent > PROBE_GIVE_UP_S for sent in probes.values()):
            break
        await asyncio.sleep(0.1)
    stop.set()
    for task in watchers:
        task.cancel()
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
        await legacy_sub.unsubscribe()
    await nc.close()
    return {"seconds": elapsed, "offered": offered, "entries": published_entries,
            "ingested_at_end": ingested_at_end,
            "new_components": new_components,
            "delays_ms": delays_ms, "probes_lost": len(probes), "lags_s": lags_s,
            "lease_losses": lease["losses"], "gave_up": gave_up}


# --- the system ------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _fetch(url: str, statement: str) -> list[Any]:
    connection = await asyncpg.connect(url, timeout=30)
    try:
        return list(await connection.fetch(statement))
    finally:
        await connection.close()


def sql(url: str, statement: str) -> list[Any]:
    return asyncio.run(_fetch(url, statement))


def ledger_rows_written(url: str) -> int:
    rows = sql(url, "SELECT COALESCE(SUM(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables "
                    "WHERE relname IN ('components', 'usage_hourly')")
    return int(rows[0][0])


@contextlib.contextmanager
def system(args: argparse.Namespace) -> Iterator[tuple[Cluster, str, str]]:
    """nats-server + a Postgres database + central; yields (cluster, plain db url,
    central url). A database we created is dropped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="rl-scale-"))
    created = None
    if args.database_url:
        db_url = make_url(args.database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
    else:
        admin = make_url(args.postgres).set(drivername="postgresql")
        created = f"rl_scale_{uuid.uuid4().hex[:12]}"
        admin_url = admin.render_as_string(hide_password=False)
        sql(admin_url, f'CREATE DATABASE "{created}"')
        db_url = admin.set(database=created).render_as_string(hide_password=False)
    nats_server = NatsServer(tmp / "nats").start()
    cluster: Cluster | None = None
    try:
        asyncpg_url = make_url(db_url).set(drivername="postgresql+asyncpg").render_as_string(
            hide_password=False)
        cluster = Cluster(nats=nats_server, database_url=asyncpg_url, tmp=tmp,
                          policy_toml=POLICY_TOML)
        central = cluster.central()
        deadline = time.monotonic() + 60
        while metric_value(httpx.get(central.url + "/metrics").text,
                           "regionlimit_central_leader") != 1.0:
            if time.monotonic() > deadline:
                raise TimeoutError("central did not lead within 60 s")
            time.sleep(0.1)
        yield cluster, db_url, central.url
    finally:
        if cluster is not None:
            logs = OUT_DIR / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for i, proc in enumerate(cluster.processes):
                with contextlib.suppress(OSError):
                    shutil.copyfile(proc.log_path, logs / f"scale-{i}.log")
            cluster.close()
        nats_server.close()
        if created is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                sql(make_url(args.postgres).set(drivername="postgresql").render_as_string(
                    hide_password=False), f'DROP DATABASE IF EXISTS "{created}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)


def central_pid(cluster: Cluster) -> int:
    proc = cluster.processes[0].proc
    assert proc is not None
    return proc.pid


def run_stage(args: argparse.Namespace, cluster: Cluster, db_url: str, central_url: str,
              keys: int, rate: int, empty_rss: float, stage: int) -> StageResult:
    result = StageResult(keys=keys, target_rate=rate)
    ingested_before = metric_value(httpx.get(central_url + "/metrics").text,
                                   "regionlimit_ingest_entries_total")
    rows_before = ledger_rows_written(db_url)
    plan = LoadPlan(nats_url=cluster.nats.url, central_url=central_url,
                    central_pid=central_pid(cluster), keys=keys, rate=rate,
                    seconds=args.stage_seconds, give_up_lag_s=args.give_up_lag,
                    seed=keys * 1_000_003 + rate, stage=stage)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=load_process, args=(plan, queue), daemon=True)
    proc.start()
    data = queue.get(timeout=args.stage_seconds + PROBE_GIVE_UP_S + 120)
    proc.join(timeout=10)
    time.sleep(1.5)  # let Postgres flush its table statistics
    result.seconds = data["seconds"]
    result.offered_per_s = data["offered"] / data["seconds"]
    result.entries_per_s = data["entries"] / data["seconds"]
    result.new_components_share = data["new_components"] / max(1, data["offered"])
    # Merged while the load ran (not the drain after it).
    result.ingested_per_s = (data["ingested_at_end"] - ingested_before) / data["seconds"]
    result.ledger_rows_per_s = (ledger_rows_written(db_url) - rows_before) / data["seconds"]
    lags = data["lags_s"] or [0.0]
    result.commit_lag_p99_s = percentile(lags, 99)
    result.commit_lag_max_s = max(lags)
    delays = data["delays_ms"]
    result.probes = len(delays) + data["probes_lost"]
    result.probes_lost = data["probes_lost"]
    if delays:
        result.convergence_p50_ms = percentile(delays, 50)
        result.convergence_p99_ms = percentile(delays, 99)
    result.lease_losses = data["lease_losses"]
    result.gave_up = data["gave_up"]
    result.central_rss_mb = rss_mb(central_pid(cluster))
    result.components = int(sql(db_url, "SELECT count(*) FROM components")[0][0])
    if result.components:
        result.rss_bytes_per_component = ((result.central_rss_mb - empty_rss) * 2**20
                                          / result.components)
    return result


def run_restart(args: argparse.Namespace, cluster: Cluster, db_url: str, keys: int
                ) -> RestartResult:
    components = int(sql(db_url, "SELECT count(*) FROM components")[0][0])
    # Timed from the process start: a node loads its snapshot before it answers /healthz.
    started = time.monotonic()
    node = cluster.node("us", ready=False)
    took: float | None = None
    try:
        while time.monotonic() - started < args.restart_timeout:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                body = httpx.get(node.url + "/readyz", timeout=5.0).json()
                if body.get("sync") == "ok":
                    took = time.monotonic() - started
                    break
            time.sleep(0.1)
    finally:
        node.kill()
    return RestartResult(keys, components, took, args.restart_timeout)


# --- output ----------------------------------------------------------------------------------

def table(report: Report) -> str:
    head = ("| K | target/s | offered/s | new comp. | entries/s published / ingested | "
            "ledger rows/s | commit lag "
            "p99 / max s | conv. p50 / p99 ms (lost) | lease losses | central RSS MB | "
            "RSS B/component |")
    lines = [head, "|" + " --- |" * 11]
    for s in report.stages:
        lines.append(
            f"| {s.keys:,} | {s.target_rate:,} | {s.offered_per_s:,.0f} | "
            f"{s.new_components_share:.0%} | {s.entries_per_s:,.0f} / {s.ingested_per_s:,.0f} | "
            f"{s.ledger_rows_per_s:,.0f} | {s.commit_lag_p99_s:.2f} / "
            f"{s.commit_lag_max_s:.2f}{' (gave up)' if s.gave_up else ''} | "
            f"{s.convergence_p50_ms:.0f} / {s.convergence_p99_ms:.0f} ({s.probes_lost}) | "
            f"{s.lease_losses} | {s.central_rss_mb:.0f} | {s.rss_bytes_per_component:,.0f} |")
    if report.restarts:
        lines += ["", "| K | components in central | node start to sync ok |",
                  "| --- | --- | --- |"]
        for r in report.restarts:
            took = (f"{r.seconds_to_sync_ok:.1f} s" if r.seconds_to_sync_ok is not None
                    else f"not within {r.timeout_s:.0f} s")
            lines.append(f"| {r.keys:,} | {r.components:,} | {took} |")
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    for keys in sorted({s.keys for s in report.stages}):
        stages = [s for s in report.stages if s.keys == keys]
        offered = [s.offered_per_s for s in stages]
        ax1.plot([s.entries_per_s for s in stages], [s.ingested_per_s for s in stages], "o-",
                 label=f"K={keys:,}")
        ax2.plot(offered, [s.commit_lag_p99_s for s in stages], "o-", label=f"K={keys:,}")
        ax3.plot(offered, [s.convergence_p99_ms for s in stages], "o-", label=f"K={keys:,}")
    top = max([s.entries_per_s for s in report.stages] or [1])
    ax1.plot([0, top], [0, top], ":", color="grey", label="ingested = published")
    ax1.set(xlabel="published usage entries/s", ylabel="ingested entries/s",
            title="central ingest")
    ax2.set(xlabel="offered updates/s", ylabel="s", title="commit lag p99")
    ax3.set(xlabel="offered updates/s", ylabel="ms", title="convergence p99")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(report.machine, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=parse_ints, default=[100, 10_000, 100_000])
    parser.add_argument("--rates", type=parse_ints, default=[1000, 2000, 4000, 8000, 16_000],
                        help="offered key-window updates/s, one stage each")
    parser.add_argument("--stage-seconds", type=float, default=30.0)
    parser.add_argument("--stages", default="sustain,restart",
                        help="comma list of sustain, restart")
    parser.add_argument("--give-up-lag", type=float, default=20.0,
                        help="end a stage early once the commit lag passes this (s)")
    parser.add_argument("--restart-timeout", type=float, default=60.0)
    parser.add_argument("--postgres", default=os.environ.get("REGIONLIMIT_BENCH_POSTGRES",
                                                             DEFAULT_ADMIN),
                        help="admin URL of a Postgres server to create a fresh database on")
    parser.add_argument("--database-url", default=None,
                        help="use this database as it is (not dropped; keys accumulate)")
    parser.add_argument("--quick", action="store_true",
                        help="~1 minute: K 100 and 10,000, rates 1000 and 3000, 8 s each")
    parser.add_argument("--results", type=Path, default=None, help="write JSON here too")
    parser.add_argument("--png", type=Path, default=OUT_DIR / "scale.png")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.rates, args.stage_seconds = [100, 10_000], [1000, 3000], 8.0
        args.restart_timeout = 20.0
    stages = set(args.stages.split(","))
    report = Report(machine=machine())
    print(report.machine)
    for keys in args.keys:
        with system(args) as (cluster, db_url, central_url):
            empty_rss = rss_mb(central_pid(cluster))
            if "sustain" in stages:
                for index, rate in enumerate(args.rates):
                    stage = run_stage(args, cluster, db_url, central_url, keys, rate,
                                      empty_rss, index)
                    report.stages.append(stage)
                    print(f"K={keys:,} rate={rate:,}: {asdict(stage)}", flush=True)
                    if stage.gave_up:
                        break  # past the breaking point: higher rates tell nothing more
            if "restart" in stages:
                restart = run_restart(args, cluster, db_url, keys)
                report.restarts.append(restart)
                print(f"restart: {asdict(restart)}", flush=True)
    report.load_after = load_after()
    print()
    print(table(report))
    print(report.load_after)
    if report.stages:
        plot(report, args.png)
        print(f"plot: {args.png}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(asdict(report), indent=2))
        print(f"results: {args.results}")


if __name__ == "__main__":
    main()
