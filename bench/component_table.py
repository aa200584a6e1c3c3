"""The compact component table: bytes per component and merges/s, by key count; and the
whole of central's in-memory state (``GlobalTotals``: the table plus its per-key-window
side table), fed decoded usage batches as the leader is.

    .venv/bin/python -m bench.component_table [--keys 100000,1000000]

Cold keys (32-hex key hashes, one component each, three node ids), a monthly window;
every component is merged once, then checkpointed in batches of 5,000 until clean.
Memory: tracemalloc's traced bytes per component (Python allocations only: the table's
dicts, bytes keys and arrays) and the process RSS increase. Target: <= 250 B.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import resource
import time
import tracemalloc

from bench._cluster import load_after, machine
from central.partitions.components import ComponentTable
from central.totals import GlobalTotals
from sync.messages import UsageBatch, UsageEntry
from sync.policy import build_policy


def rates(hashes: list[str]) -> tuple[float, float]:
    """Merges/s and checkpointed rows/s (take + confirm, batches of 5,000) without
    tracemalloc (it slows allocation-heavy code several times)."""
    table = ComponentTable()
    started = time.perf_counter()
    for i, key in enumerate(hashes):
        table.merge(namespace="api", key_hash=key, window_start=1_764_547_200_000,
                    node_id="node-us", region="us", admitted=1, denied=0, policy="monthly",
                    hour=1_764_547_200_000, seq=i + 1)
    merge_s = time.perf_counter() - started
    started = time.perf_counter()
    while table.dirty or table.pending_buckets:
        table.confirm(table.take_checkpoint(max_rows=5000, max_buckets=5000))
    return len(hashes) / merge_s, len(hashes) / (time.perf_counter() - started)


def run(count: int) -> None:
    hashes = [hashlib.blake2b(f"k{i}".encode(), digest_size=16).hexdigest()
              for i in range(count)]
    nodes = ("node-us", "node-eu", "node-ap")
    regions = ("us", "eu", "ap")
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    table = ComponentTable()
    started = time.perf_counter()
    for i, key in enumerate(hashes):
        table.merge(namespace="api", key_hash=key, window_start=1_764_547_200_000,
                    node_id=nodes[i % 3], region=regions[i % 3], admitted=1 + i % 50,
                    denied=0, policy="monthly", hour=1_764_547_200_000, seq=i + 1)
    merged = time.perf_counter() - started
    started = time.perf_counter()
    batches = 0
    while table.dirty or table.pending_buckets:
        table.confirm(table.take_checkpoint(max_rows=5000, max_buckets=5000))
        batches += 1
    drained = time.perf_counter() - started
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(f"{count:>9,} components: {traced / count:6.0f} B traced, "
          f"{rss_kb * 1024 / count:6.0f} B peak-RSS increase (includes checkpoint batches "
          f"and tracemalloc's own cost) per component; merge {count / merged:,.0f}/s "
          f"(under tracemalloc), {batches} checkpoint batches in {drained:.2f} s")
    del table
    gc.collect()
    merges, checkpointed = rates(hashes)
    print(f"{'':>9}  without tracemalloc: merge {merges:,.0f} new components/s, "
          f"checkpoint {checkpointed:,.0f} rows/s (component + its bucket)")


def run_totals(count: int) -> None:
    """Central's whole in-memory state per cold component (one component per key)."""
    policy = build_policy(limit=1000, duration="month", algorithm="fixed_window")
    start = 1_764_547_200_000
    now = start + 3_600_000
    batches = [UsageBatch("node-us", "us", now, [
        UsageEntry("api", hashlib.blake2b(f"k{i}".encode(), digest_size=16).hexdigest(),
                   start, 1, 0, policy) for i in range(first, min(count, first + 1000))])
        for first in range(0, count, 1000)]
    gc.collect()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    totals = GlobalTotals(retention_ms=7 * 86_400_000)
    for usage in batches:
        totals.merge(usage, now)
    totals.take_unsaved(now)  # checkpointed: no dirty state left
    totals.take_changed()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    print(f"{count:>9,} components in GlobalTotals: {traced / count:6.0f} B traced per "
          f"component (table + key-window side table)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", default="100000,1000000")
    args = parser.parse_args()
    print(machine())
    for count in (int(k) for k in args.keys.split(",")):
        run(count)
        run_totals(count)
    print(load_after())


if __name__ == "__main__":
    main()
