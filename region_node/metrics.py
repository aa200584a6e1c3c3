"""Node metrics kept as plain integers on the hot path and rendered on scrape.

prometheus_client's own counters take a lock per increment; a check must not pay that,
so the check path bumps dict entries and a Collector turns them into families on demand.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector


class Histogram:
    """Cumulative-bucket histogram without locks (single event loop thread)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(labels.values()), buckets, self.total)
        return family


LATENCY_BOUNDS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                  0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PROTOCOLS = ("http", "grpc")  # how a check arrived: the JSON API or Envoy's RLS
LAG_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetrics(Collector):
    def __init__(self, region: str) -> None:
        self.region = region
        # protocol -> source -> namespace label -> [denied, allowed]: no tuple built per check
        self.checks: dict[str, dict[str, dict[str, list[int]]]] = {
            protocol: {"local": {}, "authority": {}, "fallback": {}}
            for protocol in PROTOCOLS}
        self.latency = Histogram(LATENCY_BOUNDS)
        self.sync_lag = Histogram(LAG_BOUNDS)
        self.fallbacks: dict[str, int] = {}
        self.counters: dict[str, int] = {
            "batches_published": 0, "batches_failed": 0, "messages_malformed": 0,
            "snapshots_loaded": 0, "spilled_entries": 0, "stream_check_failures": 0,
            # Totals from central by how they came (sync/listener.py).
            "totals_received_addressed": 0, "totals_received_shared": 0,
            "totals_ignored": 0,  # received on a shared subject for a key not needed here
        }
        self.gauges: dict[str, Callable[[], float]] = {}
        self.sync_state: Callable[[], str] = lambda: "standalone"
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count_check(self, label: str, allowed: bool, source: str, protocol: str = "http"
                    ) -> None:
        slots = self.checks[protocol][source]
        slot = slots.get(label)
        if slot is None:
            slot = slots[label] = [0, 0]
        slot[allowed] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily
                                  | HistogramMetricFamily]:
        region = {"region": self.region}
        checks = CounterMetricFamily("regionlimit_checks", "Checks answered",
                                     labels=["namespace", "outcome", "source", "region",
                                             "protocol"])
        for protocol, sources in self.checks.items():
            for source, slots in sources.items():
                for label, (denied, allowed) in sorted(slots.items()):
                    checks.add_metric([label, "allowed", source, self.region, protocol],
                                      allowed)
                    checks.add_metric([label, "denied", source, self.region, protocol],
                                      denied)
        yield checks
        yield self.latency.family("regionlimit_check_duration_seconds",
                                  "Time to decide one check, HTTP excluded", region)
        yield self.sync_lag.family("regionlimit_sync_lag_seconds",
                                   "From another node's flush until its usage counts here",
                                   region)
        fallbacks = CounterMetricFamily("regionlimit_consistent_fallbacks",
                                        "Consistent checks decided by on_unavailable",
                                        labels=["namespace", "region"])
        for label, value in sorted(self.fallbacks.items()):
            fallbacks.add_metric([label, self.region], value)
        yield fallbacks
        for name, value in self.counters.items():
            family = CounterMetricFamily(f"regionlimit_{name}", name.replace("_", " "),
                                         labels=["region"])
            family.add_metric([self.region], value)
            yield family
        for name, read in self.gauges.items():
            gauge = GaugeMetricFamily(f"regionlimit_{name}", name.replace("_", " "),
                                      labels=["region"])
            gauge.add_metric([self.region], read())
            yield gauge
        state = GaugeMetricFamily("regionlimit_sync_state", "1 for the current sync state",
                                  labels=["region", "state"])
        current = self.sync_state()
        for name in ("ok", "degraded", "standalone"):
            state.add_metric([self.region, name], 1.0 if name == current else 0.0)
        yield state
