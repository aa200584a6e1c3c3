"""Usage that arrived on the wrong subject, moved onto its partition's subject.

Two sources: the per-region subject ``regionlimit.usage.<region>`` (nodes of an earlier
release, spill files, a node that has not yet heard the partition count), which the
holder of partition 0 splits (``LegacyUsageSplitter``); and entries of another partition
on a partition subject (a node configured with another count), which the partition's
leader forwards before merging its own. Forwarded entries are republished through
JetStream and acknowledged by it before the original message is acked, so nothing is lost
in between; a crash in between republishes them again, which merging makes harmless
(components are cumulative and merge by maximum).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from central.cancellation import stop_if_cancelled
from central.fetching import fetch_available
from central.metrics import CentralMetrics
from central.totals_routing import LegacyNodes
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import UsageBatch, UsageEntry, decode_usage, encode_usage
from sync.partitions import group_by_partition, partition_usage_subject
from sync.publisher import ENTRIES_PER_MESSAGE
from sync.subjects import PREFIX, USAGE_CONSUMER, USAGE_STREAM

log = logging.getLogger("regionlimit.central")
LEGACY_USAGE = f"{PREFIX}.usage.*"  # three tokens: never a partition subject
FETCH_BATCH = 200
RETRY_S = 1.0
NEWER_VERSION_RETRY_S = 30.0


class UsageForwarder:
    def __init__(self, js: JetStreamContext, *, partitions: int, metrics: CentralMetrics,
                 timeout: float = 5.0) -> None:
        self._js = js
        self.partitions = partitions
        self._metrics = metrics
        self._timeout = timeout

    async def receive(self, msg: Msg, *, keep: int | None) -> UsageBatch | None:
        """A usage message as the leader of partition ``keep`` takes it (None: partition
        0's splitter, which keeps nothing): decoded, its entries of other partitions
        forwarded, the rest returned. None when the message was settled here instead:
        left for an upgraded central (nak), dropped as malformed (ack, counted), or
        handed back because forwarding failed (nak)."""
        try:
            batch = decode_usage(msg.data)
        except UnsupportedVersion as exc:
            self._metrics.newer.inc()
            log.warning("usage message of version %d left for an upgraded central",
                        exc.version)
            await msg.nak(delay=NEWER_VERSION_RETRY_S)
            return None
        except MalformedMessage as exc:
            self._metrics.malformed.inc()
            log.warning("dropped a malformed usage message on %s: %s", msg.subject,
                        exc.reason)
            await msg.ack()
            return None
        if batch.invalid_entries:  # counted here, where they arrived, never forwarded
            self._metrics.malformed.inc(batch.invalid_entries)
            log.warning("dropped %d malformed entries of a usage message on %s (%s); kept %d",
                        batch.invalid_entries, msg.subject, batch.invalid_reason,
                        len(batch.entries))
        try:
            own = await self.forward(batch, region=msg.subject.rsplit(".", 1)[-1], keep=keep)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not forward usage to its partitions (%s); redelivered later",
                        type(exc).__name__)
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=RETRY_S)
            return None
        if len(own) < len(batch.entries):
            self._metrics.forwarded.inc(len(batch.entries) - len(own))
            batch = replace(batch, entries=own)
        return batch

    async def forward(self, batch: UsageBatch, *, region: str, keep: int | None
                      ) -> list[UsageEntry]:
        """Publish ``batch``'s entries of every partition but ``keep`` on their own
        partition's subject and return the entries of ``keep``. Raises a NATS error or
        TimeoutError when JetStream did not take some of them (the caller naks)."""
        if keep is not None and self.partitions == 1:
            return list(batch.entries)  # one partition: nothing to hash or move
        groups = group_by_partition(batch.entries, lambda e: (e.namespace, e.key_hash),
                                    partitions=self.partitions)
        own = groups.pop(keep, []) if keep is not None else []
        for partition, entries in sorted(groups.items()):
            subject = partition_usage_subject(partition, region)
            for start in range(0, len(entries), ENTRIES_PER_MESSAGE):
                part = replace(batch, entries=entries[start:start + ENTRIES_PER_MESSAGE],
                               invalid_entries=0, invalid_reason="")
                await self._js.publish(subject, encode_usage(part), timeout=self._timeout)
        return own


class LegacyUsageSplitter:
    """Consumes the per-region usage subjects (durable ``regionlimit-central``, the
    consumer of the unpartitioned releases, its filter narrowed to them) and forwards
    every entry to its partition."""

    def __init__(self, js: JetStreamContext, *, forwarder: UsageForwarder,
                 metrics: CentralMetrics, ack_wait: float, legacy: LegacyNodes) -> None:
        self._js = js
        self._legacy = legacy
        self._forwarder = forwarder
        self._metrics = metrics
        self._ack_wait = ack_wait

    async def run(self) -> None:
        config = ConsumerConfig(durable_name=USAGE_CONSUMER, filter_subject=LEGACY_USAGE,
                                ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait,
                                max_deliver=-1, max_ack_pending=10_000)
        # Creates it, or narrows an earlier release's consumer (filter regionlimit.usage.>)
        # to the per-region subjects, keeping its position in the stream.
        await self._js.add_consumer(USAGE_STREAM, config=config)
        sub = await self._js.pull_subscribe(LEGACY_USAGE, durable=USAGE_CONSUMER,
                                            stream=USAGE_STREAM)
        try:
            while True:
                stop_if_cancelled()
                try:
                    messages = await fetch_available(sub, FETCH_BATCH, wait=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    raise
                except nats.errors.Error as exc:
                    log.warning("legacy usage fetch failed (%s); retrying",
                                type(exc).__name__)
                    await asyncio.sleep(RETRY_S)
                    continue
                for msg in messages:
                    await self._split(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _split(self, msg: Msg) -> None:
        batch = await self._forwarder.receive(msg, keep=None)
        if batch is None:
            return
        self._legacy.saw(batch)  # whether its node needs the shared totals subject
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()
