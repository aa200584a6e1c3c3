"""Over-admission in fast mode: one key spread over three nodes, measured vs predicted.

    .venv/bin/python -m bench.over_admission [--rates 100,1000,5000] [--repeats 3]
        [--lag-samples 60] [--postgres URL]

A whole system on loopback (own nats-server, throwaway Postgres database, central, nodes
us, eu, ap as processes; defaults flush 100 ms, tick 100 ms). For each total rate and
repeat, a fresh key in an inline fixed-window namespace (duration 1 h, limit = rate x 2 s)
gets checks spread evenly over the three nodes at a steady pace for 3 s (1.5 x limit
checks), so the key reaches its limit about 2 s in. Checks go as `/v1/check/batch`
requests of the checks one node is due in ~10 ms (1 at 100/s, 3 at 1,000/s, 17 at
5,000/s), all for the same key. Admitted = allowed answers; over-admission = admitted -
limit, as a percentage of the limit. Central's own figure (the increase of
`regionlimit_over_admission`) and the ledger's sum of the key's components are printed
beside it.

Prediction from the design: over-admission is bounded by what the other nodes admit during
one sync lag: predicted = rate x (n-1)/n x lag, with n = 3. The lag is the convergence
delay of bench/convergence.py, measured first on this same system (`--lag-samples`, default
200; or read from a convergence.json with `--lag-from`): p50 lag for the expected value, p99
lag for the bound. The design's own worst case, flush interval + tick interval (200 ms)
plus transit, is shown too. The nodes' `regionlimit_sync_lag_seconds` during the runs (all
three nodes, under the load) is printed per rate; its tail is inflated once the key is
denied, because a total whose only change is denied cost carries the as_of of the last
admission (see docs/modes-and-accuracy.md).

The system runs with `REGIONLIMIT_BROADCAST_SHARE=0` (as bench/convergence.py), so the lag
measured first is the lag of a key that is sent; the checks are on keys of three serving
nodes, for which the interest rule keeps the same bound (docs/modes-and-accuracy.md).

The plot goes to bench/out/over_admission.png, the figures to bench/out/over_admission.json
(bench/out/ is git-ignored: a run never overwrites the dated record in bench/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench import convergence
from bench._cluster import (
    OUT_DIR,
    BenchCluster,
    PacedBatches,
    bucket_delta,
    common_args,
    histogram_buckets,
    histogram_quantile,
    load_after,
    machine,
    metric_value,
    metrics,
)

NAMESPACE = "overadm"
WINDOW_S = 2.0  # limit = rate x WINDOW_S
RUN_S = 3.0
BATCH_EVERY_S = 0.010
NODES = 3
WORST_LAG_MS = 200.0  # flush interval + tick interval (defaults), transit left out
PLOT = Path(__file__).resolve().parent / "out" / "over_admission.png"


def one_run(system: BenchCluster, rate: float) -> dict[str, Any]:
    at = time.monotonic() - system.started
    limit = round(rate * WINDOW_S)
    identifier = f"over-{uuid.uuid4().hex[:12]}"
    per_node = rate / NODES
    batch = max(1, round(per_node * BATCH_EVERY_S))
    check = {"namespace": NAMESPACE, "identifier": identifier, "cost": 1, "limit": limit,
             "duration": "1h", "algorithm": "fixed_window"}
    body = orjson.dumps({"checks": [check] * batch})
    central_before = metric_value(metrics(system.central_url), "regionlimit_over_admission_total",
                                  namespace=NAMESPACE)
    lag_before = node_lag(system)
    load = PacedBatches(system.node_urls, [[(body, batch)]] * NODES,
                        [per_node / batch] * NODES, duration_s=RUN_S).run()
    if load.errors:
        raise RuntimeError(f"{len(load.errors)} errors, first: {load.errors[0]}")
    admitted = load.total_admitted
    key_hash = system.cluster.hasher.hash(identifier)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    ledger = -1
    while time.monotonic() < deadline:
        ledger = int(system.sql("SELECT COALESCE(SUM(admitted), 0) FROM components "
                                f"WHERE key_hash = '{key_hash}'")[0][0])
        if ledger == admitted:
            break
        time.sleep(0.2)
    central_after = metric_value(metrics(system.central_url), "regionlimit_over_admission_total",
                                 namespace=NAMESPACE)
    lag_during = bucket_delta(node_lag(system), lag_before)
    return {
        "at_s": at, "rate": rate, "limit": limit, "batch": batch, "answered": load.total_answered,
        "achieved": load.achieved_rate, "admitted": admitted, "over": admitted - limit,
        "over_pct": 100 * (admitted - limit) / limit,
        "per_node_admitted": list(load.admitted), "central_over": central_after - central_before,
        "ledger_admitted": ledger, "late_s": max(load.late_s), "node_lag": lag_during,
        "max_rtt_ms": 1000 * max(load.max_rtt_s),
        # the staleness that would explain this over-admission: over / (rate x (n-1)/n)
        "implied_lag_ms": 1000 * (admitted - limit) / (rate * (NODES - 1) / NODES),
    }


def node_lag(system: BenchCluster) -> list[tuple[float, float]]:
    """All nodes' regionlimit_sync_lag_seconds, summed."""
    summed: dict[float, float] = {}
    for url in system.node_urls:
        for bound, count in histogram_buckets(metrics(url), "regionlimit_sync_lag_seconds"):
            summed[bound] = summed.get(bound, 0.0) + count
    return sorted(summed.items())


def plot(rows: list[dict[str, Any]], lag: dict[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['rate']:,.0f}/s" for r in rows]
    xs = range(len(rows))
    means = [r["mean_pct"] for r in rows]
    lows = [r["mean_pct"] - r["min_pct"] for r in rows]
    highs = [r["max_pct"] - r["mean_pct"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.bar(xs, means, width=0.5, color="#4c78a8", label="measured (mean; bar = min..max)",
           yerr=[lows, highs], capsize=6, ecolor="#222")
    ax.plot(xs, [r["pred_p50_pct"] for r in rows], "o--", color="#f58518",
            label=f"predicted, p50 lag ({lag['p50']:.0f} ms)")
    ax.plot(xs, [r["pred_p99_pct"] for r in rows], "s:", color="#e45756",
            label=f"bound, p99 lag ({lag['p99']:.0f} ms)")
    ax.plot(xs, [r["pred_worst_pct"] for r in rows], "^-.", color="#54a24b",
            label=f"flush + tick ({WORST_LAG_MS:.0f} ms)")
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("total check rate on one key, spread over 3 nodes")
    ax.set_ylabel("over-admission, % of the limit")
    ax.set_title("Fast mode over-admission (fixed window, limit = rate x 2 s)")
    top = max(max(r["max_pct"] for r in rows), max(r["pred_p99_pct"] for r in rows),
              max(r["pred_worst_pct"] for r in rows))
    ax.set_ylim(0, top * 1.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,1000,5000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lag-samples", type=int, default=200)
    parser.add_argument("--lag-from", type=Path, default=None,
                        help="use the lag in this convergence.json instead of measuring")
    parser.add_argument("--plot", type=Path, default=PLOT)
    common_args(parser)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(machine())
    print(f"system: nats-server + central + nodes us, eu, ap on 127.0.0.1; flush 100 ms, tick "
          f"100 ms; fixed window 1 h, limit = rate x {WINDOW_S:g} s, {RUN_S:g} s of traffic "
          f"per run, {args.repeats} runs per rate")
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with BenchCluster(postgres=args.postgres, policy_toml=convergence.POLICY,
                      env=convergence.CONVERGENCE_ENV) as system:
        if args.lag_from is not None:
            measured = json.loads(args.lag_from.read_text())
            print(f"  sync lag from {args.lag_from} ({measured['samples']} samples)")
        else:
            print(f"  measuring the sync lag as bench/convergence.py does ({args.lag_samples} "
                  "samples, A = us, B = eu) ...", flush=True)
            convergence.measure(system.node_urls[0], system.node_urls[1], 10, progress=False)
            measured = convergence.measure(system.node_urls[0], system.node_urls[1],
                                           args.lag_samples, progress=False)
        lag = measured["delay_ms"]
        print(f"  lag: p50 {lag['p50']:.0f} ms, mean {lag['mean']:.0f} ms, p99 {lag['p99']:.0f} "
              f"ms, max {lag['max']:.0f} ms")
        one_run(system, 100)  # warm up
        for repeat in range(args.repeats):
            for rate in rates:
                run = one_run(system, rate)
                run["repeat"] = repeat
                runs.append(run)
                print(f"  {rate:>6,.0f}/s run {repeat + 1}: achieved {run['achieved']:,.0f}/s, "
                      f"limit {run['limit']:,}, admitted {run['admitted']:,} "
                      f"(per node {run['per_node_admitted']}), over {run['over']:+,} "
                      f"({run['over_pct']:+.2f}%), central says {run['central_over']:,.0f}, "
                      f"ledger {run['ledger_admitted']:,}; implied lag {run['implied_lag_ms']:.0f} "
                      f"ms; slowest check request {run['max_rtt_ms']:.0f} ms; at "
                      f"t+{run['at_s']:.0f} s", flush=True)
    rows = []
    share = (NODES - 1) / NODES
    for rate in rates:
        mine = [r for r in runs if r["rate"] == rate]
        pcts = [r["over_pct"] for r in mine]
        overs = [r["over"] for r in mine]
        node_lag_hist: list[tuple[float, float]] = []
        for r in mine:
            add = dict(node_lag_hist)
            node_lag_hist = [(b, add.get(b, 0.0) + c) for b, c in r["node_lag"]]
        rows.append({
            "rate": rate, "limit": mine[0]["limit"], "batch": mine[0]["batch"],
            "achieved": statistics.fmean(r["achieved"] for r in mine),
            "mean_over": statistics.fmean(overs), "max_over": max(overs),
            "mean_pct": statistics.fmean(pcts), "min_pct": min(pcts), "max_pct": max(pcts),
            "pred_p50": rate * share * lag["p50"] / 1000,
            "pred_p99": rate * share * lag["p99"] / 1000,
            "pred_p50_pct": 100 * share * lag["p50"] / 1000 / WINDOW_S,
            "pred_p99_pct": 100 * share * lag["p99"] / 1000 / WINDOW_S,
            "pred_worst": rate * share * WORST_LAG_MS / 1000,
            "pred_worst_pct": 100 * share * WORST_LAG_MS / 1000 / WINDOW_S,
            "node_lag_p50": 1000 * histogram_quantile(0.5, node_lag_hist),
            "node_lag_p99": 1000 * histogram_quantile(0.99, node_lag_hist),
            "ledger_ok": all(r["ledger_admitted"] == r["admitted"] for r in mine),
            "central_ok": all(r["central_over"] == max(0, r["over"]) for r in mine),
        })
    print()
    print(f"| total rate (achieved) | limit | checks per batch | over-admitted: mean / max "
          f"| % of limit: mean / max | predicted, p50 lag {lag['p50']:.0f} ms "
          f"| bound, p99 lag {lag['p99']:.0f} ms | flush + tick {WORST_LAG_MS:.0f} ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rate']:,.0f}/s ({r['achieved']:,.0f}/s) | {r['limit']:,} | {r['batch']} | "
              f"{r['mean_over']:,.1f} / {r['max_over']:,} | {r['mean_pct']:.2f}% / "
              f"{r['max_pct']:.2f}% | {r['pred_p50']:,.1f} ({r['pred_p50_pct']:.2f}%) | "
              f"{r['pred_p99']:,.1f} ({r['pred_p99_pct']:.2f}%) | "
              f"{r['pred_worst']:,.1f} ({r['pred_worst_pct']:.2f}%) |")
    print("\nnodes' own regionlimit_sync_lag_seconds during the runs (flush -> applied; all three "
          "nodes, interpolated in buckets; once the key is at its limit, totals that changed "
          "only in denied cost re-send an old as_of, which inflates the tail):")
    for r in rows:
        print(f"  {r['rate']:>6,.0f}/s: p50 ~{r['node_lag_p50']:.0f} ms, "
              f"p99 ~{r['node_lag_p99']:.0f} ms")
    print(f"\nledger components == admitted in every run: {all(r['ledger_ok'] for r in rows)}; "
          f"central's regionlimit_over_admission == measured in every run: "
          f"{all(r['central_ok'] for r in rows)}")
    plot(rows, lag, args.plot)
    OUT_DIR.mkdir(exist_ok=True)
    for run in runs:
        run["node_lag"] = [["+Inf" if b == float("inf") else b, c] for b, c in run["node_lag"]]
    (OUT_DIR / "over_admission.json").write_text(json.dumps(
        {"lag_ms": lag, "runs": runs, "rows": rows}, indent=1))
    print(f"plot: {args.plot}")
    for r in rows:
        p99 = "within" if r["max_over"] <= r["pred_p99"] else "ABOVE"
        worst = "within" if r["max_over"] <= r["pred_worst"] else "ABOVE"
        print(f"SUMMARY over-admission at {r['achieved']:,.0f} checks/s on one key over 3 "
              f"nodes: mean {r['mean_pct']:.2f}%, max {r['max_pct']:.2f}% of the limit "
              f"(predicted {r['pred_p50_pct']:.2f}% at p50 lag, {r['pred_p99_pct']:.2f}% at "
              f"p99 lag, {r['pred_worst_pct']:.2f}% at flush + tick; max {p99} the p99 bound, "
              f"{worst} the flush + tick one)")
    print(f"run took {time.monotonic() - started:.0f} s; {load_after()}")


if __name__ == "__main__":
    main()
