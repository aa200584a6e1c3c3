"""One partition leader's work: consume the partition's usage, merge it, checkpoint it,
then ack; broadcast totals and block decisions every tick; answer the partition's
snapshot requests; prune expired windows. Entries of another partition (a node that
counts partitions differently) are forwarded to their own partition's subject first.

Ingest and checkpoints are separate tasks. Ingest merges each message into memory
(``GlobalTotals``, which numbers it) and keeps it unacked. The checkpoint task, every
``checkpoint_interval``, writes what is dirty in bounded batches (``checkpoint_batch``
rows and buckets each) and after each durable batch acks exactly the messages whose
merges are all durable (``durable_through``). A crash at any point loses nothing: what
was not acked is redelivered, and what was written raises nothing when merged again.
Backpressure: while dirty rows and buckets reach ``max_dirty`` (or unacked messages
``MAX_UNACKED``), ingest stops fetching; JetStream holds the rest.

A term that ends (lease lost, stop, error) stops pulling and naks every message it still
holds: none of its merges will become durable here, and the next leader gets them at
once instead of after the ack wait (issue 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from central.billing.rollups import RollupJob
from central.cancellation import stop_if_cancelled
from central.fetching import fetch_available
from central.leadership import LeadershipLost
from central.ledger import LedgerStore
from central.metrics import CentralMetrics
from central.partitions.forwarding import UsageForwarder
from central.partitions.snapshot_index import SNAPSHOT_PAGE, SnapshotIndex
from central.partitions.snapshot_proxy import read_snapshot_request
from central.totals import CheckpointBatch, GlobalTotals, WindowKey
from central.totals_routing import TotalsRouter
from sync.clock import Clock
from sync.interest import DEFAULT_BROADCAST_SHARE
from sync.messages import (
    ConfigUpdate,
    SnapshotPage,
    TotalsUpdate,
    encode_snapshot_page,
    encode_totals,
)
from sync.partitions import (
    DEFAULT_PARTITIONS,
    partition_snapshot_subject,
    partition_token,
    partition_usage_filter,
)
from sync.publisher import StreamLimits, ensure_usage_stream
from sync.subjects import USAGE_CONSUMER, USAGE_STREAM

log = logging.getLogger("regionlimit.central")
FETCH_BATCH = 500
MAX_UNACKED = 20_000  # stop fetching rather than hold more messages than this
ACK_WAIT_S = 60.0
TOTALS_PER_MESSAGE = 2000
PRUNE_INTERVAL_S = 60.0
# Test-only crash points of the checkpoint task (REGIONLIMIT_TEST_CRASH_AT): the process
# kills itself there with SIGKILL, so tests can check replay after a crash at each step.
CRASH_POINTS = ("before_write", "after_write", "mid_batch")


class LeaderIngest:
    def __init__(self, *, nc: Client, js: JetStreamContext | None = None,
                 stream_limits: StreamLimits | None = None, ledger: LedgerStore,
                 totals: GlobalTotals, metrics: CentralMetrics, clock: Clock,
                 commit_interval: float, tick_interval: float,
                 config: Callable[[], Awaitable[ConfigUpdate | None]],
                 snapshot_index: SnapshotIndex[WindowKey],
                 rollup: RollupJob | None = None,
                 router: TotalsRouter | None = None, max_dirty: int = 200_000,
                 checkpoint_batch: int = 5000, ack_wait: float = ACK_WAIT_S,
                 crash_at: str = "", partition: int = 0,
                 forwarder: UsageForwarder | None = None,
                 prune_ledger: bool = True) -> None:
        self._nc = nc
        self._js = js or nc.jetstream()
        self._partition = partition
        self._forwarder = forwarder or UsageForwarder(
            self._js, partitions=router.partitions if router else DEFAULT_PARTITIONS,
            metrics=metrics)
        # Ledger-wide pruning runs on one partition's leader only (partition 0's).
        self._prune_ledger = prune_ledger
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
        self._max_dirty = max_dirty
        self._checkpoint_batch = checkpoint_batch
        self._crash_at = crash_at
        self._ack_wait = ack_wait
        self._unacked: deque[tuple[int, Msg]] = deque()  # (merge seq, message), by seq
        self._room = asyncio.Event()  # set while ingest may fetch (backpressure)
        self._room.set()
        # Checkpoints and pruning (which rebuilds the component table) take turns.
        self._commit_lock = asyncio.Lock()

    async def run(self) -> None:
        """Ingest until cancelled or until a commit fails because leadership was lost."""
        await ensure_usage_stream(self._js, limits=self._stream_limits, update=True)
        sub = await self._js.pull_subscribe(
            partition_usage_filter(self._partition), stream=USAGE_STREAM,
            durable=f"{USAGE_CONSUMER}-p{partition_token(self._partition)}",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait,
                                  max_deliver=-1, max_ack_pending=MAX_UNACKED * 2))
        snapshots = await self._nc.subscribe(partition_snapshot_subject(self._partition),
                                             cb=self._answer_snapshot)
        loops = [self._consume(sub), self._checkpoint_forever(), self._tick_forever(),
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
            await self._hand_back()

    # --- consume -----------------------------------------------------------------------

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            stop_if_cancelled()
            room = self._fetch_room()
            if room <= 0:
                # Backpressure: the checkpoint task sets the event once it made room.
                self._room.clear()
                self._metrics.ingest_paused.set(1)
                await self._room.wait()
                self._metrics.ingest_paused.set(0)
                continue
            try:
                messages = await fetch_available(sub, min(FETCH_BATCH, room), wait=1.0)
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

    def _fetch_room(self) -> int:
        """How many more messages ingest may fetch now: each raises at least one row, so
        the room left under ``max_dirty`` bounds it, as does ``MAX_UNACKED``."""
        return min(self._max_dirty - self._totals.unsaved, MAX_UNACKED - len(self._unacked))

    async def _ingest(self, msg: Msg) -> None:
        self._metrics.batches.inc()
        batch = await self._forwarder.receive(msg, keep=self._partition)
        if batch is None:
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
        self._unacked.append((outcome.seq, msg))

    # --- checkpoint -------------------------------------------------------------------

    async def _checkpoint_forever(self) -> None:
        # A checkpoint starts every interval, or right after the previous one when that
        # took longer: the interval is the period, not the pause between checkpoints.
        loop = asyncio.get_running_loop()
        took = 0.0
        while True:
            stop_if_cancelled()
            await asyncio.sleep(max(0.0, self._commit_interval - took))
            started = loop.time()
            await self.commit()
            took = loop.time() - started

    async def commit(self) -> None:
        """One checkpoint: write what is owed now, in bounded batches, acking after each
        durable batch. A failed write keeps its batch owed for the next checkpoint (its
        messages stay unacked; JetStream redelivers them meanwhile, harmlessly)."""
        async with self._commit_lock:
            # Rows dirtied while this checkpoint runs wait for the next one, so a row is
            # written at most once per checkpoint however often it rose.
            owed = self._totals.unsaved
            written = 0
            while written < owed:
                batch = self._totals.take_checkpoint(
                    max_rows=self._checkpoint_batch, max_buckets=self._checkpoint_batch,
                    now=self._clock())
                if not len(batch):
                    self._totals.confirm(batch)
                    break
                self._crash_point("before_write")
                if not await self._write(batch):
                    return
                self._crash_point("after_write")
                self._totals.confirm(batch)
                written += len(batch)
                await self._ack_durable()
                if written < owed:
                    self._crash_point("mid_batch")
            await self._ack_durable()  # messages that raised nothing

    async def _write(self, batch: CheckpointBatch) -> bool:
        started = time.perf_counter()
        try:
            quarantined = await self._ledger.write(batch.rows, batch.increments,
                                                   now=self._clock())
        except Exception as exc:
            self._totals.release(batch)
            self._metrics.commit_failures.inc()
            self._metrics.unsaved.set(self._totals.unsaved)
            log.warning("ledger checkpoint failed (%s); will retry", type(exc).__name__)
            if isinstance(exc, LeadershipLost):
                raise
            return False
        if quarantined:
            # The rest of the batch committed; the refused rows wait in the table.
            self._metrics.quarantined.inc(quarantined)
            log.error("ledger refused %d rows; they are in usage_quarantine", quarantined)
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.checkpoint_rows.observe(len(batch))
        return True

    async def _ack_durable(self) -> None:
        """Ack every message whose merges are all durable, then let ingest go on if it
        waited for room."""
        durable = self._totals.durable_through()
        unacked = self._unacked
        acked = 0
        while unacked and unacked[0][0] <= durable:
            _, msg = unacked.popleft()
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()
                acked += 1
        if acked:
            # Out of the client's buffer now: an ack lost in a crash only costs a
            # harmless redelivery, but prompt acks keep the stream's pending count true.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._nc.flush(timeout=2)
        self._metrics.unsaved.set(self._totals.unsaved)
        if self._fetch_room() > 0:
            self._room.set()

    async def _hand_back(self) -> None:
        """Nak every message this term holds unacked, so JetStream redelivers it to the
        next leader now. A message whose merge was written but not yet acked comes back
        too, harmlessly: merging it again raises nothing."""
        held, self._unacked = self._unacked, deque()
        for _, msg in held:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
        if held:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._nc.flush(timeout=2)
            log.info("handed %d unacked usage messages back for redelivery", len(held))

    def _crash_point(self, point: str) -> None:
        if self._crash_at == point:
            log.error("test crash point %s reached: killing this process", point)
            os.kill(os.getpid(), signal.SIGKILL)

    # --- broadcast ---------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self._tick_interval)
            await self.publish_totals()

    async def publish_totals(self) -> None:
        """Send the changed totals to who needs them (central/totals_routing.py): cold
        keys nowhere, hot keys to their serving nodes, blocked keys to every node."""
        now = self._clock()
        router = self._router
        changed = self._totals.take_changed(lambda window: router.wanted(
            total=window.total, policy=window.policy, blocked_until=window.blocked_until,
            now=now))
        routed = router.route(changed, now)
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
        request = read_snapshot_request(msg.data, self._metrics)
        if request is None:
            return
        now = self._clock()
        page = self._index.page(request.node_id, request.cursor,
                                min(SNAPSHOT_PAGE, request.limit or SNAPSHOT_PAGE))
        # Keys of windows that ended (kept until pruned) are skipped: a page may hold
        # fewer totals than asked for, never more.
        reply = SnapshotPage([self._totals.key_total(k) for k in page.keys
                              if self._totals.is_live(k, now)], page.next_cursor,
                             await self._config() if request.cursor == 0 else None)
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(encode_snapshot_page(reply))

    # --- prune -------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(PRUNE_INTERVAL_S)
            now = self._clock()
            async with self._commit_lock:  # no checkpoint in flight while rows move
                self._totals.prune(now)
            if not self._prune_ledger:
                continue
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
