"""Central at scale: key-window updates/s, commit lag, convergence, memory, node restart,
replica failover.

    .venv/bin/python -m bench.scale --quick                     # ~1 minute smoke run
    .venv/bin/python -m bench.scale --keys 100,10000,100000 --rates 1000,2000,4000,8000 \
        --stage-seconds 30 --results bench/out/scale.json
    .venv/bin/python -m bench.scale --stages sustain            # no node restart stage
    .venv/bin/python -m bench.scale --replicas 2 --keys 1000000 --stages failover \
        --seed-components 1000000                               # failover of a replica
    .venv/bin/python -m bench.scale --stages e2e --keys 1000000 --e2e-rate 3000 \
        --e2e-restart --seed-components 3000000 --stage-seconds 240   # real nodes, end to end

What runs: per key count K, a fresh system on loopback: its own nats-server (JetStream,
temp store), a fresh Postgres database (created on the server of ``--postgres``, dropped
afterwards; or ``--database-url`` to use one as it is) and ``--replicas`` real
``regionlimit central`` processes (each on its own port, all on that database and NATS)
sharing ``--partitions`` key partitions (``REGIONLIMIT_PARTITIONS``). Load starts once the
replicas' ``/readyz`` partition lists cover every partition exactly once and, with no more
replicas than partitions, each replica leads at least one. No region nodes serve checks: a
separate *load process* plays three nodes (regions us, eu, ap) and publishes their usage
batches exactly as partition-aware nodes do (``sync.publisher.UsagePublisher`` with
``partitions``, msgpack usage v2: each key on its partition's subject): every 100 ms each
pseudo-node flushes the cumulative counts of the keys it touched since its last flush. So
the figures are central's cost, not the nodes'.

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
  fewer than updates when K is small), and ingested/s, the increase of
  ``regionlimit_ingest_entries`` summed over the replicas while the load ran (entries
  merged in memory: central merges fast and falls behind on its ledger commit, see commit
  lag);
- new comp.: the share of updates that raised a component from zero (pseudo-nodes get
  fresh node ids per stage, as a restarted node does);
- ledger rows/s: Postgres' n_tup_ins + n_tup_upd of ``components`` and ``usage_hourly``
  (Postgres flushes these statistics about once a second: approximate);
- commit lag: how long the oldest usage message not yet acked by central has been in the
  stream (central acks only after its ledger commit), sampled every 250 ms; p99 and max.
  A sample is the max over the partition consumers ``regionlimit-central-pNNNN`` (those
  not created yet are skipped). Per consumer: 0 when it has nothing pending or unacked
  (``num_pending + num_ack_pending == 0``); else the time since the stream's last sequence
  first passed the consumer's ack floor (from the stream's last_seq sampled every 250 ms),
  but no earlier than the last sample at which that consumer had nothing outstanding. The
  stream interleaves all partitions, so the message just above a partition's ack floor
  may be another partition's, older than the partition's own oldest unacked one: the
  figure is an upper bound, too high by at most the gap between two messages of one
  partition (under load, about one flush: 100 ms), and low by up to one sample (250 ms);
- convergence: every flush, pseudo-node us also publishes a fresh probe key, hot from its
  first unit (its policy's limit is 2, so 1 is at the default broadcast share): the time
  from its publish until the totals addressed to that node carry it (the observer listens
  on every totals subject, ``regionlimit.totals.>``); p50, p99, and probes never seen
  within 10 s. The bulk keys stay cold and travel to no node (the interest rule);
- lease losses: partitions dropped, i.e. the decreases of each replica's
  ``regionlimit_central_partitions_held`` gauge (sampled every 500 ms), summed over the
  replicas; no replica is stopped during these stages, so each is a lease lost (or a
  partition handed over because the replicas' roster changed);
- central RSS (from /proc, summed over the replicas) and RSS per live component (the sum
  of the replicas' RSS increases since their start with the partitions spread, divided by
  the components in the ledger that were not seeded before that start).

Then the restart stage: a real ``regionlimit node`` starts against central holding what
the stages left (about K x 3 components): the time from its process start until its
``/readyz`` reports ``sync: ok`` (bounded by ``--restart-timeout``).

Then the failover stage (needs ``--replicas`` 2 or more): central holds what the earlier
stages left, plus ``--seed-components`` N components inserted into the ledger before the
replicas start (namespace and policy of the bench, keys spread over every partition,
three pseudo-nodes). The bench SIGKILLs the replica leading the most partitions and
measures from the kill (a) until the survivors' ``/readyz`` partition lists cover every
partition again (a partition is listed from its lease's claim on, while its share of the
ledger may still be loading), and (b) until a total for a fresh probe key of one of the
dead replica's partitions (hot at once, as the convergence probes; its usage is published
right after the kill) arrives on ``regionlimit.totals.>``. Both bounded by
``--failover-timeout``.

The e2e stage (``--stages e2e``, not in the default; after the restart stage, before the
failover stage): three real ``regionlimit node`` processes (us, eu, ap; product defaults, a
policy file with the bulk namespace above and a probe namespace of limit 4, monthly fixed
window) in front of the same replicas. The load starts once all three report ``sync: ok``
(central answered their snapshots: every partition's share of the ledger is loaded;
bounded by ``--spread-timeout``). A separate
load process (``--e2e-load-processes`` of them, each its share of the rate; uvloop and raw
HTTP/1.1 over keep-alive connections, 16 per node and process) sends ``--e2e-rate``
``/v1/check`` requests/s for ``--stage-seconds``, each on a uniformly random key among K
(identifier ``k<index>``, hashed by the node) and to a uniformly random node; a check
waiting more than 2 s for a connection is dropped and counted as not sent (the load process
could not reach the target). Measured:
- sent/s and answered-200/s (while the load ran), the statuses of the other answers
  (``error``: no answer: refused, reset, or 10 s without one), and the latency of a check
  from its send on a free connection to its answer (p50, p99);
- convergence: every 100 ms the bench process (not the loaded load process) checks a fresh
  probe identifier once on a node A and then once on a node B (the ordered pairs of the
  three nodes in turn): 2 units of a limit of 4 make the key hot, so central addresses its
  total to A and B. Convergence is the time from B's answer until a totals message on
  ``regionlimit.totals.node.<A's node id>`` (the id from A's ``/readyz``) carries the key
  with a total of at least 2; p50, p99, max, probes never seen within 10 s, and probes whose
  check was not answered 200 (failed: not measured). The restart window's probes (below)
  are apart;
- node memory after the load: per node ``regionlimit_active_keys`` (keys held), VmRSS, the
  distinct bulk keys it answered 200 for (counted by the load process; keys served) and the
  probe keys it served (hot, so central addresses them to it): the interest rule says held
  <= served + probe keys;
- CPU while the load ran (1.0: one core), from /proc: of the load processes, of the replicas
  (summed), of each node (the restarted ap's since its start, its Python start-up included).
With ``--e2e-restart``, halfway through the load the bench SIGKILLs node ap and starts a new
one (its port chosen ahead, so the load process sends ap's share there from the kill on):
the time from the new process's start until its ``/readyz`` says ``sync: ok`` (bounded by
``--restart-timeout``); the checks sent to ap from the kill until then (the gap), and how
many of them were not answered 200, apart from the other figures; and the convergence of the
probes started in that window, which alternate between us and eu, apart too. Probes with
ap as A or B started within 1 s before the kill are not counted (cut by the kill). The ap
row of the memory table is then the new ap's (keys served since its start). Last, the issue's
targets with the figure measured against each; what the processes logged at ERROR (or a
traceback) and WARNING is counted per process.

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
import re
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
from sync.partitions import DEFAULT_PARTITIONS, MAX_PARTITIONS, partition_of, partition_token
from tests.support.cluster import Cluster, metric_value
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess, free_port

NAMESPACE = "scale"
LIMIT = 1_000_000_000
REGIONS = ("us", "eu", "ap")
FLUSH_S = 0.1
LAG_SAMPLE_S = 0.25
PROBE_GIVE_UP_S = 10.0
LEASE_SAMPLE_S = 0.5
PROBE_NAMESPACE = "scale_probe"  # e2e: checked on real nodes, hot at its second unit
PROBE_LIMIT = 4
E2E_PROBE_S = 0.1
E2E_CONNECTIONS = 16  # keep-alive connections per node and load process
E2E_BACKLOG_S = 2.0  # a check waiting longer than this for a connection is not sent
E2E_KILL_CUT_S = 1.0  # probes with ap started this long before its kill are not counted
REGION_NODES = 3  # e2e load targets 0..2: us, eu, ap; 3: the restarted ap
POLICY_TOML = f"""
[namespaces.{NAMESPACE}]
limit = {LIMIT}
duration = "month"
algorithm = "fixed_window"

[namespaces.{PROBE_NAMESPACE}]
limit = {PROBE_LIMIT}
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
    commit_lag_consumers: int = 0  # partition consumers that existed in the last sample
    convergence_p50_ms: float = float("nan")
    convergence_p99_ms: float = float("nan")
    probes: int = 0
    probes_lost: int = 0
    lease_losses: int = 0  # partitions dropped, summed over the replicas
    central_rss_mb: float = 0.0  # summed over the replicas
    central_rss_increase_mb: float = 0.0  # since the start with partitions spread, summed
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
class FailoverResult:
    keys: int
    components: int
    replicas: int  # before the kill
    partitions: int
    killed_partitions: list[int]  # those the killed replica led
    probe_partition: int
    seconds_to_cover: float | None  # kill -> survivors lead every partition; None: timeout
    seconds_to_probe_total: float | None  # kill -> the probe's total; None: timeout
    timeout_s: float
    survivor_partitions: list[list[int]] = field(default_factory=list)  # at the end


@dataclass
class E2ENode:
    region: str
    node_id: str
    restarted: bool  # the ap started halfway through: its figures count from its start
    checks_ok: int  # bulk checks it answered 200
    keys_served: int  # distinct bulk keys it answered 200 for
    probe_keys: int  # probe keys it served (hot: addressed to it)
    keys_held: float  # regionlimit_active_keys after the load
    rss_mb: float
    cpu_share: float  # CPU seconds used while the load ran / its seconds (1.0: one core)


@dataclass
class Convergence:
    probes: int = 0  # counted: not failed, not cut by the kill
    failed: int = 0  # a check of the probe not answered 200: not measured
    failures: dict[str, int] = field(default_factory=dict)  # "<region>: <status or error>"
    lost: int = 0  # not seen on A's node subject within 10 s
    elsewhere: int = 0  # of the lost: seen with total >= 2 on another subject only
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")


@dataclass
class E2EResult:
    keys: int
    target_rate: int
    load_processes: int
    keys_in_central: int  # distinct keys in the ledger when the stage started
    components_in_central: int
    seconds: float = 0.0
    sent_per_s: float = 0.0  # checks sent (answered or not) while the load ran
    ok_per_s: float = 0.0  # answered 200 while the load ran
    checks_sent: int = 0  # the restart gap's included
    checks_ok: int = 0
    not_sent: int = 0  # dropped by the load process: waited over 2 s for a connection
    other_answers: dict[str, int] = field(default_factory=dict)  # status (or "error")
    # -> count, outside the restart gap
    check_p50_ms: float = float("nan")
    check_p99_ms: float = float("nan")
    load_cpu_share: float = float("nan")  # the load processes' CPU / seconds, summed
    central_cpu_share: float = float("nan")  # the replicas', summed
    convergence: Convergence = field(default_factory=Convergence)  # outside the window
    nodes: list[E2ENode] = field(default_factory=list)  # after the load
    killed_ap_keys_served: int = 0  # distinct bulk keys the killed ap answered 200 for
    restart: bool = False
    restart_seconds_to_sync_ok: float | None = None  # None: not within the timeout
    restart_timeout_s: float = 0.0
    restart_window_s: float = 0.0  # kill until sync ok (or the end of the load)
    gap_checks: int = 0  # checks sent to ap in the window
    gap_failed: int = 0  # of those, not answered 200
    gap_answers: dict[str, int] = field(default_factory=dict)  # status (or "error") -> n
    restart_convergence: Convergence = field(default_factory=Convergence)  # us <-> eu
    probes_cut: int = 0  # with ap, started within 1 s before the kill: not counted
    log_problems: dict[str, list[int]] = field(default_factory=dict)  # process ->
    # [error lines (tracebacks included), warning lines]
    log_samples: list[str] = field(default_factory=list)  # a few distinct such lines


@dataclass
class Report:
    machine: str
    replicas: int = 1
    partitions: int = DEFAULT_PARTITIONS
    seed_components: int = 0
    stages: list[StageResult] = field(default_factory=list)
    restarts: list[RestartResult] = field(default_factory=list)
    failovers: list[FailoverResult] = field(default_factory=list)
    e2e: list[E2EResult] = field(default_factory=list)
    load_after: str = ""


# --- the load process ------------------------------------------------------------------------

def totals_rows(data: bytes) -> list[Any]:
    """The rows of a totals message, read without the codec (an observer's view); none
    for what it cannot read."""
    try:
        rows = msgpack.unpackb(data, raw=False).get("totals")
    except Exception:  # a bench observer: ignore what it can't read
        return []
    return rows if isinstance(rows, list) else []


def key_hash(index: int) -> str:
    """A key hash as nodes make them (32 hex characters)."""
    return hashlib.blake2b(f"bench-key-{index}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class LoadPlan:
    nats_url: str
    central_urls: tuple[str, ...]  # every replica
    partitions: int
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
    # Partition-aware, as nodes are once central's configuration told them the count: each
    # key on its partition's subject, no forwarding hop in central.
    nodes = [UsagePublisher(js, node_id=f"bench-{region}-{plan.stage}", region=region,
                            partitions=plan.partitions)
             for region in REGIONS]
    # Cumulative admitted per (node, key): the state a node would flush.
    counts = [array("l", bytes(8 * plan.keys)) for _ in REGIONS]
    hashes = [key_hash(i) for i in range(plan.keys)]
    probes: dict[str, float] = {}
    delays_ms: list[float] = []
    lags_s: list[float] = []
    consumers_seen = [0]  # partition consumers that answered in the last lag sample
    lease_losses = [0]
    offered = 0
    published_entries = 0
    new_components = 0
    stop = asyncio.Event()

    async def on_totals(msg: Any) -> None:
        seen = time.monotonic()
        rows = totals_rows(msg.data)
        for row in rows:
            sent = probes.pop(row[1], None) if isinstance(row, list) and len(row) > 1 else None
            if sent is not None:
                delays_ms.append((seen - sent) * 1000)

    sub = await nc.subscribe(f"{TOTALS}.>", cb=on_totals)  # addressed, partitions
    legacy_sub = await nc.subscribe(TOTALS, cb=on_totals)  # a central of the last release

    consumers = [f"{USAGE_CONSUMER}-p{partition_token(p)}" for p in range(plan.partitions)]
    idle_at: dict[str, float] = {}  # consumer -> last sample with nothing outstanding

    async def outstanding_floor(name: str) -> int | None:
        """The ack floor (a stream sequence) of a consumer with messages pending or
        unacked; -1: nothing outstanding; None: no such consumer (yet), or no answer."""
        try:
            info = await js.consumer_info(USAGE_STREAM, name)
        except Exception:
            return None
        if (info.num_pending or 0) + (info.num_ack_pending or 0) == 0:
            return -1
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def watch_lag() -> None:
        history: list[tuple[float, int]] = []  # (time, stream's last sequence)
        while not stop.is_set():
            try:
                stream = await js.stream_info(USAGE_STREAM)
            except Exception:  # not created yet, or a slow server: sample again
                await asyncio.sleep(LAG_SAMPLE_S)
                continue
            now = time.monotonic()
            history.append((now, stream.state.last_seq))
            floors = await asyncio.gather(*(outstanding_floor(name) for name in consumers))
            lags = [0.0]
            busy: list[int] = []
            for name, floor in zip(consumers, floors, strict=True):
                if floor == -1:
                    idle_at[name] = now  # what is outstanding later came after this
                elif floor is not None:
                    busy.append(floor)
                    oldest = next((t for t, last in history if last > floor), now)
                    lags.append(now - max(oldest, idle_at.get(name, oldest)))
            consumers_seen[0] = sum(floor is not None for floor in floors)
            lags_s.append(max(lags))
            # Only samples past the lowest floor still outstanding can be the oldest.
            history = ([(t, last) for t, last in history if last > min(busy)] if busy
                       else []) or history[-1:]
            await asyncio.sleep(LAG_SAMPLE_S)

    async def watch_lease() -> None:
        # No replica is stopped while the load runs: any drop is a partition lost.
        held: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not stop.is_set():
                for url in plan.central_urls:
                    with contextlib.suppress(httpx.HTTPError):
                        body = (await client.get(url + "/metrics")).text
                        now_held = metric_value(body, "regionlimit_central_partitions_held")
                        lease_losses[0] += max(0, int(held.get(url, now_held) - now_held))
                        held[url] = now_held
                await asyncio.sleep(LEASE_SAMPLE_S)

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
            bodies = [(await client.get(url + "/metrics")).text for url in plan.central_urls]
            ingested_at_end = sum(metric_value(body, "regionlimit_ingest_entries_total")
                                  for body in bodies)
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
            "lag_consumers": consumers_seen[0],
            "lease_losses": lease_losses[0], "gave_up": gave_up}


# --- the e2e load process (real nodes) ---------------------------------------------------------

@dataclass(frozen=True)
class E2EPlan:
    urls: tuple[str, ...]  # us, eu, ap, then the restarted ap (its port chosen ahead)
    keys: int
    rate: float  # this process's share
    seconds: float
    seed: int
    connections: int  # per node


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def e2e_load_process(plan: E2EPlan, go: Any, ap_down: Any, ap_up: Any, results: Any) -> None:
    """Entry point of an e2e load process (spawned): says it is ready, waits for ``go``,
    sends checks for ``plan.seconds``, puts its figures into ``results``."""
    results.put("ready")
    go.wait()
    try:
        import uvloop
    except ImportError:
        results.put(asyncio.run(_e2e_load(plan, ap_down, ap_up)))
    else:
        results.put(uvloop.run(_e2e_load(plan, ap_down, ap_up)))


async def _e2e_load(plan: E2EPlan, ap_down: Any, ap_up: Any) -> dict[str, Any]:
    rng = random.Random(plan.seed)
    targets = len(plan.urls)
    served = [bytearray(plan.keys) for _ in range(targets)]  # 1: answered 200 for the key
    ok_per_target = [0] * targets
    queues: list[asyncio.Queue[tuple[int, bool] | None]] = [asyncio.Queue()
                                                            for _ in range(targets)]
    latencies = array("f")
    answers: dict[str, int] = {}  # outside the gap, not 200
    gap_answers: dict[str, int] = {}
    counts = {"sent": 0, "ok": 0, "gap_sent": 0, "gap_failed": 0}
    down = [False]  # ap killed (the bench set ap_down): the old ap's failures are the gap's
    prefix = f'{{"namespace":"{NAMESPACE}","identifier":"k'.encode()

    async def worker(target: int) -> None:
        host, port = plan.urls[target].removeprefix("http://").rsplit(":", 1)
        head = (f"POST /v1/check HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\nContent-Length: ").encode()
        queue = queues[target]
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while (item := await queue.get()) is not None:
            key, in_gap = item
            body = prefix + str(key).encode() + b'","cost":1}'
            status = 0
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(10.0):
                    if writer is None or reader is None:
                        reader, writer = await asyncio.open_connection(host, int(port))
                    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                    answer = await reader.readuntil(b"\r\n\r\n")
                    length = CONTENT_LENGTH.search(answer)
                    await reader.readexactly(int(length.group(1)) if length else 0)
                    status = int(answer[9:12])
                    latencies.append(time.perf_counter() - sent)
            except (OSError, EOFError, TimeoutError, ValueError, asyncio.LimitOverrunError):
                if writer is not None:
                    writer.close()
                reader = writer = None
            counts["sent"] += 1
            if status == 200:
                counts["ok"] += 1
                ok_per_target[target] += 1
                served[target][key] = 1
            in_gap = in_gap or (target == 2 and down[0])
            if in_gap:
                counts["gap_sent"] += 1
            if status != 200:
                label = str(status) if status else "error"
                book = gap_answers if in_gap else answers
                book[label] = book.get(label, 0) + 1
                counts["gap_failed"] += in_gap

    workers = [asyncio.create_task(worker(target))
               for target in range(targets) for _ in range(plan.connections)]
    backlog = max(10, int(plan.rate * E2E_BACKLOG_S / REGION_NODES))
    not_sent = issued = 0
    up = False
    started, cpu_started = time.monotonic(), time.process_time()
    while (now := time.monotonic()) - started < plan.seconds:
        if len(plan.urls) > REGION_NODES and not down[0] and ap_down.is_set():
            down[0] = True
        if down[0] and not up and ap_up.is_set():
            up = True
        due = int(plan.rate * (now - started)) - issued
        issued += due
        for _ in range(due):
            node = rng.randrange(REGION_NODES)
            target = REGION_NODES if node == 2 and down[0] else node
            if queues[target].qsize() >= backlog:
                not_sent += 1
            else:
                queues[target].put_nowait((rng.randrange(plan.keys), target == 3 and not up))
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    cpu_s = time.process_time() - cpu_started
    sent_in_time, ok_in_time = counts["sent"], counts["ok"]
    for queue in queues:
        for _ in range(plan.connections):
            queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=15.0)  # the backlog, answered or not
    for task in pending:
        task.cancel()
    ordered = sorted(latencies)
    return {"seconds": elapsed, "cpu_s": cpu_s, "sent_in_time": sent_in_time,
            "ok_in_time": ok_in_time,
            "sent": counts["sent"], "ok": counts["ok"], "not_sent": not_sent,
            "unfinished": sum(q.qsize() for q in queues), "answers": answers,
            "gap_sent": counts["gap_sent"], "gap_failed": counts["gap_failed"],
            "gap_answers": gap_answers, "ok_per_target": ok_per_target,
            "latency_p50_ms": percentile(ordered, 50) * 1000 if ordered else float("nan"),
            "latency_p99_ms": percentile(ordered, 99) * 1000 if ordered else float("nan"),
            "served": [bytes(s) for s in served]}


# --- the system ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (nan once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def seed_components(db_url: str, count: int) -> None:
    """``count`` components straight into the ledger, as tests/e2e/test_checkpoint_faults.py
    seeds them: this month's window of the bench's namespace and policy, three per key
    (pseudo-nodes seed-us, seed-eu, seed-ap), keys of the identifier hash shape (md5: 32
    hex characters) and so spread over every partition."""
    from sync.policy import build_policy
    from sync.windows import month_bounds

    now = int(time.time() * 1000)
    start, end = month_bounds(now)
    duration = build_policy(limit=LIMIT, duration="month", algorithm="fixed_window"
                            ).duration.text
    regions = ",".join(f"'{region}'" for region in REGIONS)
    sql(db_url, f"""
        INSERT INTO components (namespace, key_hash, window_start, node_id, region,
                                window_end, admitted, denied, "limit", duration, algorithm,
                                burst, updated_at)
        SELECT '{NAMESPACE}', md5('bench-seed-' || (i / 3)), {start},
               'seed-' || (ARRAY[{regions}])[i % 3 + 1], (ARRAY[{regions}])[i % 3 + 1],
               {end}, 1, 0, {LIMIT}, '{duration}', 'fixed_window', NULL, {now}
        FROM generate_series(0, {count - 1}) AS i""")


def readyz_partitions(url: str) -> list[int] | None:
    """The partitions a replica says it leads; None when it does not answer."""
    try:
        body = httpx.get(url + "/readyz", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    held = body.get("partitions") if isinstance(body, dict) else None
    return [int(p) for p in held] if isinstance(held, list) else None


def spread(held: list[list[int] | None], partitions: int) -> bool:
    """Every partition led by exactly one replica, every replica leading one when there
    are enough partitions for that, and none above its fair share (central's roster:
    ceil(partitions / replicas)), so no handover is still to come while the load runs."""
    if any(h is None for h in held):
        return False
    lists = [h for h in held if h is not None]
    every = [p for h in lists for p in h]
    share = -(-partitions // len(lists))
    return (sorted(every) == list(range(partitions))
            and (len(lists) > partitions or all(lists))
            and all(len(h) <= share for h in lists))


def wait_spread(centrals: list[ManagedProcess], partitions: int, timeout: float
                ) -> list[list[int] | None]:
    started = time.monotonic()
    held: list[list[int] | None] = []
    while time.monotonic() - started < timeout:
        held = [readyz_partitions(c.url) for c in centrals]
        if spread(held, partitions):
            print(f"partitions spread in {time.monotonic() - started:.1f} s: "
                  f"{[len(h or []) for h in held]}", flush=True)
            return held
        time.sleep(0.2)
    covered = {p for h in held for p in h or []}
    if covered == set(range(partitions)):
        # Led, only not evenly: measurable, so say so and go on.
        print(f"WARNING: partitions not spread within {timeout:.0f} s: {held}", flush=True)
        return held
    raise TimeoutError(f"the replicas did not lead every partition within {timeout:.0f} s: "
                       f"{held}")


@contextlib.contextmanager
def system(args: argparse.Namespace) -> Iterator[tuple[Cluster, str, list[ManagedProcess]]]:
    """nats-server + a Postgres database (seeded with ``--seed-components``) + the central
    replicas, partitions spread; yields (cluster, plain db url, the replicas). A database
    we created is dropped afterwards."""
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
        # The count reaches every process (replicas, the restart stage's node) this way.
        cluster = Cluster(nats=nats_server, database_url=asyncpg_url, tmp=tmp,
                          policy_toml=POLICY_TOML,
                          env={"REGIONLIMIT_PARTITIONS": str(args.partitions)})
        if args.seed_components:
            # Before the replicas start: they load it as a long-running central holds it.
            started = time.monotonic()
            seed_components(db_url, args.seed_components)
            print(f"seeded {args.seed_components:,} components in "
                  f"{time.monotonic() - started:.1f} s", flush=True)
        centrals = [cluster.central() for _ in range(args.replicas)]
        wait_spread(centrals, args.partitions, args.spread_timeout)
        yield cluster, db_url, centrals
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


def pid(proc: ManagedProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


def ingested_total(centrals: list[ManagedProcess]) -> float:
    return sum(metric_value(httpx.get(c.url + "/metrics", timeout=10.0).text,
                            "regionlimit_ingest_entries_total") for c in centrals)


def run_stage(args: argparse.Namespace, cluster: Cluster, db_url: str,
              centrals: list[ManagedProcess], keys: int, rate: int, empty_rss: list[float],
              stage: int) -> StageResult:
    result = StageResult(keys=keys, target_rate=rate)
    ingested_before = ingested_total(centrals)
    rows_before = ledger_rows_written(db_url)
    plan = LoadPlan(nats_url=cluster.nats.url, central_urls=tuple(c.url for c in centrals),
                    partitions=args.partitions, keys=keys, rate=rate,
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
    result.commit_lag_consumers = data["lag_consumers"]
    delays = data["delays_ms"]
    result.probes = len(delays) + data["probes_lost"]
    result.probes_lost = data["probes_lost"]
    if delays:
        result.convergence_p50_ms = percentile(delays, 50)
        result.convergence_p99_ms = percentile(delays, 99)
    result.lease_losses = data["lease_losses"]
    result.gave_up = data["gave_up"]
    rss = [rss_mb(pid(c)) for c in centrals]
    result.central_rss_mb = sum(rss)
    result.central_rss_increase_mb = sum(r - e for r, e in zip(rss, empty_rss, strict=True))
    result.components = int(sql(db_url, "SELECT count(*) FROM components")[0][0])
    # The seeded components were in memory already when empty_rss was taken.
    grown = result.components - args.seed_components
    if grown > 0:
        result.rss_bytes_per_component = result.central_rss_increase_mb * 2**20 / grown
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


def run_failover(args: argparse.Namespace, cluster: Cluster, db_url: str,
                 centrals: list[ManagedProcess], keys: int) -> FailoverResult:
    components = int(sql(db_url, "SELECT count(*) FROM components")[0][0])
    held = [readyz_partitions(c.url) or [] for c in centrals]
    victim_index = max(range(len(centrals)), key=lambda i: len(held[i]))
    victim = centrals[victim_index]
    survivors = [c for i, c in enumerate(centrals) if i != victim_index]
    killed = sorted(held[victim_index])
    if not killed:
        raise RuntimeError(f"no replica leads a partition: {held}")
    cover, probe_total, probe_partition, final = asyncio.run(_failover(
        cluster.nats.url, victim, survivors, killed, args.partitions,
        args.failover_timeout))
    centrals.remove(victim)  # gone: later stages (and RSS) see the survivors only
    return FailoverResult(keys=keys, components=components, replicas=len(survivors) + 1,
                          partitions=args.partitions, killed_partitions=killed,
                          probe_partition=probe_partition, seconds_to_cover=cover,
                          seconds_to_probe_total=probe_total, timeout_s=args.failover_timeout,
                          survivor_partitions=final)


async def _failover(nats_url: str, victim: ManagedProcess, survivors: list[ManagedProcess],
                    killed: list[int], partitions: int, timeout: float
                    ) -> tuple[float | None, float | None, int, list[list[int]]]:
    """Kill ``victim``; (seconds to cover every partition again, seconds to the probe's
    total, the probe's partition, the survivors' partitions at the end)."""
    import nats

    from sync.messages import UsageEntry
    from sync.policy import build_policy
    from sync.publisher import PublishFailed, UsagePublisher
    from sync.subjects import TOTALS
    from sync.windows import month_bounds

    # A fresh key in one of the partitions that are about to lose their leader.
    probe = uuid.uuid4().hex
    while partition_of(NAMESPACE, probe, partitions=partitions) not in killed:
        probe = uuid.uuid4().hex
    probe_partition = partition_of(NAMESPACE, probe, partitions=partitions)
    # Hot at once under the default share, as the convergence probes.
    probe_policy = build_policy(limit=2, duration="month", algorithm="fixed_window")
    nc = await nats.connect(nats_url, max_reconnect_attempts=3)
    js = nc.jetstream()
    publisher = UsagePublisher(js, node_id="bench-failover", region=REGIONS[0],
                               partitions=partitions)
    seen = asyncio.get_running_loop().create_future()

    async def on_totals(msg: Any) -> None:
        try:
            rows = msgpack.unpackb(msg.data, raw=False).get("totals") or []
        except Exception:  # a bench observer: ignore what it can't read
            return
        if any(isinstance(row, list) and len(row) > 1 and row[1] == probe for row in rows) \
                and not seen.done():
            seen.set_result(time.monotonic())

    subs = [await nc.subscribe(f"{TOTALS}.>", cb=on_totals),
            await nc.subscribe(TOTALS, cb=on_totals)]
    await nc.flush()
    started = time.monotonic()
    victim.kill()  # SIGKILL: its sessions and connections die with it, nothing handed over
    cover: float | None = None
    final: list[list[int]] = []
    try:
        # Fresh usage of the probe, stored in the stream until a survivor leads its partition.
        while time.monotonic() - started < timeout:
            try:
                await publisher.publish(int(time.time() * 1000), [UsageEntry(
                    NAMESPACE, probe, month_bounds(int(time.time() * 1000))[0], 1, 0,
                    probe_policy)])
                break
            except PublishFailed:
                await asyncio.sleep(0.1)
        async with httpx.AsyncClient(timeout=2.0) as client:

            async def led(url: str) -> list[int]:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    return [int(p) for p in (await client.get(url + "/readyz")).json()
                            .get("partitions", [])]
                return []

            while time.monotonic() - started < timeout:
                if cover is None:
                    final = list(await asyncio.gather(*(led(s.url) for s in survivors)))
                    if {p for f in final for p in f} == set(range(partitions)):
                        cover = time.monotonic() - started
                if cover is not None and seen.done():
                    break
                await asyncio.sleep(0.1)
            final = list(await asyncio.gather(*(led(s.url) for s in survivors)))
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await nc.close()
    probe_total = seen.result() - started if seen.done() else None
    return cover, probe_total, probe_partition, final


@dataclass
class Probe:
    key_hash: str
    a: int  # node index, checked first; the total must reach its node subject
    b: int
    subject: str  # A's node subject
    in_window: bool  # started in the restart window
    started: float
    failed: bool = False
    failure: str = ""  # "<region>: <status or exception>" of the check that failed
    b_answered: float | None = None
    addressed_at: float | None = None  # first total >= 2 on A's node subject
    elsewhere_at: float | None = None  # first total >= 2 on any other subject


def log_problems(proc: ManagedProcess) -> tuple[int, int, list[str]]:
    """(error lines, tracebacks included; warning lines; a few distinct such lines)."""
    errors = warnings = 0
    samples: list[str] = []
    with contextlib.suppress(OSError):
        for line in proc.log().splitlines():
            error = "ERROR" in line or "CRITICAL" in line or line.startswith("Traceback")
            warning = "WARNING" in line
            errors += error
            warnings += warning
            text = line.strip()[:200]
            if (error or warning) and len(samples) < 5 and text not in samples:
                samples.append(text)
    return errors, warnings, samples


def labelled(cluster: Cluster) -> list[tuple[str, ManagedProcess]]:
    """Every process of the system so far, named: ``central 1``, ``node ap 2`` (the
    second ap started), ..."""
    seen: dict[str, int] = {}
    named = []
    for proc in cluster.processes:
        kind = proc.args[3] if len(proc.args) > 3 else "process"
        if "--region" in proc.args:
            kind += " " + proc.args[proc.args.index("--region") + 1]
        seen[kind] = seen.get(kind, 0) + 1
        named.append((f"{kind} {seen[kind]}", proc))
    return named


def readyz(url: str) -> dict[str, Any]:
    try:
        body = httpx.get(url + "/readyz", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def convergence(probes: list[Probe]) -> Convergence:
    result = Convergence(probes=sum(not p.failed for p in probes),
                         failed=sum(p.failed for p in probes))
    delays = [max(0.0, p.addressed_at - p.b_answered) * 1000 for p in probes
              if not p.failed and p.addressed_at is not None and p.b_answered is not None]
    result.lost = result.probes - len(delays)
    for p in probes:
        if p.failed:
            result.failures[p.failure] = result.failures.get(p.failure, 0) + 1
    result.elsewhere = sum(not p.failed and p.addressed_at is None
                           and p.elsewhere_at is not None for p in probes)
    if delays:
        result.p50_ms = percentile(delays, 50)
        result.p99_ms = percentile(delays, 99)
        result.max_ms = max(delays)
    return result


def union_count(maps: list[bytes]) -> int:
    """Distinct keys marked in any of ``maps`` (one byte per key, 0 or 1)."""
    merged = 0
    for bits in maps:
        merged |= int.from_bytes(bits, "big")
    return merged.bit_count()


def run_e2e(args: argparse.Namespace, cluster: Cluster, db_url: str,
            centrals: list[ManagedProcess], keys: int) -> E2EResult:
    in_central = sql(db_url, "SELECT count(*), count(DISTINCT (namespace, key_hash)) "
                             "FROM components")[0]
    result = E2EResult(keys=keys, target_rate=args.e2e_rate,
                       load_processes=args.e2e_load_processes,
                       components_in_central=int(in_central[0]),
                       keys_in_central=int(in_central[1]), restart=args.e2e_restart,
                       restart_timeout_s=args.restart_timeout)
    started = time.monotonic()
    nodes = [cluster.node(region) for region in REGIONS]  # each up to /readyz 200
    # 200 may be "degraded" (no snapshot within 2 s: central still loading its ledger).
    states = [readyz(node.url) for node in nodes]
    while (any(state.get("sync") != "ok" for state in states)
           and time.monotonic() - started < args.spread_timeout):
        time.sleep(0.5)
        states = [readyz(node.url) for node in nodes]
    print(f"e2e: nodes up in {time.monotonic() - started:.1f} s, sync "
          f"{[state.get('sync') for state in states]}", flush=True)
    ids = [str(state.get("node_id", "")) for state in states]
    if not all(ids):
        raise RuntimeError(f"a node without a node_id in /readyz: {states}")
    restarted_url = f"http://127.0.0.1:{free_port()}"
    urls = (*(node.url for node in nodes), *((restarted_url,) if args.e2e_restart else ()))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    go, ap_down, ap_up = context.Event(), context.Event(), context.Event()
    procs = [context.Process(target=e2e_load_process, daemon=True, args=(
        E2EPlan(urls=urls, keys=keys, rate=args.e2e_rate / args.e2e_load_processes,
                seconds=args.stage_seconds, seed=keys * 7919 + index,
                connections=E2E_CONNECTIONS), go, ap_down, ap_up, results))
        for index in range(args.e2e_load_processes)]
    datas: list[dict[str, Any]] = []
    try:
        for loader in procs:
            loader.start()
        for _ in procs:
            if results.get(timeout=120) != "ready":
                raise RuntimeError("an e2e load process did not start")
        cpu_before = {pid(p): cpu_seconds(pid(p)) for p in [*centrals, *nodes]}
        go.set()
        observed = asyncio.run(_e2e_observe(args, cluster, nodes, ids, restarted_url,
                                            ap_down, ap_up))
        datas = [results.get(timeout=60) for _ in procs]
        for loader in procs:
            loader.join(timeout=10)
        # --- the load
        result.seconds = max(d["seconds"] for d in datas)
        result.sent_per_s = sum(d["sent_in_time"] for d in datas) / result.seconds
        result.ok_per_s = sum(d["ok_in_time"] for d in datas) / result.seconds
        result.checks_sent = sum(d["sent"] for d in datas)
        result.checks_ok = sum(d["ok"] for d in datas)
        result.not_sent = sum(d["not_sent"] + d["unfinished"] for d in datas)
        for d in datas:
            for label, count in d["answers"].items():
                result.other_answers[label] = result.other_answers.get(label, 0) + count
            for label, count in d["gap_answers"].items():
                result.gap_answers[label] = result.gap_answers.get(label, 0) + count
        # Percentiles of the processes' percentiles: exact with one load process.
        result.check_p50_ms = max(d["latency_p50_ms"] for d in datas)
        result.check_p99_ms = max(d["latency_p99_ms"] for d in datas)
        result.gap_checks = sum(d["gap_sent"] for d in datas)
        result.gap_failed = sum(d["gap_failed"] for d in datas)
        result.load_cpu_share = sum(d["cpu_s"] for d in datas) / result.seconds
        cpu_after: dict[int, float] = observed["cpu_at_load_end"]
        result.central_cpu_share = sum(cpu_after[pid(c)] - cpu_before[pid(c)]
                                       for c in centrals) / result.seconds
        # --- convergence
        probes: list[Probe] = observed["probes"]
        kill_at: float | None = observed["kill_at"]
        cut = [p for p in probes if kill_at is not None and not p.in_window and 2 in (p.a, p.b)
               and kill_at - E2E_KILL_CUT_S < p.started <= kill_at]
        result.probes_cut = len(cut)
        result.convergence = convergence([p for p in probes if not p.in_window and p not in cut])
        result.restart_convergence = convergence([p for p in probes if p.in_window])
        result.restart_seconds_to_sync_ok = observed["sync_ok_s"]
        result.restart_window_s = observed["window_s"]
        # --- node memory, after the load
        restarted = observed["restarted"] is not None
        if restarted:
            nodes[2] = observed["restarted"]
            ids[2] = observed["restarted_id"]
        ap_up_at: float = observed["up_at"] or float("inf")
        for index, (region, node) in enumerate(zip(REGIONS, nodes, strict=True)):
            target = REGION_NODES if index == 2 and restarted else index
            new = index == 2 and restarted
            held = rss = float("nan")
            with contextlib.suppress(httpx.HTTPError):
                held = metric_value(httpx.get(node.url + "/metrics", timeout=10.0).text,
                                    "regionlimit_active_keys")
            with contextlib.suppress(OSError):  # gone: the ap did not come back
                rss = rss_mb(pid(node))
            result.nodes.append(E2ENode(
                region=region, node_id=ids[index], restarted=new,
                checks_ok=sum(d["ok_per_target"][target] for d in datas),
                keys_served=union_count([d["served"][target] for d in datas]),
                probe_keys=sum(not p.failed and index in (p.a, p.b)
                               and (not new or p.started > ap_up_at) for p in probes),
                keys_held=held, rss_mb=rss,
                # The restarted ap: since its start (its Python start-up included).
                cpu_share=(cpu_after.get(pid(node), float("nan"))
                           - cpu_before.get(pid(node), 0.0)) / result.seconds))
        if args.e2e_restart:
            result.killed_ap_keys_served = union_count([d["served"][2] for d in datas])
    finally:
        go.set()  # a load process still waiting must not hang
        for loader in procs:
            if loader.is_alive():
                loader.kill()
        for node in nodes:
            node.kill()  # later stages run without them
    for label, proc in labelled(cluster):
        errors, warnings, samples = log_problems(proc)
        result.log_problems[label] = [errors, warnings]
        result.log_samples += [f"{label}: {line}" for line in samples]
    result.log_samples = result.log_samples[:12]
    return result


async def _e2e_observe(args: argparse.Namespace, cluster: Cluster, nodes: list[ManagedProcess],
                       ids: list[str], restarted_url: str, ap_down: Any, ap_up: Any
                       ) -> dict[str, Any]:
    """The probes, every 100 ms for the load's duration, and (``--e2e-restart``) ap's
    kill and restart halfway; returns the probes and the restart's figures."""
    import nats

    from sync.partitions import node_totals_subject
    from sync.subjects import TOTALS

    urls = [node.url for node in nodes]
    node_ids = list(ids)
    probes: list[Probe] = []
    by_key: dict[str, Probe] = {}
    state: dict[str, Any] = {"kill_at": None, "up_at": None, "sync_ok_s": None,
                             "restarted": None, "restarted_id": None}

    async def on_totals(msg: Any) -> None:
        seen = time.monotonic()
        rows = totals_rows(msg.data)
        for row in rows:
            if not (isinstance(row, list) and len(row) > 3 and isinstance(row[1], str)):
                continue
            found = by_key.get(row[1])
            if found is None or not isinstance(row[3], int) or row[3] < 2:
                continue
            if msg.subject == found.subject:
                if found.addressed_at is None:
                    found.addressed_at = seen
            elif found.elsewhere_at is None:
                found.elsewhere_at = seen

    nc = await nats.connect(cluster.nats.url, max_reconnect_attempts=3)
    sub = await nc.subscribe(f"{TOTALS}.>", cb=on_totals)  # node and partition subjects
    await nc.flush()
    client = httpx.AsyncClient(timeout=5.0)

    async def check(index: int, identifier: str) -> str:
        """'' when answered 200, else what went wrong."""
        try:
            response = await client.post(urls[index] + "/v1/check", json={
                "namespace": PROBE_NAMESPACE, "identifier": identifier, "cost": 1})
        except httpx.HTTPError as exc:
            return f"{REGIONS[index]}: {type(exc).__name__}"
        return "" if response.status_code == 200 else f"{REGIONS[index]}: {response.status_code}"

    async def probe(a: int, b: int, in_window: bool) -> None:
        identifier = f"probe-{uuid.uuid4().hex}"
        found = Probe(cluster.hasher.hash(identifier), a, b, node_totals_subject(node_ids[a]),
                      in_window, time.monotonic())
        probes.append(found)
        by_key[found.key_hash] = found
        found.failure = await check(a, identifier) or await check(b, identifier)
        if found.failure:
            found.failed = True
            return
        found.b_answered = time.monotonic()

    async def restart() -> None:
        await asyncio.sleep(args.stage_seconds / 2)
        ap_down.set()  # the load process sends ap's share to the new port from now on
        state["kill_at"] = time.monotonic()
        await asyncio.to_thread(nodes[2].kill)
        started = time.monotonic()  # the new process starts right away
        try:
            new = await asyncio.to_thread(cluster.node, "ap",
                                          port=int(restarted_url.rsplit(":", 1)[1]),
                                          ready=False)
        except (RuntimeError, TimeoutError) as exc:
            print(f"WARNING: the new ap node did not start: {exc}"[:1000], flush=True)
            return
        state["restarted"] = new
        while time.monotonic() - started < args.restart_timeout:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                body = (await client.get(new.url + "/readyz")).json()
                if body.get("sync") == "ok":
                    state["sync_ok_s"] = time.monotonic() - started
                    node_ids[2] = state["restarted_id"] = str(body.get("node_id"))
                    urls[2] = new.url
                    state["up_at"] = time.monotonic()
                    ap_up.set()  # the end of the gap for the load process
                    return
            await asyncio.sleep(0.1)

    def cpu_now() -> dict[int, float]:
        return {pid(p): cpu_seconds(pid(p)) for p in cluster.processes if p.proc is not None}

    restarting = asyncio.create_task(restart()) if args.e2e_restart else None
    tasks: list[asyncio.Task[None]] = []
    every = [(0, 1), (1, 2), (2, 0), (1, 0), (2, 1), (0, 2)]  # ordered pairs (A, B)
    without_ap = [(0, 1), (1, 0)]
    started = time.monotonic()
    count = 0
    try:
        while time.monotonic() - started < args.stage_seconds:
            in_window = state["kill_at"] is not None and state["up_at"] is None
            pairs = without_ap if in_window else every
            tasks.append(asyncio.create_task(probe(*pairs[count % len(pairs)], in_window)))
            count += 1
            await asyncio.sleep(max(0.0, started + count * E2E_PROBE_S - time.monotonic()))
        load_end = time.monotonic()
        cpu_at_load_end = cpu_now()
        if restarting is not None:
            await restarting  # bounded by --restart-timeout
        await asyncio.gather(*tasks)
        # Give the last probes their chance.
        for _ in range(int(PROBE_GIVE_UP_S / 0.1) + 1):  # every probe answered by now
            if not any(p.addressed_at is None and not p.failed and p.b_answered is not None
                       and time.monotonic() - p.b_answered < PROBE_GIVE_UP_S for p in probes):
                break
            await asyncio.sleep(0.1)
    finally:
        if restarting is not None and not restarting.done():
            restarting.cancel()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await nc.close()
        await client.aclose()
    kill_at = state["kill_at"]
    return {"probes": probes, "kill_at": kill_at, "up_at": state["up_at"],
            "sync_ok_s": state["sync_ok_s"], "restarted": state["restarted"],
            "restarted_id": state["restarted_id"], "cpu_at_load_end": cpu_at_load_end,
            "window_s": ((state["up_at"] or load_end) - kill_at) if kill_at is not None
            else 0.0}


# --- output ----------------------------------------------------------------------------------

def seconds_or_timeout(seconds: float | None, timeout: float) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"not within {timeout:.0f} s"


def table(report: Report) -> str:
    title = (f"central: {report.replicas} replica{'s' if report.replicas != 1 else ''}, "
             f"{report.partitions} partitions"
             + (f", {report.seed_components:,} components seeded" if report.seed_components
                else ""))
    head = ("| K | target/s | offered/s | new comp. | entries/s published / ingested | "
            "ledger rows/s | commit lag "
            "p99 / max s | conv. p50 / p99 ms (lost) | partitions lost | "
            f"central RSS MB ({report.replicas} repl.) | RSS B/component |")
    lines = [title]
    if report.stages:
        lines += ["", head, "|" + " --- |" * 11]
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
            took = seconds_or_timeout(r.seconds_to_sync_ok, r.timeout_s)
            lines.append(f"| {r.keys:,} | {r.components:,} | {took} |")
    if report.failovers:
        lines += ["", "| K | components in central | replicas killed / before | "
                  "partitions of the killed one | kill to all partitions led | "
                  "kill to probe total |", "| --- | --- | --- | --- | --- | --- |"]
        for f in report.failovers:
            lines.append(f"| {f.keys:,} | {f.components:,} | 1 / {f.replicas} | "
                         f"{len(f.killed_partitions)} of {f.partitions} | "
                         f"{seconds_or_timeout(f.seconds_to_cover, f.timeout_s)} | "
                         f"{seconds_or_timeout(f.seconds_to_probe_total, f.timeout_s)} |")
    for e in report.e2e:
        lines += ["", *e2e_table(e)]
    return "\n".join(lines)


def answers_text(answers: dict[str, int]) -> str:
    return ", ".join(f"{label}: {count:,}" for label, count in sorted(answers.items())) or "none"


def convergence_text(c: Convergence) -> str:
    return (f"{c.p50_ms:.0f} / {c.p99_ms:.0f} / {c.max_ms:.0f} ms ({c.probes:,} probes, "
            f"{c.lost} lost{f', {c.elsewhere} of them seen elsewhere' if c.elsewhere else ''}"
            f", {c.failed} failed{f': {answers_text(c.failures)}' if c.failures else ''})")


def e2e_table(e: E2EResult) -> list[str]:
    lines = [f"e2e: 3 nodes, K = {e.keys:,}, {e.keys_in_central:,} keys "
             f"({e.components_in_central:,} components) in central at the start, "
             f"{e.load_processes} load process(es), {e.seconds:.0f} s; CPU (1.0 = one "
             f"core) of the load {e.load_cpu_share:.2f}, of central "
             f"{e.central_cpu_share:.2f}",
             "", "| target/s | sent/s | 200/s | not 200 | not sent | check p50 / p99 ms | "
             "conv. p50 / p99 / max (A's node subject) |", "| --- |" + " --- |" * 6,
             f"| {e.target_rate:,} | {e.sent_per_s:,.0f} | {e.ok_per_s:,.0f} | "
             f"{answers_text(e.other_answers)} | {e.not_sent:,} | "
             f"{e.check_p50_ms:.1f} / {e.check_p99_ms:.1f} | {convergence_text(e.convergence)} |",
             "", "| node | keys held | keys served | + probe keys | K | held / K | checks 200 "
             "| RSS MB | CPU |", "| --- |" + " --- |" * 8]
    for n in e.nodes:
        name = f"{n.region}{' (restarted)' if n.restarted else ''}"
        lines.append(f"| {name} | {n.keys_held:,.0f} | {n.keys_served:,} | "
                     f"{n.keys_served + n.probe_keys:,} | {e.keys:,} | "
                     f"{n.keys_held / e.keys:.3f} | {n.checks_ok:,} | {n.rss_mb:.0f} | "
                     f"{n.cpu_share:.2f} |")
    if e.restart:
        lines += ["", "| ap start to sync ok | window (kill to sync ok) | checks to ap in it: "
                  "not 200 / sent | us <-> eu conv. p50 / p99 / max in it | killed ap served |",
                  "| --- |" + " --- |" * 4,
                  f"| {seconds_or_timeout(e.restart_seconds_to_sync_ok, e.restart_timeout_s)} | "
                  f"{e.restart_window_s:.1f} s | {e.gap_failed:,} / {e.gap_checks:,} "
                  f"({answers_text(e.gap_answers)}) | "
                  f"{convergence_text(e.restart_convergence)} | "
                  f"{e.killed_ap_keys_served:,} keys |"]
        if e.probes_cut:
            lines.append(f"({e.probes_cut} probes with ap started just before its kill: not "
                         "counted)")
    lines += ["", *e2e_targets(e)]
    problems = {label: counts for label, counts in e.log_problems.items() if any(counts)}
    lines += ["", "process logs (error / warning lines, whole life): "
              + (", ".join(f"{label} {c[0]} / {c[1]}" for label, c in problems.items())
                 or "none")]
    lines += [f"  {line}" for line in e.log_samples]
    return lines


def e2e_targets(e: E2EResult) -> list[str]:
    """Issue 13's targets, each with what this run measured and under what conditions."""
    def verdict(met: bool, full: bool) -> str:
        return ("met" if met else "MISSED") + ("" if full else " (at a smaller scale than "
                                               "the target's)")

    full_load = e.sent_per_s >= 0.95 * 3000 and e.keys >= 1_000_000
    p99 = e.convergence.p99_ms
    lines = [f"target: end to end with 3 nodes at 3,000 checks/s over 1M keys: convergence "
             f"p99 <= 300 ms -> {p99:.0f} ms at {e.sent_per_s:,.0f} checks/s over "
             f"{e.keys:,} keys, {e.convergence.lost} of {e.convergence.probes} probes lost: "
             + verdict(p99 <= 300 and e.convergence.lost == 0, full_load)]
    if e.restart:
        took = e.restart_seconds_to_sync_ok
        full_central = e.keys_in_central >= 1_000_000
        lines.append(f"target: node restart with 1M keys in central: /readyz sync ok in <= 15 s "
                     f"-> {seconds_or_timeout(took, e.restart_timeout_s)} with "
                     f"{e.keys_in_central:,} keys in central: "
                     + verdict(took is not None and took <= 15, full_central))
        during = e.restart_convergence.p99_ms
        lines.append(f"target: other nodes' convergence p99 <= 500 ms during it -> "
                     f"{during:.0f} ms (us <-> eu, {e.restart_convergence.probes} probes, "
                     f"{e.restart_convergence.lost} lost): "
                     + verdict(during <= 500 and e.restart_convergence.lost == 0,
                               full_central and full_load))
    for n in e.nodes:
        bound = n.keys_served + n.probe_keys
        lines.append(f"target: a node that served 1/3 of 1M keys holds <= 1/3 of them plus the "
                     f"hot ones -> {n.region}{' (restarted)' if n.restarted else ''} served "
                     f"{n.keys_served:,} of {e.keys:,} keys ({n.keys_served / e.keys:.1%}) and "
                     f"{n.probe_keys:,} hot probe keys, holds {n.keys_held:,.0f} (bound "
                     f"{bound:,}): " + verdict(n.keys_held <= bound, e.keys >= 1_000_000))
    return lines


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
                        help="comma list of sustain, restart, e2e, failover")
    parser.add_argument("--replicas", type=int, default=1,
                        help="central processes on the same database and NATS")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="REGIONLIMIT_PARTITIONS of central and the pseudo-nodes")
    parser.add_argument("--seed-components", type=int, default=0,
                        help="components inserted into the ledger before central starts")
    parser.add_argument("--spread-timeout", type=float, default=300.0,
                        help="how long the replicas may take to share the partitions (s)")
    parser.add_argument("--failover-timeout", type=float, default=180.0)
    parser.add_argument("--give-up-lag", type=float, default=20.0,
                        help="end a stage early once the commit lag passes this (s)")
    parser.add_argument("--restart-timeout", type=float, default=60.0)
    parser.add_argument("--e2e-rate", type=int, default=3000,
                        help="e2e stage: checks/s sent to the three nodes")
    parser.add_argument("--e2e-restart", action="store_true",
                        help="e2e stage: SIGKILL and restart node ap halfway through the load")
    parser.add_argument("--e2e-load-processes", type=int, default=1,
                        help="e2e stage: processes sending the checks (each rate / n)")
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
    if unknown := stages - {"sustain", "restart", "e2e", "failover"}:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    if args.replicas < 1 or not 1 <= args.partitions <= MAX_PARTITIONS:
        parser.error(f"--replicas >= 1 and 1 <= --partitions <= {MAX_PARTITIONS}")
    if "failover" in stages and args.replicas < 2:
        parser.error("the failover stage needs --replicas 2 or more")
    if "e2e" in stages and (args.e2e_rate < 1 or args.e2e_load_processes < 1):
        parser.error("--e2e-rate and --e2e-load-processes >= 1")
    report = Report(machine=machine(), replicas=args.replicas, partitions=args.partitions,
                    seed_components=args.seed_components)
    print(report.machine)
    print(f"central: {args.replicas} replica(s), {args.partitions} partitions", flush=True)
    for keys in args.keys:
        with system(args) as (cluster, db_url, centrals):
            empty_rss = [rss_mb(pid(c)) for c in centrals]
            if "sustain" in stages:
                for index, rate in enumerate(args.rates):
                    stage = run_stage(args, cluster, db_url, centrals, keys, rate,
                                      empty_rss, index)
                    report.stages.append(stage)
                    print(f"K={keys:,} rate={rate:,}: {asdict(stage)}", flush=True)
                    if stage.gave_up:
                        break  # past the breaking point: higher rates tell nothing more
            if "restart" in stages:
                restart = run_restart(args, cluster, db_url, keys)
                report.restarts.append(restart)
                print(f"restart: {asdict(restart)}", flush=True)
            if "e2e" in stages:
                e2e = run_e2e(args, cluster, db_url, centrals, keys)
                report.e2e.append(e2e)
                print(f"e2e K={keys:,}: {e2e.sent_per_s:,.0f} checks/s sent, convergence "
                      f"p99 {e2e.convergence.p99_ms:.0f} ms, restart to sync ok "
                      f"{e2e.restart_seconds_to_sync_ok}", flush=True)
            if "failover" in stages:
                failover = run_failover(args, cluster, db_url, centrals, keys)
                report.failovers.append(failover)
                print(f"failover: {asdict(failover)}", flush=True)
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
