"""Node memory under the interest rule: a node holds the keys it serves, not every key.

    .venv/bin/python -m bench.node_interest [--keys 30000] [--postgres URL]

A whole system on loopback (own nats-server, throwaway Postgres database, central, nodes
us, eu, ap as processes, product defaults). ``--keys`` distinct identifiers of a monthly
fixed-window namespace (limit 1,000,000: every key stays cold) are checked once each,
round-robin over the three nodes, in ``/v1/check/batch`` requests of 1,000. When central's
ledger holds every component (all flushes merged and committed, so every total that would
ever be sent has been), the figures per node are:

- keys served (a third of ``--keys``) and keys held (``regionlimit_active_keys``); before
  the interest rule every node held every key (central broadcast every changed total and
  a node stored any key with a remote count);
- totals received (addressed to the node, and on the shared subjects) and ignored;
- the node's RSS (from /proc).

The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx

from bench._cluster import BenchCluster, common_args, load_after, machine, metrics
from tests.support.cluster import metric_value

NAMESPACE = "monthly"
POLICY = f"""
[namespaces.{NAMESPACE}]
limit = 1000000
duration = "month"
algorithm = "fixed_window"
"""
BATCH = 1000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=30_000)
    common_args(parser)
    args = parser.parse_args()
    print(machine())
    with BenchCluster(postgres=args.postgres, policy_toml=POLICY) as system:
        assert system.cluster is not None
        nodes = system.node_urls
        node_pids = [p.proc.pid for p in system.cluster.processes[1:] if p.proc]
        started = time.monotonic()
        with httpx.Client(timeout=30.0) as client:
            for first in range(0, args.keys, BATCH * len(nodes)):
                for n, url in enumerate(nodes):
                    ids = [f"user-{i}" for i in range(first + n, min(args.keys,
                           first + BATCH * len(nodes)), len(nodes))]
                    if ids:
                        response = client.post(url + "/v1/check/batch", json={"checks": [
                            {"namespace": NAMESPACE, "identifier": i} for i in ids]})
                        response.raise_for_status()
        print(f"{args.keys:,} checks in {time.monotonic() - started:.1f} s")
        deadline = time.monotonic() + 300
        while system.cluster.components_total(NAMESPACE) < args.keys:
            if time.monotonic() > deadline:
                raise RuntimeError("central did not commit every component within 300 s")
            time.sleep(0.5)
        time.sleep(1.0)  # a last tick after the last merge
        print("\n| node | served | held (active keys) | totals addressed / shared / ignored "
              "| RSS MB |\n| --- | --- | --- | --- | --- |")
        for n, (url, pid) in enumerate(zip(nodes, node_pids, strict=True)):
            body = metrics(url)
            served = len(range(n, args.keys, len(nodes)))

            def value(name: str, body: str = body) -> int:
                return int(metric_value(body, name))

            print(f"| {system.regions[n]} | {served:,} | "
                  f"{value('regionlimit_active_keys'):,} | "
                  f"{value('regionlimit_totals_received_addressed_total'):,} / "
                  f"{value('regionlimit_totals_received_shared_total'):,} / "
                  f"{value('regionlimit_totals_ignored_total'):,} | {rss_mb(pid):.0f} |")
        print(f"\nbefore the interest rule every node held all {args.keys:,} keys")
    print(load_after())


if __name__ == "__main__":
    main()
