"""A node's side of the sync: flush usage, apply central's totals and configuration, ask
for snapshots, spill on a stop without NATS. Checks never wait on any of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import nats.errors
from nats.js import JetStreamContext

from region_node.counters import CounterStore
from region_node.metrics import NodeMetrics
from region_node.policies import NamespaceConfig, PolicyResolver
from region_node.spill import read_spill, write_spill
from sync.clock import Clock
from sync.connection import NatsLink, NatsOptions
from sync.errors import RegionLimitError
from sync.gc_freeze import freeze_survivors_forever
from sync.listener import StateListener
from sync.messages import ConfigUpdate, TotalsUpdate, UsageBatch, encode_usage
from sync.publisher import (
    PUBLISH_ERRORS,
    PublishFailed,
    StreamLimits,
    UsagePublisher,
    ensure_usage_stream,
)

log = logging.getLogger("regionlimit.sync")
SNAPSHOT_RETRY_S = 2.0
STREAM_CHECK_MAX_DELAY_S = 60.0
FINAL_FLUSH_TIMEOUT_S = 5.0


class NodeSync:
    def __init__(self, *, options: NatsOptions, node_id: str, region: str,
                 store: CounterStore, resolver: PolicyResolver, metrics: NodeMetrics,
                 clock: Clock, flush_interval: float, snapshot_timeout: float,
                 spill_path: Path, stream_limits: StreamLimits | None = None) -> None:
        self.node_id = node_id
        self.region = region
        self._store = store
        self._resolver = resolver
        self._metrics = metrics
        self._clock = clock
        self._flush_interval = flush_interval
        self._snapshot_timeout = snapshot_timeout
        self._spill_path = spill_path
        self._stream_limits = stream_limits or StreamLimits()
        self.link = NatsLink(options, on_connect=self._on_connect,
                              on_disconnect=self._on_disconnect)
        self._js: JetStreamContext | None = None
        self._publisher: UsagePublisher | None = None
        self._partitions: int | None = None  # central's, once announced
        self._listener: StateListener | None = None
        self._spilled: list[bytes] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot_task: asyncio.Task[None] | None = None
        self._stream_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self.snapshot_ok = False
        self.reason = "waiting for NATS"
        metrics.sync_state = self.state

    def state(self) -> str:
        return "ok" if self.snapshot_ok and self.link.is_connected else "degraded"

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        spilled = read_spill(self._spill_path)
        self._spilled = [raw for raw, _ in spilled]
        self._store.seed_remote([batch for _, batch in spilled], self._clock())
        if self._spilled:
            log.info("loaded %d spilled batches from %s", len(self._spilled), self._spill_path)
        self._tasks.append(asyncio.create_task(self.link.run(), name="nats-connect"))
        self._tasks.append(asyncio.create_task(self._flush_forever(), name="flush"))
        self._tasks.append(asyncio.create_task(freeze_survivors_forever(), name="gc-freeze"))
        self._tasks.append(asyncio.create_task(self._ready_after_timeout(), name="ready"))

    async def _ready_after_timeout(self) -> None:
        """/readyz turns 200 after the first snapshot, or after the snapshot timeout."""
        try:
            await asyncio.wait_for(self.ready.wait(), self._snapshot_timeout)
        except TimeoutError:
            self.reason = f"no snapshot from central within {self._snapshot_timeout}s; " \
                          "answering from local counters"
            log.warning("sync degraded: %s", self.reason)
            self.ready.set()

    async def stop(self) -> None:
        for task in [*self._tasks, self._snapshot_task, self._stream_task]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.link.is_connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), FINAL_FLUSH_TIMEOUT_S)
        self._spill_rest()
        await self.link.close()

    def _spill_rest(self) -> None:
        batches = list(self._spilled)
        spilled = 0
        for flushed_at, entries in self._store.take_usage(self._clock()):
            batches.append(encode_usage(UsageBatch(self.node_id, self.region, flushed_at,
                                                   entries)))
            spilled += len(entries)
        write_spill(self._spill_path, batches)
        if batches:
            self._metrics.counters["spilled_entries"] += spilled
            log.warning("NATS unavailable at stop: %d unpublished batches written to %s",
                        len(batches), self._spill_path)

    # --- connection events ---------------------------------------------------------------

    async def _on_connect(self) -> None:
        nc = self.link.nc
        assert nc is not None
        self._js = js = self.link.jetstream()
        self._publisher = UsagePublisher(js, node_id=self.node_id, region=self.region,
                                         partitions=self._partitions)
        if self._listener is None:
            self._listener = StateListener(nc, node_id=self.node_id,
                                           on_totals=self._apply_totals,
                                           on_config=self._apply_config,
                                           on_malformed=self._malformed)
            await self._listener.subscribe()
        if self._snapshot_task is None or self._snapshot_task.done():
            self._snapshot_task = asyncio.create_task(self._prepare(), name="snapshot")
        if self._stream_task is None or self._stream_task.done():
            self._stream_task = asyncio.create_task(self._check_stream(), name="stream")

    async def _on_disconnect(self) -> None:
        self.snapshot_ok = False
        self.reason = "NATS disconnected; answering from local counters"

    async def _prepare(self) -> None:
        """After every (re)connect: a snapshot, retried until central answers (a missed
        broadcast must not leave this node stale). Snapshots are core NATS requests: they
        never wait on the JetStream API (see _check_stream)."""
        while True:
            try:
                await self._load_snapshot()
                return
            except (*PUBLISH_ERRORS, nats.errors.NoRespondersError) as exc:
                self.reason = f"no snapshot from central ({type(exc).__name__})"
                log.warning("sync degraded: %s; retrying", self.reason)
            await asyncio.sleep(SNAPSHOT_RETRY_S)

    async def _check_stream(self) -> None:
        """Create or verify the usage stream, apart from the snapshot: a JetStream API that
        does not answer (a leaf without REGIONLIMIT_JS_DOMAIN, a hub still electing) only
        delays the check, never the node's configuration and totals. Central's leader
        creates the stream too, so a check that keeps failing is logged, not fatal."""
        delay = SNAPSHOT_RETRY_S
        while True:
            try:
                await ensure_usage_stream(self.link.jetstream(), limits=self._stream_limits)
                return
            except (*PUBLISH_ERRORS, RegionLimitError) as exc:
                self._metrics.counters["stream_check_failures"] += 1
                log.warning("usage stream check failed (%s: %s); check REGIONLIMIT_JS_DOMAIN; "
                            "retrying in %.0fs", type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(STREAM_CHECK_MAX_DELAY_S, delay * 2)  # a lasting misconfiguration

    async def _load_snapshot(self) -> None:
        assert self._listener is not None
        totals, config = await self._listener.fetch_snapshot(
            self.node_id, timeout=self._snapshot_timeout)
        if config is not None:
            self._apply_config(config)
        # The snapshot holds what central picked for this node: addressed.
        self._store.apply_totals(totals, self.node_id, self._clock(), addressed=True)
        self._metrics.counters["snapshots_loaded"] += 1
        self.snapshot_ok = True
        self.reason = "in sync with central"
        log.info("snapshot loaded: %d key totals", len(totals))
        self.ready.set()

    # --- inbound state -----------------------------------------------------------------

    def _apply_totals(self, update: TotalsUpdate, addressed: bool) -> None:
        now = self._clock()
        self._metrics.counters[
            "totals_received_addressed" if addressed else "totals_received_shared"
        ] += len(update.totals)
        ignored_before = self._store.totals_ignored
        # Lag is measured only where other nodes' usage reached this node's count: a total
        # re-sent for a denial, or for this node's own usage, says nothing about the lag.
        for total in self._store.apply_totals(update.totals, self.node_id, now,
                                              addressed=addressed):
            if total.as_of:
                self._metrics.sync_lag.observe(max(0, now - total.as_of) / 1000)
        self._metrics.counters["totals_ignored"] += self._store.totals_ignored - ignored_before

    def _apply_config(self, config: ConfigUpdate) -> None:
        # Central's partition count is not versioned with the policies: a central
        # restarted with another count announces it under the same version.
        self._partitions = config.partitions
        if self._publisher is not None:
            self._publisher.partitions = config.partitions
        if config.version < self._resolver.central_version:
            return  # an older broadcast overtaken by a snapshot
        self._resolver.set_central(
            {name: NamespaceConfig(ns.policy, ns.overrides)
             for name, ns in config.namespaces.items()}, config.version)
        log.info("configuration version %d applied (%d namespaces)", config.version,
                 len(config.namespaces))

    def _malformed(self, reason: str) -> None:
        self._metrics.counters["messages_malformed"] += 1
        log.warning("dropped a malformed message from central: %s", reason)

    # --- outbound usage ----------------------------------------------------------------

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:  # the loop must outlive any single flush
                log.exception("flush failed")

    async def flush(self) -> None:
        """Publish every unpublished key-window; on failure they stay for the next try."""
        async with self._flush_lock:
            if not self.link.is_connected or self._publisher is None:
                return
            publisher = self._publisher
            while self._spilled:
                try:
                    await publisher.publish_encoded(self._spilled[0])
                except PUBLISH_ERRORS:
                    self._metrics.counters["batches_failed"] += 1
                    return
                self._spilled.pop(0)
                if not self._spilled:
                    write_spill(self._spill_path, [])
            groups = self._store.take_usage(self._clock())
            index = 0
            try:
                for index, (flushed_at, entries) in enumerate(groups):
                    try:
                        published = await publisher.publish(flushed_at, entries)
                    except PublishFailed as exc:
                        self._metrics.counters["batches_failed"] += 1
                        self._store.return_usage(
                            [(flushed_at, exc.remaining), *groups[index + 1:]])
                        log.warning("usage publication failed (%s); %d key-windows kept",
                                    exc.reason, self._store.unpublished)
                        return
                    self._metrics.counters["batches_published"] += published
            except BaseException:
                # Cancelled mid-publication (a stop while NATS stalls) or failed some other
                # way: what this flush holds goes back to the outbox, so the stop spills
                # it. The group in flight may have been published in part; counts are
                # cumulative and central merges by maximum, so publishing it again is
                # harmless.
                self._store.return_usage(groups[index:])
                raise
