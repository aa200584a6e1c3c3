"""Ledger write efficiency: checks per ledger row, and ledger rows per second, by rate.

    .venv/bin/python -m bench.ledger_efficiency [--rates 1000,5000,10000] [--seconds 20]
        [--keys 10] [--batch 50] [--commit-interval 1s] [--postgres URL]

A whole system on loopback (own nats-server, throwaway Postgres database, central, nodes
us, eu, ap as processes; defaults flush 100 ms, tick 100 ms, commit 1 s). Traffic: 10 hot
keys in a configured namespace (fixed window, 1 h, limit 10^9, so every check is admitted
and counted), spread evenly over the three nodes, sent as `/v1/check/batch` requests of 50
checks (5 per key) at a steady pace per node, for `--seconds` at each rate.

Rows written = what Postgres reports for the two usage tables (pg_stat_user_tables
n_tup_ins + n_tup_upd of `components` and `usage_hourly`) between two quiet points: before
each rate the system idles 12 s, so that central's last commit is done and every backend
has flushed its table statistics (Postgres 15 flushes them at most once a second, and
within 10 s of going idle). The rows therefore include the final commit after the traffic
stops; rows/s divides by the traffic's duration.

Expected from the design: per commit, central writes at most one component row per
(key, window, node) and one bucket row per (key, region, hour) that changed, so rows/s is
bounded by commits/s x (keys x nodes + keys x regions) = 1 x (30 + 30) = 60, whatever the
request rate.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import orjson

from bench._cluster import (
    BenchCluster,
    PacedBatches,
    common_args,
    cpu_seconds,
    load_after,
    machine,
    metric_value,
    metrics,
)

NAMESPACE = "hot"
POLICY = f"""
[namespaces.{NAMESPACE}]
limit = 1000000000
duration = "1h"
algorithm = "fixed_window"
"""
QUIET_S = 12.0
TARGET_CHECKS_PER_ROW = 100.0
TABLES = ("components", "usage_hourly")


def ledger_counters(system: BenchCluster) -> dict[str, float]:
    rows = system.sql(
        "SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables "
        f"WHERE relname IN ({', '.join(repr(t) for t in TABLES)})")
    found: dict[str, float] = {}
    for name, ins, upd in rows:
        found[f"{name}.ins"] = ins
        found[f"{name}.upd"] = upd
    commits = system.sql("SELECT xact_commit FROM pg_stat_database "
                         "WHERE datname = current_database()")[0][0]
    found["xact_commit"] = commits
    body = metrics(system.central_url)
    found["entries"] = metric_value(body, "regionlimit_ingest_entries_total")
    found["batches"] = metric_value(body, "regionlimit_ingest_batches_total")
    found["commits"] = metric_value(body, "regionlimit_commit_duration_seconds_count")
    found["commit_s"] = metric_value(body, "regionlimit_commit_duration_seconds_sum")
    for name, pid in system.pids.items():
        found[f"cpu.{name}"] = cpu_seconds(pid)
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def bodies(keys: list[str], batch: int) -> list[tuple[bytes, int]]:
    checks = [{"namespace": NAMESPACE, "identifier": keys[i % len(keys)], "cost": 1}
              for i in range(batch)]
    return [(orjson.dumps({"checks": checks}), batch)]


def run_rate(system: BenchCluster, keys: list[str], rate: float, seconds: float,
             batch: int) -> PacedBatches:
    nodes = system.node_urls
    per_node = rate / len(nodes) / batch
    return PacedBatches(nodes, [bodies(keys, batch) for _ in nodes], [per_node] * len(nodes),
                        duration_s=seconds).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--commit-interval", default=None,
                        help="central's REGIONLIMIT_COMMIT_INTERVAL (default: the product's)")
    common_args(parser)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    env = {"REGIONLIMIT_COMMIT_INTERVAL": args.commit_interval} if args.commit_interval else {}
    print(machine())
    print(f"system: nats-server + central + nodes us, eu, ap on 127.0.0.1; flush 100 ms, "
          f"tick 100 ms, commit {args.commit_interval or '1s (default)'}; {args.keys} hot keys "
          f"x 3 nodes, /v1/check/batch of {args.batch} checks, {args.seconds:g} s per rate")
    run = uuid.uuid4().hex[:8]
    keys = [f"hot-{run}-{i}" for i in range(args.keys)]
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    with BenchCluster(postgres=args.postgres, policy_toml=POLICY, env=env) as system:
        run_rate(system, keys, 1000, 3.0, args.batch)  # warm up
        time.sleep(QUIET_S)
        before = ledger_counters(system)
        for rate in rates:
            print(f"  offering {rate:,.0f} checks/s for {args.seconds:g} s ...", flush=True)
            load = run_rate(system, keys, rate, args.seconds, args.batch)
            time.sleep(QUIET_S)
            after = ledger_counters(system)
            d = delta(after, before)
            before = after
            rows_c = d["components.ins"] + d["components.upd"]
            rows_b = d["usage_hourly.ins"] + d["usage_hourly.upd"]
            rows = rows_c + rows_b
            results.append({
                "offered": rate, "achieved": load.achieved_rate, "checks": load.total_answered,
                "admitted": load.total_admitted, "http": sum(load.requests),
                "errors": len(load.errors), "late_s": max(load.late_s),
                "elapsed": load.elapsed_s, "rows_c": rows_c, "rows_b": rows_b, "rows": rows,
                "rows_per_s": rows / load.elapsed_s,
                "checks_per_row": load.total_answered / rows if rows else float("inf"),
                "commits": d["commits"], "xact": d["xact_commit"],
                "entries": d["entries"], "batches": d["batches"],
                "commit_ms": 1000 * d["commit_s"] / d["commits"] if d["commits"] else 0.0,
                "cpu": {k[4:]: v / load.elapsed_s for k, v in d.items() if k.startswith("cpu.")},
            })
            if load.errors:
                print(f"    {len(load.errors)} errors, first: {load.errors[0]}")
    print()
    print("| offered checks/s | achieved checks/s | HTTP req/s | usage entries ingested/s "
          "| commits | component rows | bucket rows | ledger rows/s | checks per row |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['offered']:,.0f} | {r['achieved']:,.0f} | {r['http'] / r['elapsed']:,.0f} | "
              f"{r['entries'] / r['elapsed']:,.0f} | {r['commits']:.0f} | {r['rows_c']:.0f} | "
              f"{r['rows_b']:.0f} | {r['rows_per_s']:.1f} | {r['checks_per_row']:,.0f} |")
    print()
    print("CPU use during each rate (cores; user+system / wall):")
    for r in results:
        cpu = "  ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items())
        print(f"  {r['offered']:>7,.0f}/s: {cpu}; mean commit {r['commit_ms']:.1f} ms; "
              f"load generator behind schedule at the end by {r['late_s'] * 1000:.0f} ms")
    print()
    for r in results:
        if r["offered"] >= 5000:
            verdict = ("meets" if r["checks_per_row"] >= TARGET_CHECKS_PER_ROW else
                       f"MISSES by {100 * (1 - r['checks_per_row'] / TARGET_CHECKS_PER_ROW):.0f}%")
            print(f"SUMMARY ledger efficiency at {r['achieved']:,.0f} checks/s: "
                  f"{r['checks_per_row']:,.0f} checks per ledger row ({verdict} the >= "
                  f"{TARGET_CHECKS_PER_ROW:.0f} target), {r['rows_per_s']:.1f} rows/s")
    flat = ", ".join(f"{r['rows_per_s']:.1f}" for r in results)
    achieved = ", ".join(f"{r['achieved']:,.0f}" for r in results)
    print(f"SUMMARY ledger rows/s at {achieved} checks/s: {flat} (bound from the design: "
          f"commits/s x ({args.keys} keys x 3 nodes + {args.keys} keys x 3 regions) = "
          f"{6 * args.keys} per commit); run took {time.monotonic() - started:.0f} s; "
          f"{load_after()}")


if __name__ == "__main__":
    main()
