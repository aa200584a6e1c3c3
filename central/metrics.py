"""Central's Prometheus metrics, in a registry of its own per service."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _OverAdmission(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "regionlimit_over_admission", "Cost admitted globally beyond the limit",
            labels=["namespace"])
        for namespace, value in sorted(self._read().items()):
            family.add_metric([namespace], value)
        yield family


class CentralMetrics:
    def __init__(self, replica: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.leader = Gauge("regionlimit_central_leader",
                            "1 while this replica leads at least one partition",
                            ["replica"], registry=r).labels(replica)
        self.partitions_held = Gauge(
            "regionlimit_central_partitions_held",
            "Key partitions this replica leads (ingests, checkpoints, broadcasts)",
            ["replica"], registry=r).labels(replica)
        self.partitions = Gauge(
            "regionlimit_central_partitions",
            "Key partitions configured (REGIONLIMIT_PARTITIONS); every one needs a leader",
            registry=r)
        self.forwarded = Counter(
            "regionlimit_usage_forwarded",
            "Usage entries moved from a per-region or foreign subject to their partition's",
            registry=r)
        self.ingested = Counter("regionlimit_ingest_entries", "Usage entries merged",
                                registry=r)
        self.batches = Counter("regionlimit_ingest_batches", "Usage messages consumed",
                               registry=r)
        self.malformed = Counter("regionlimit_messages_malformed",
                                 "Undecodable messages dropped", registry=r)
        self.newer = Counter("regionlimit_messages_newer_version",
                             "Messages of a newer version left unacked", registry=r)
        self.rejected = Counter("regionlimit_messages_rejected", "Usage entries rejected",
                                ["reason"], registry=r)
        self.commit_seconds = Histogram("regionlimit_commit_duration_seconds",
                                        "Ledger commit latency", registry=r)
        self.commit_failures = Counter("regionlimit_commit_failures", "Failed ledger commits",
                                       registry=r)
        self.quarantined = Counter("regionlimit_ledger_quarantined",
                                   "Ledger rows the database refused, set aside in "
                                   "usage_quarantine", registry=r)
        self.unsaved = Gauge("regionlimit_unsaved_rows",
                             "Dirty components and pending buckets awaiting a checkpoint",
                             registry=r)
        self.checkpoint_rows = Histogram("regionlimit_checkpoint_rows",
                                         "Rows (components and buckets) per checkpoint batch",
                                         buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
                                         registry=r)
        self.ingest_paused = Gauge("regionlimit_ingest_paused",
                                   "1 while ingest waits for checkpoints to make room "
                                   "(backpressure)", registry=r)
        self.consistent_decisions = Counter("regionlimit_consistent_decisions",
                                            "Consistent checks decided", registry=r)
        self.consistent_batch = Histogram("regionlimit_consistent_batch_size",
                                          "Consistent decisions per transaction",
                                          buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
                                          registry=r)
        self.authority_errors = Counter("regionlimit_authority_errors",
                                        "Consistent batches that could not be decided",
                                        registry=r)
        self.gc_pause = Histogram(
            "regionlimit_gc_full_pause_seconds",
            "Pauses of full (generation 2) garbage collections in this process",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        self.ticks = Counter("regionlimit_totals_published", "Key totals published",
                             registry=r)
        self.totals_addressed = Counter(
            "regionlimit_totals_addressed",
            "Key totals sent to one serving node's own subject (hot keys)", registry=r)
        self.totals_broadcast = Counter(
            "regionlimit_totals_broadcast",
            "Key totals sent on a subject every node hears (blocks; previous-release nodes)",
            registry=r)

    def track_gc_pauses(self) -> None:
        """Time every collection of the second (oldest) generation: a pause holds the
        event loop that ingests, ticks and renews leases (the tail of convergence)."""
        started = [0.0]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if info.get("generation") != 2:
                return
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.gc_pause.observe(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)
        self._gc_callback: Callable[[str, dict[str, Any]], None] | None = on_gc

    def untrack_gc_pauses(self) -> None:
        callback, self._gc_callback = getattr(self, "_gc_callback", None), None
        if callback is not None and callback in gc.callbacks:
            gc.callbacks.remove(callback)

    def track_over_admission(self, read: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_OverAdmission(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
