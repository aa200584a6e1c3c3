"""Convergence: from an admission at node A until node B's remote count includes it.

    .venv/bin/python -m bench.convergence [--samples 200] [--postgres URL]

A whole system runs on loopback with the product defaults (node flush 100 ms, central
tick 100 ms, commit 1 s): its own nats-server, a throwaway Postgres database, central and
three region nodes (us, eu, ap) as processes. Each sample uses a fresh key in a configured
namespace (fixed window, 1 h, limit 1,000,000):

1. one cost-1 check on B, then a 300 ms pause: B serves the key (central holds B's
   component), as a node must for central to send it the key's totals (the interest
   rule, docs/modes-and-accuracy.md); `remaining` = limit - 1 on B;
2. a random pause of 0..200 ms, so admissions fall at every phase of the flush and tick
   timers;
3. t0; one cost-1 check on A (us);
4. cost-0 checks on B (eu), back to back, until `remaining` drops below limit - 1: t1.

The system runs with ``REGIONLIMIT_BROADCAST_SHARE=0`` (``CONVERGENCE_ENV``): what is
measured is how fast a total reaches a node that needs it; with the default share a key
this far below its limit is deliberately sent to no node at all.

The delay t1 - t0 includes A's HTTP round trip and is quantised by B's polling round trip
(printed). It covers the whole path: wait for A's next flush, JetStream publish, central's
fetch and merge, wait for central's next tick, the totals broadcast, B applying it.

B's own `regionlimit_sync_lag_seconds` histogram (the increase over the run) is printed
beside it: the node measures from the flush time of the newest batch behind a total until
it applies it, so it leaves out the wait for A's flush (0..flush interval).

Results also go to bench/out/convergence.json (over_admission.py can reuse the lag).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from typing import Any

import httpx

from bench._cluster import (
    OUT_DIR,
    BenchCluster,
    bucket_delta,
    common_args,
    histogram_buckets,
    histogram_quantile,
    load_after,
    machine,
    metrics,
    percentile,
)

LIMIT = 1_000_000
NAMESPACE = "conv"
POLICY = f"""
[namespaces.{NAMESPACE}]
limit = {LIMIT}
duration = "1h"
algorithm = "fixed_window"
"""
TARGET_P99_MS = 250.0
CONVERGENCE_ENV = {"REGIONLIMIT_BROADCAST_SHARE": "0"}  # every change goes to serving nodes
SETTLE_S = 0.3  # B's flush (100 ms) and central's merge, before A's admission
GIVE_UP_S = 5.0


def check(client: httpx.Client, url: str, identifier: str, cost: int) -> dict[str, Any]:
    response = client.post(f"{url}/v1/check", json={
        "namespace": NAMESPACE, "identifier": identifier, "cost": cost})
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def measure(node_a: str, node_b: str, samples: int, *, max_pause_s: float = 0.2,
            progress: bool = True) -> dict[str, Any]:
    """Sample the admission-to-visibility delay between two nodes of a running system."""
    delays_ms: list[float] = []
    admit_rtt_ms: list[float] = []
    poll_rtt_ms: list[float] = []
    timeouts = 0
    run = uuid.uuid4().hex[:8]
    before = histogram_buckets(metrics(node_b), "regionlimit_sync_lag_seconds")
    with httpx.Client(timeout=5.0) as client:
        for i in range(samples):
            key = f"conv-{run}-{i}"
            check(client, node_b, key, 1)
            time.sleep(SETTLE_S + random.uniform(0, max_pause_s))
            t0 = time.perf_counter()
            assert check(client, node_a, key, 1)["allowed"]
            admit_rtt_ms.append((time.perf_counter() - t0) * 1000)
            polls, seen = 0, False
            while time.perf_counter() - t0 < GIVE_UP_S:
                p0 = time.perf_counter()
                remaining = check(client, node_b, key, 0)["remaining"]
                t1 = time.perf_counter()
                poll_rtt_ms.append((t1 - p0) * 1000)
                polls += 1
                if remaining < LIMIT - 1:
                    seen = True
                    break
            if seen:
                delays_ms.append((t1 - t0) * 1000)
            else:
                timeouts += 1
            if progress and (i + 1) % 50 == 0:
                print(f"  {i + 1}/{samples} samples", flush=True)
    after = histogram_buckets(metrics(node_b), "regionlimit_sync_lag_seconds")
    lag = bucket_delta(after, before)
    if not delays_ms:
        raise RuntimeError(f"no admission at A became visible at B within {GIVE_UP_S} s "
                           f"({timeouts} tries)")
    return {
        "samples": len(delays_ms),
        "timeouts": timeouts,
        "delay_ms": {
            "p50": percentile(delays_ms, 50), "p90": percentile(delays_ms, 90),
            "p99": percentile(delays_ms, 99), "max": max(delays_ms), "min": min(delays_ms),
            "mean": statistics.fmean(delays_ms),
        },
        "delays_ms": delays_ms,
        "admit_rtt_ms_p50": percentile(admit_rtt_ms, 50),
        "poll_rtt_ms_p50": percentile(poll_rtt_ms, 50),
        "poll_rtt_ms_p99": percentile(poll_rtt_ms, 99),
        "node_lag_histogram": lag,
        "node_lag_ms": {
            "count": lag[-1][1] if lag else 0,
            "p50": histogram_quantile(0.5, lag) * 1000,
            "p99": histogram_quantile(0.99, lag) * 1000,
        },
    }


def report(result: dict[str, Any]) -> None:
    d = result["delay_ms"]
    print(f"\nadmission at A -> visible in B's remote count ({result['samples']} samples, "
          f"{result['timeouts']} not seen within {GIVE_UP_S:.0f} s):")
    print(f"  p50 {d['p50']:.1f} ms   p90 {d['p90']:.1f} ms   p99 {d['p99']:.1f} ms   "
          f"max {d['max']:.1f} ms   min {d['min']:.1f} ms   mean {d['mean']:.1f} ms")
    print(f"  resolution: A's check round trip p50 {result['admit_rtt_ms_p50']:.2f} ms, "
          f"B's poll round trip p50 {result['poll_rtt_ms_p50']:.2f} ms "
          f"(p99 {result['poll_rtt_ms_p99']:.2f} ms)")
    lag = result["node_lag_histogram"]
    print(f"\nB's regionlimit_sync_lag_seconds over the run ({int(result['node_lag_ms']['count'])}"
          " observations; from A's flush time to applying the total):")
    previous = 0.0
    for bound, count in lag:
        label = "+Inf" if bound == float("inf") else f"{bound * 1000:g} ms"
        print(f"  le {label:>8}: {int(count):5d}  (+{int(count - previous)})")
        previous = count
    print(f"  histogram_quantile: p50 ~{result['node_lag_ms']['p50']:.0f} ms, "
          f"p99 ~{result['node_lag_ms']['p99']:.0f} ms (interpolated inside buckets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    common_args(parser)
    args = parser.parse_args()
    print(machine())
    print("system: nats-server + central + nodes us, eu, ap on 127.0.0.1; defaults: flush "
          "100 ms, tick 100 ms, commit 1 s; A = us, B = eu")
    started = time.monotonic()
    with BenchCluster(postgres=args.postgres, policy_toml=POLICY,
                      env=CONVERGENCE_ENV) as system:
        node_a, node_b = system.node_urls[0], system.node_urls[1]
        measure(node_a, node_b, 10, progress=False)  # warm up connections and paths
        result = measure(node_a, node_b, args.samples)
    report(result)
    d = result["delay_ms"]
    verdict = "meets" if d["p99"] <= TARGET_P99_MS else \
        f"MISSES by {d['p99'] - TARGET_P99_MS:.0f} ms"
    print(f"\nSUMMARY convergence: p50 {d['p50']:.0f} ms, p99 {d['p99']:.0f} ms over "
          f"{result['samples']} samples ({verdict} the p99 <= {TARGET_P99_MS:.0f} ms target); "
          f"node-reported sync lag p50 ~{result['node_lag_ms']['p50']:.0f} ms, "
          f"p99 ~{result['node_lag_ms']['p99']:.0f} ms; run took "
          f"{time.monotonic() - started:.0f} s; {load_after()}")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "convergence.json"
    result["node_lag_histogram"] = [[("+Inf" if b == float("inf") else b), c]
                                    for b, c in result["node_lag_histogram"]]
    out.write_text(json.dumps(result, indent=1))
    print(f"raw samples: {out}")


if __name__ == "__main__":
    main()
