"""A central replica: NATS, the ledger, the consistent and lease authorities, and its
share of the key partitions (each partition's leader ingests, checkpoints and broadcasts
that partition's usage; replicas split the partitions among themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import socket
from dataclasses import replace
from typing import Any

from sqlalchemy import text
from sqlalchemy.pool import NullPool

from central.billing.rollups import RollupJob
from central.config.store import ConfigStore
from central.consistent.authority import Authority
from central.database import make_engine, normalize_url
from central.ingest import LeaderIngest
from central.leadership import LeaderLease, claimable_partitions, partition_lock_key
from central.lease.authority import LeaseAuthority
from central.lease.tx import LeaseTransactions
from central.ledger import LedgerStore
from central.metrics import CentralMetrics
from central.migrate import schema_status
from central.partitions.forwarding import LegacyUsageSplitter, UsageForwarder
from central.partitions.roster import ReplicaRoster, fair_share
from central.partitions.snapshot_proxy import SnapshotProxy
from central.partitions.state import PartitionState
from central.settings import CentralSettings
from central.totals_routing import LegacyNodes, TotalsRouter
from sync.clock import Clock, wall_clock_ms
from sync.connection import NatsLink, NatsOptions
from sync.durations import setting_ms
from sync.gc_freeze import freeze_survivors_forever
from sync.identifiers import IdentifierHasher
from sync.messages import ConfigUpdate, encode_config
from sync.partitions import group_by_partition
from sync.publisher import ensure_usage_stream
from sync.subjects import CONFIG, SNAPSHOT

log = logging.getLogger("regionlimit.central")
LEASE_POLL_S = 1.0
YIELD_POLLS = 5  # a partition handed to a replica below its share is not taken back sooner
STOP_STEP_S = 5.0
LOAD_CHUNK = 1000  # ledger rows per step of a new leader's load (~30 ms; it yields in between)


class CentralService:
    def __init__(self, settings: CentralSettings, *, database_url: str,
                 clock: Clock = wall_clock_ms) -> None:
        if normalize_url(database_url).get_backend_name() != "postgresql" \
                and settings.partitions != 1:
            # SQLite has one writer and one replica: partitions would only contend for
            # its file lock. Nodes learn the count from central's configuration.
            log.info("SQLite ledger: one partition instead of %d", settings.partitions)
            settings = settings.model_copy(update={"partitions": 1})
        assert settings.nats_url is not None
        assert settings.admin_token is not None and settings.identifier_secret is not None
        self.settings = settings
        self.clock = clock
        self.admin_token = settings.admin_token.get_secret_value()
        self.hasher = IdentifierHasher(settings.identifier_secret.get_secret_value())
        self.replica_id = f"central.{socket.gethostname().split('.')[0]}.{secrets.token_hex(4)}"
        self.engine = make_engine(database_url)
        # Partition leases hold one session each: unpooled, so they never starve writes.
        self.lease_engine = (make_engine(database_url, poolclass=NullPool)
                             if self.engine.dialect.name == "postgresql" else self.engine)
        self.config = ConfigStore(self.engine, clock=clock)
        self.roster = ReplicaRoster(self.replica_id, partitions=settings.partitions)
        # Previous-release nodes, for every partition this replica leads.
        self.legacy_nodes = LegacyNodes(elsewhere=self.roster.peers_see_legacy_nodes)
        self.leaders: dict[int, asyncio.Task[None]] = {}  # partition -> its term
        self.states: dict[int, PartitionState] = {}  # partition -> its memory, while led
        self.serving: set[int] = set()  # led partitions whose ledger share is loaded
        self.metrics = CentralMetrics(self.replica_id)
        self.metrics.partitions.set(settings.partitions)
        self.metrics.track_gc_pauses()
        self.over_admission: dict[str, int] = {}
        self.metrics.track_over_admission(lambda: dict(self.over_admission))
        self.authority = Authority(self.engine, clock=clock, metrics=self.metrics)
        reclaim = settings.lease_reclaim_after
        self.lease_authority = LeaseAuthority(LeaseTransactions(
            self.engine, clock=clock, ttl_ms=setting_ms(settings.lease_ttl),
            reclaim_after_ms=0 if reclaim == "0" else setting_ms(reclaim)),
            metrics=self.metrics, lanes=4 if self.engine.dialect.name == "postgresql" else 1)
        self.link = NatsLink(NatsOptions(url=settings.nats_url, creds=settings.nats_creds,
                                         tls_ca=settings.nats_tls_ca, name=self.replica_id,
                                         js_domain=settings.js_domain))
        self._tasks: list[asyncio.Task[None]] = []

    async def _config(self) -> ConfigUpdate:
        """The stored configuration, with this central's partition count announced."""
        return replace(await self.config.load(), partitions=self.settings.partitions)

    async def current_config(self) -> ConfigUpdate | None:
        try:
            return await self._config()
        except Exception as exc:
            log.warning("configuration unavailable for a snapshot (%s)", type(exc).__name__)
            return None

    async def publish_config(self) -> None:
        """Broadcast the whole configuration; nodes that miss it heal at their next
        snapshot, so a failure here is logged, not raised."""
        nc = self.link.nc
        if nc is None or not nc.is_connected:
            log.warning("configuration stored but not broadcast: NATS unavailable")
            return
        try:
            await nc.publish(CONFIG, encode_config(await self._config()))
            await nc.flush(timeout=2)
        except Exception as exc:
            log.warning("configuration broadcast failed (%s)", type(exc).__name__)

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self.link.run(), name="nats-connect"))
        self._tasks.append(asyncio.create_task(self._run_roster(), name="roster"))
        self._tasks.append(asyncio.create_task(freeze_survivors_forever(), name="gc-freeze"))
        self._tasks.append(asyncio.create_task(self._hold_partitions(), name="partitions"))
        self._tasks.append(asyncio.create_task(self._serve_authority(), name="authority"))
        self._tasks.append(asyncio.create_task(self._serve_leases(), name="lease-authority"))

    async def _run_roster(self) -> None:
        await self.link.connected.wait()
        assert self.link.nc is not None
        await self.roster.run(self.link.nc)

    async def _serve_authority(self) -> None:
        """Every replica answers consistent checks (a queue group spreads them)."""
        await self.link.connected.wait()
        assert self.link.nc is not None
        await self.authority.serve(self.link.nc)

    async def _serve_leases(self) -> None:
        """Every replica also hands out lease-mode slices (a queue group of its own)."""
        await self.link.connected.wait()
        assert self.link.nc is not None
        await self.lease_authority.serve(self.link.nc)

    async def stop(self) -> None:
        """Stop within a bounded time: a shutdown that hangs on a stuck connection would
        keep an orchestrator (or Ctrl-C) waiting, and leaving early loses nothing, since
        uncommitted usage is redelivered to the next leader."""
        self.metrics.untrack_gc_pauses()
        # Partition terms first (each naks what it holds and releases its lease).
        for tasks in (list(self.leaders.values()), self._tasks):
            for task in tasks:
                task.cancel()
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=STOP_STEP_S)
                for task in stuck:
                    log.warning("task %s did not stop within %.0fs", task.get_name(),
                                STOP_STEP_S)
        for name, step in (("nats", self.link.close), ("database", self.engine.dispose),
                           ("lease sessions", self.lease_engine.dispose)):
            try:
                await asyncio.wait_for(step(), STOP_STEP_S)
            except Exception as exc:
                log.warning("stopping %s: %s", name, type(exc).__name__)

    # --- partitions --------------------------------------------------------------------

    async def _hold_partitions(self) -> None:
        """Every LEASE_POLL_S: hold this replica's fair share of the partitions, taking
        free (or stale) ones when below it and handing the highest back when above."""
        await self.link.connected.wait()
        partitions = self.settings.partitions
        first = int.from_bytes(self.replica_id.encode()[-4:], "big") % partitions
        order = [(first + i) % partitions for i in range(partitions)]
        yielded = 0  # polls left during which a partition handed to a peer is not taken back
        while True:
            self.roster.sees_legacy_nodes = self.legacy_nodes.seen_here(self.clock())
            alive = self.roster.alive()
            share, floor = fair_share(partitions, alive), partitions // alive
            held = len(self.leaders)
            yielded = max(0, yielded - 1)
            if self.roster.conflict:
                for term in self.leaders.values():
                    term.cancel()
            elif held > share:
                # All the excess at once, so a new replica claims it in one round (one
                # pass over the ledger) rather than one partition per poll.
                for partition in sorted(self.leaders)[share:]:
                    self.leaders[partition].cancel()
            elif held > floor and self.roster.someone_below(floor):
                self.leaders[max(self.leaders)].cancel()  # one, for the replica below
                yielded = YIELD_POLLS
            elif held < share and not yielded:
                try:
                    await self._claim(order, share - held)
                except Exception as exc:
                    log.warning("partition leases unavailable (%s)", type(exc).__name__)
            await asyncio.sleep(LEASE_POLL_S)

    async def _claim(self, order: list[int], wanted: int) -> None:
        claimable = await claimable_partitions(
            self.lease_engine, self.settings.partitions,
            stale_after=self.settings.seconds("lease_timeout"))
        claimed: dict[int, LeaderLease] = {}
        if not self.roster.partition0_led:
            # Partition 0 first, and nothing else unless it is taken: its lock may be held
            # by a central of an earlier release, which consumes every usage subject
            # (central/partitions/roster.py).
            lease = self._lease(0)
            if 0 not in claimable or not await lease.acquire():
                return
            claimed[0] = lease
        for partition in order:
            if len(claimed) >= wanted:
                break
            if partition in self.leaders or partition in claimed or partition not in claimable:
                continue
            lease = self._lease(partition)
            if await lease.acquire():
                claimed[partition] = lease
        if not claimed:
            return
        # One pass over the ledger loads every partition claimed together (a replica
        # taking over a dead one's partitions reads the components once, not per partition).
        gc.unfreeze()  # previous terms' state may be collected now
        states = {p: PartitionState.empty(self.settings.retention_ms, self.over_admission)
                  for p in claimed}
        load = asyncio.create_task(self._load(states), name="partition-load")
        for partition, lease in claimed.items():
            self.states[partition] = states[partition]
            self.leaders[partition] = asyncio.create_task(
                self._lead_partition(partition, lease, states[partition], load),
                name=f"partition-{partition}")
        self._update_held()

    def _lease(self, partition: int) -> LeaderLease:
        timeout = self.settings.seconds("lease_timeout")
        return LeaderLease(self.engine, lock_engine=self.lease_engine,
                           key=partition_lock_key(partition), partition=partition,
                           stale_after=timeout, check_timeout=min(5.0, timeout / 2))

    async def _load(self, states: dict[int, PartitionState]) -> None:
        partitions = self.settings.partitions
        # In chunks, yielding between them: this loop also answers consistent checks,
        # and one pass over every key-window stalled them past their timeout (issue 10).
        async for rows in LedgerStore(self.engine).stream_components(
                window_end_after=self.clock() - self.settings.retention_ms,
                chunk=LOAD_CHUNK):
            for partition, part in group_by_partition(
                    rows, lambda row: (row.namespace, row.key_hash),
                    partitions=partitions).items():
                state = states.get(partition)
                if state is not None:
                    state.totals.load_more(part)
            await asyncio.sleep(0)
        # What was loaded lives as long as the terms: out of the collector's generations,
        # so full collections do not walk it again and again (short GC pauses).
        gc.freeze()

    async def _lead_partition(self, partition: int, lease: LeaderLease,
                              state: PartitionState, load: asyncio.Task[None]) -> None:
        try:
            await self._lead(partition, lease, state, load)
        except Exception:
            log.exception("partition %d: leadership term ended by an error", partition)
        finally:
            self.leaders.pop(partition, None)
            self.states.pop(partition, None)
            self.serving.discard(partition)
            self._update_held()
            with contextlib.suppress(Exception):
                await lease.release()

    def _update_held(self) -> None:
        self.roster.leads_partition0 = 0 in self.leaders
        self.roster.held = len(self.leaders)
        self.metrics.partitions_held.set(len(self.leaders))
        self.metrics.leader.set(1 if self.leaders else 0)

    @property
    def is_leader(self) -> bool:
        return bool(self.leaders)

    async def _lead(self, partition: int, lease: LeaderLease, state: PartitionState,
                    load: asyncio.Task[None]) -> None:
        """One partition's term, renewing its lease every LEASE_POLL_S from its very
        start (the ledger load included: a standby deposes a lease session that stays
        silent for the lease timeout) until the term ends or the lease is lost."""
        term = asyncio.create_task(self._term(partition, lease, state, load),
                                   name=f"partition-{partition}-term")
        try:
            while not term.done():
                await asyncio.wait([term], timeout=LEASE_POLL_S)
                if not term.done() and not await lease.check():
                    log.error("partition %d: lease lost; stepping down", partition)
                    break
        finally:
            term.cancel()
            while not term.done():
                await asyncio.wait([term], timeout=STOP_STEP_S)
                if not term.done():
                    log.warning("partition %d: term still unwinding after it ended: %s",
                                partition, term.get_stack(limit=3))
            with contextlib.suppress(asyncio.CancelledError):
                await term
        if not term.cancelled():
            term.result()  # an error that ended the term

    async def _term(self, partition: int, lease: LeaderLease, state: PartitionState,
                    load: asyncio.Task[None]) -> None:
        """Wait for the partition's share of the ledger, then ingest. JetStream
        redelivers whatever the previous leader had not checkpointed."""
        await asyncio.shield(load)
        assert self.link.nc is not None
        js = self.link.jetstream()
        settings = self.settings
        forwarder = UsageForwarder(js, partitions=settings.partitions, metrics=self.metrics)
        ingest = LeaderIngest(
            nc=self.link.nc, js=js, stream_limits=settings.stream_limits,
            ledger=LedgerStore(self.engine, lease=lease), totals=state.totals,
            metrics=self.metrics, clock=self.clock,
            commit_interval=settings.seconds("commit_interval"),
            tick_interval=settings.seconds("tick_interval"), config=self.current_config,
            rollup=RollupJob.from_settings(self.engine, settings) if partition == 0 else None,
            snapshot_index=state.index,
            router=TotalsRouter(share=settings.broadcast_share,
                                partitions=settings.partitions, legacy=self.legacy_nodes),
            max_dirty=max(1, settings.max_dirty // settings.partitions),
            checkpoint_batch=settings.checkpoint_batch,
            ack_wait=settings.seconds("ack_wait"), crash_at=settings.test_crash_at,
            partition=partition, forwarder=forwarder, prune_ledger=partition == 0)
        log.info("replica %s leads partition %d: %d key-windows loaded", self.replica_id,
                 partition, len(state.totals.windows))
        self.serving.add(partition)
        if partition != 0:
            await ingest.run()
            return
        # Partition 0's leader also splits per-region usage and answers the snapshot
        # subject every node asks, by walking the partitions. The splitter's consumer
        # needs the stream, which the ingest would create concurrently.
        await ensure_usage_stream(js, limits=settings.stream_limits, update=True)
        proxy = SnapshotProxy(self.link.nc, partitions=settings.partitions,
                              metrics=self.metrics)
        snapshots = await self.link.nc.subscribe(SNAPSHOT, cb=proxy.answer)
        splitter = LegacyUsageSplitter(js, forwarder=forwarder, metrics=self.metrics,
                                       ack_wait=settings.seconds("ack_wait"),
                                       legacy=self.legacy_nodes)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(ingest.run())
                group.create_task(splitter.run())
        finally:
            with contextlib.suppress(Exception):
                await snapshots.unsubscribe()

    async def readiness(self) -> dict[str, Any]:
        database, schema, schema_ready = "ok", "ok", False
        try:
            async with asyncio.timeout(2.0), self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
                status = await schema_status(connection)
                schema, schema_ready = status.detail, status.ready
        except Exception as exc:
            database = schema = f"unavailable ({type(exc).__name__})"
        nats = "ok" if self.link.is_connected else "disconnected"
        return {"ready": database == "ok" and schema_ready and nats == "ok",
                "database": database, "schema": schema, "nats": nats,
                "leader": self.is_leader, "partitions": sorted(self.serving),
                "loading": sorted(set(self.leaders) - self.serving),
                "replica": self.replica_id}
