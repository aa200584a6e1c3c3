"""The leader's work: consume usage, merge it, commit it, then ack; broadcast totals and
block decisions every tick; answer snapshots; prune expired windows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from central.billing.rollups import RollupJob
from central.leadership import LeadershipLost
from central.ledger import LedgerStore
from central.metrics import CentralMetrics
from central.partitions.snapshot_index import SnapshotIndex
from central.totals import GlobalTotals, WindowKey
from central.totals_routing import TotalsRouter
from sync.clock import Clock
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.interest import DEFAULT_BROADCAST_SHARE
from sync.messages import (
    ConfigUpdate,
    SnapshotPage,
    TotalsUpdate,
    decode_snapshot_request,
    decode_usage,
    encode_snapshot_page,
    encode_totals,
)
from sync.partitions import DEFAULT_PARTITIONS
from sync.publisher import StreamLimits, ensure_usage_stream
from sync.subjects import SNAPSHOT, USAGE_CONSUMER, USAGE_STREAM, USAGE_SUBJECTS

log = logging.getLogger("regionlimit.central")
FETCH_BATCH = 500
MAX_UNACKED = 20_000  # commit early rather than hold more messages than this
ACK_WAIT_S = 60.0
NEWER_VERSION_RETRY_S = 30.0
TOTALS_PER_MESSAGE = 2000
SNAPSHOT_PAGE = 2000
PRUNE_INTERVAL_S = 60.0


class LeaderIngest:
    def __init__(self, *, nc: Client, js: JetStreamContext | None = None,
                 stream_limits: StreamLimits | None = None, ledger: LedgerStore,
                 totals: GlobalTotals, metrics: CentralMetrics, clock: Clock,
                 commit_interval: float, tick_interval: float,
                 config: Callable[[], Awaitable[ConfigUpdate | None]],
                 snapshot_index: SnapshotIndex[WindowKey],
                 rollup: RollupJob | None = None,
                 router: TotalsRouter | None = None) -> None:
        self._nc = nc
        self._js = js or nc.jetstream()
        self._stream_limits = stream_limits or StreamLimits()
        self._ledger = ledger
        self._totals = totals
        self._metrics = metrics
        self._clock = clock
        self._commit_interval = commit_interval
        self._tick_interval = tick_interval
        self._config = config
        self._rollup = rollup
        # Required, not defaulted: it must be the observer ``totals`` was built with (an
        # index nothing feeds would answer every snapshot with nothing).
        self._index = snapshot_index
        self._router = router or TotalsRouter(share=DEFAULT_BROADCAST_SHARE,
                                              partitions=DEFAULT_PARTITIONS)
        self._unacked: list[Msg] = []
        self._commit_lock = asyncio.Lock()

    async def run(self) -> None:
        """Ingest until cancelled or until a commit fails because leadership was lost."""
        await ensure_usage_stream(self._js, limits=self._stream_limits, update=True)
        sub = await self._js.pull_subscribe(
            USAGE_SUBJECTS, durable=USAGE_CONSUMER, stream=USAGE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                  max_deliver=-1, max_ack_pending=MAX_UNACKED * 2))
        snapshots = await self._nc.subscribe(SNAPSHOT, cb=self._answer_snapshot)
        loops = [self._consume(sub), self._commit_forever(), self._tick_forever(),
                 self._prune_forever()]
        if self._rollup is not None:  # usage rollups and retention (central/billing/rollups.py)
            loops.append(self._rollup.run_forever(self._clock))
        try:
            async with asyncio.TaskGroup() as group:
                for loop in loops:
                    group.create_task(loop)
        finally:
            with contextlib.suppress(Exception):
                await snapshots.unsubscribe()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- consume -----------------------------------------------------------------------

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            if len(self._unacked) >= MAX_UNACKED:
                await self.commit()
            try:
                messages = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                raise
            except nats.errors.Error as exc:
                log.warning("fetch failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self._ingest(msg)

    async def _ingest(self, msg: Msg) -> None:
        self._metrics.batches.inc()
        try:
            batch = decode_usage(msg.data)
        except UnsupportedVersion as exc:
            self._metrics.newer.inc()
            log.warning("usage message of version %d left for an upgraded central",
                        exc.version)
            await msg.nak(delay=NEWER_VERSION_RETRY_S)
            return
        except MalformedMessage as exc:
            self._metrics.malformed.inc()
            log.warning("dropped a malformed usage message on %s: %s", msg.subject, exc.reason)
            await msg.ack()
            return
        try:
            outcome = self._totals.merge(batch, self._clock())
        except Exception:  # a message that breaks the merge must not stop ingestion
            self._metrics.malformed.inc()
            log.exception("dropped a usage message that could not be merged (%s)",
                          msg.subject)
            await msg.ack()
            return
        self._router.legacy.saw(batch)  # whether its node needs the shared totals subject
        self._metrics.ingested.inc(len(batch.entries))
        for reason, count in outcome.rejected.items():
            self._metrics.rejected.labels(reason).inc(count)
        self._unacked.append(msg)

    # --- commit ------------------------------------------------------------------------

    async def _commit_forever(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval)
            await self.commit()

    async def commit(self) -> None:
        """Persist what was merged, then ack the messages it came from. A failed write
        keeps both for the next attempt; JetStream redelivers meanwhile, harmlessly."""
        async with self._commit_lock:
            rows, increments = self._totals.take_unsaved(self._clock())
            messages, self._unacked = self._unacked, []
            if not rows and not increments and not messages:
                return
            started = time.perf_counter()
            try:
                quarantined = await self._ledger.write(rows, increments, now=self._clock())
            except Exception as exc:
                self._totals.return_unsaved(rows, increments)
                self._unacked = messages + self._unacked
                self._metrics.commit_failures.inc()
                self._metrics.unsaved.set(self._totals.unsaved)
                log.warning("ledger commit failed (%s); will retry", type(exc).__name__)
                if isinstance(exc, LeadershipLost):
                    raise
                return
            if quarantined:
                # The rest of the batch committed; the refused rows wait in the table.
                self._metrics.quarantined.inc(quarantined)
                log.error("ledger refused %d rows; they are in usage_quarantine",
                          quarantined)
            self._metrics.commit_seconds.observe(time.perf_counter() - started)
            self._metrics.unsaved.set(self._totals.unsaved)
            for msg in messages:
                with contextlib.suppress(nats.errors.Error):
                    await msg.ack()

    # --- broadcast ---------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            await self.publish_totals()

    async def publish_totals(self) -> None:
        """Send the changed totals to who needs them (central/totals_routing.py): cold
        keys nowhere, hot keys to their serving nodes, blocked keys to every node."""
        now = self._clock()
        routed = self._router.route(self._totals.take_changed(), now)
        for subject, totals in routed.by_subject.items():
            for start in range(0, len(totals), TOTALS_PER_MESSAGE):
                chunk = totals[start:start + TOTALS_PER_MESSAGE]
                try:
                    await self._nc.publish(subject, encode_totals(TotalsUpdate(now, chunk)))
                except nats.errors.Error as exc:
                    log.warning("totals publication failed (%s)", type(exc).__name__)
                    return
                self._metrics.ticks.inc(len(chunk))
        self._metrics.totals_addressed.inc(routed.addressed)
        self._metrics.totals_broadcast.inc(routed.broadcast)

    async def _answer_snapshot(self, msg: Msg) -> None:
        """One page of what the asking node needs: the keys it served, then the blocked
        keys, from the snapshot index in O(page) (never a pass over every key). The cursor
        is the index's; a node just echoes it."""
        try:
            request = decode_snapshot_request(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._metrics.malformed.inc()
            log.warning("dropped a malformed snapshot request: %s", exc)
            return
        now = self._clock()
        page = self._index.page(request.node_id, request.cursor, SNAPSHOT_PAGE)
        # Keys of windows that ended (kept until pruned) are skipped: a page may hold
        # fewer than SNAPSHOT_PAGE totals, never more.
        reply = SnapshotPage([self._totals.key_total(k) for k in page.keys
                              if self._totals.is_live(k, now)], page.next_cursor,
                             await self._config() if request.cursor == 0 else None)
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(encode_snapshot_page(reply))

    # --- prune -------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            now = self._clock()
            self._totals.prune(now)
            retained = now - self._totals.retention_ms
            try:
                pruned = await self._ledger.prune_components(window_end_before=retained)
                idle = await self._ledger.prune_consistent_keys(
                    now=now, updated_before=retained)
            except Exception as exc:
                log.warning("pruning failed (%s)", type(exc).__name__)
                continue
            if pruned or idle:
                log.info("pruned %d expired components and %d idle consistent keys",
                         pruned, idle)
