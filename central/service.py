"""A central replica: NATS, the ledger, and the leadership loop (one replica ingests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import socket
from typing import Any

from sqlalchemy import text

from central.billing.rollups import RollupJob
from central.config.store import ConfigStore
from central.consistent.authority import Authority
from central.database import make_engine
from central.ingest import LeaderIngest
from central.leadership import LeaderLease
from central.lease.authority import LeaseAuthority
from central.lease.tx import LeaseTransactions
from central.ledger import LedgerStore
from central.metrics import CentralMetrics
from central.migrate import schema_status
from central.partitions.snapshot_index import SnapshotIndex
from central.settings import CentralSettings
from central.totals import GlobalTotals, WindowKey
from central.totals_routing import TotalsRouter
from sync.clock import Clock, wall_clock_ms
from sync.connection import NatsLink, NatsOptions
from sync.durations import setting_ms
from sync.identifiers import IdentifierHasher
from sync.messages import ConfigUpdate, encode_config
from sync.subjects import CONFIG

log = logging.getLogger("regionlimit.central")
LEASE_POLL_S = 1.0
STOP_STEP_S = 5.0
LOAD_CHUNK = 5000  # ledger rows per step of a new leader's load (it yields in between)


class CentralService:
    def __init__(self, settings: CentralSettings, *, database_url: str,
                 clock: Clock = wall_clock_ms) -> None:
        assert settings.nats_url is not None
        assert settings.admin_token is not None and settings.identifier_secret is not None
        self.settings = settings
        self.clock = clock
        self.admin_token = settings.admin_token.get_secret_value()
        self.hasher = IdentifierHasher(settings.identifier_secret.get_secret_value())
        self.replica_id = f"central.{socket.gethostname().split('.')[0]}.{secrets.token_hex(4)}"
        self.engine = make_engine(database_url)
        lease_timeout = settings.seconds("lease_timeout")
        self.lease = LeaderLease(self.engine, stale_after=lease_timeout,
                                 check_timeout=min(5.0, lease_timeout / 2))
        self.ledger = LedgerStore(self.engine, lease=self.lease)
        self.config = ConfigStore(self.engine, clock=clock)
        self.totals: GlobalTotals | None = None
        self.metrics = CentralMetrics(self.replica_id)
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
        self.is_leader = False
        self._tasks: list[asyncio.Task[None]] = []

    async def current_config(self) -> ConfigUpdate | None:
        try:
            return await self.config.load()
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
            await nc.publish(CONFIG, encode_config(await self.config.load()))
            await nc.flush(timeout=2)
        except Exception as exc:
            log.warning("configuration broadcast failed (%s)", type(exc).__name__)

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self.link.run(), name="nats-connect"))
        self._tasks.append(asyncio.create_task(self._lead_forever(), name="leadership"))
        self._tasks.append(asyncio.create_task(self._serve_authority(), name="authority"))
        self._tasks.append(asyncio.create_task(self._serve_leases(), name="lease-authority"))

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
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_STEP_S)
            for task in stuck:
                log.warning("task %s did not stop within %.0fs", task.get_name(), STOP_STEP_S)
        for name, step in (("lease", self.lease.release), ("nats", self.link.close),
                           ("database", self.engine.dispose)):
            try:
                await asyncio.wait_for(step(), STOP_STEP_S)
            except Exception as exc:
                log.warning("stopping %s: %s", name, type(exc).__name__)

    async def _lead_forever(self) -> None:
        await self.link.connected.wait()
        while True:
            try:
                acquired = await self.lease.acquire()
            except Exception as exc:
                log.warning("leader lease unavailable (%s)", type(exc).__name__)
                acquired = False
            if not acquired:
                await asyncio.sleep(LEASE_POLL_S)
                continue
            try:
                await self._lead()
            except Exception:
                log.exception("leadership term ended by an error")
            finally:
                self.is_leader = False
                self.metrics.leader.set(0)
                with contextlib.suppress(Exception):
                    await self.lease.release()
            await asyncio.sleep(LEASE_POLL_S)

    async def _lead(self) -> None:
        """One leadership term, renewing the lease every LEASE_POLL_S from its very start
        (the ledger load included: a standby deposes a lease session that stays silent
        for the lease timeout) until the term ends or the lease is lost."""
        term = asyncio.create_task(self._term(), name="leadership-term")
        try:
            while not term.done():
                await asyncio.wait([term], timeout=LEASE_POLL_S)
                if not term.done() and not await self.lease.check():
                    log.error("leader lease lost; stepping down")
                    break
        finally:
            # No longer the leader from this moment (writes are fenced anyway), however
            # long the term's tasks take to unwind.
            self.is_leader = False
            self.metrics.leader.set(0)
            term.cancel()
            while not term.done():
                await asyncio.wait([term], timeout=STOP_STEP_S)
                if not term.done():
                    log.warning("leadership term still unwinding after lease loss: %s",
                                term.get_stack(limit=3))
            with contextlib.suppress(asyncio.CancelledError):
                await term
        if not term.cancelled():
            term.result()  # an error that ended the term

    async def _term(self) -> None:
        """Rebuild state from the ledger, then ingest. JetStream redelivers whatever the
        previous leader had not committed."""
        now = self.clock()
        gc.unfreeze()  # the previous term's state may be collected now
        index: SnapshotIndex[WindowKey] = SnapshotIndex()  # fed as the ledger loads
        totals = GlobalTotals(retention_ms=self.settings.retention_ms,
                              over_admission=self.over_admission, observer=index)
        # In chunks, yielding between them: this loop also answers consistent checks,
        # and one pass over every key-window stalled them past their timeout (issue 10).
        async for rows in self.ledger.stream_components(
                window_end_after=now - totals.retention_ms, chunk=LOAD_CHUNK):
            totals.load_more(rows)
            await asyncio.sleep(0)
        # What was loaded lives as long as the term: out of the collector's generations,
        # so full collections do not walk it again and again (short GC pauses).
        gc.freeze()
        self.totals = totals
        assert self.link.nc is not None
        ingest = LeaderIngest(
            nc=self.link.nc, js=self.link.jetstream(),
            stream_limits=self.settings.stream_limits, ledger=self.ledger, totals=totals,
            metrics=self.metrics,
            clock=self.clock, commit_interval=self.settings.seconds("commit_interval"),
            tick_interval=self.settings.seconds("tick_interval"), config=self.current_config,
            rollup=RollupJob.from_settings(self.engine, self.settings),
            snapshot_index=index,
            router=TotalsRouter(share=self.settings.broadcast_share,
                                partitions=self.settings.partitions),
            max_dirty=self.settings.max_dirty,
            checkpoint_batch=self.settings.checkpoint_batch,
            ack_wait=self.settings.seconds("ack_wait"),
            crash_at=self.settings.test_crash_at)
        self.is_leader = True
        self.metrics.leader.set(1)
        log.info("replica %s is the leader: %d key-windows loaded", self.replica_id,
                 len(totals.windows))
        await ingest.run()

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
                "leader": self.is_leader, "replica": self.replica_id}
