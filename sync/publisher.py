"""Node side: usage batches into the JetStream stream, chunked under NATS' payload limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from sync.errors import RegionLimitError
from sync.messages import UsageBatch, UsageEntry, encode_usage
from sync.partitions import group_by_partition, partition_usage_subject
from sync.subjects import USAGE_STREAM, USAGE_SUBJECTS, usage_subject

log = logging.getLogger("regionlimit.sync")
ENTRIES_PER_MESSAGE = 2000  # ~150 KB of msgpack, far below the 1 MiB payload limit
STREAM_MAX_AGE_S = 2 * 86_400  # shorter than central's component retention (7 days)
DEFAULT_STREAM_MAX_BYTES = 1 << 30  # 1 GiB: hours of usage of a busy system
PUBLISH_ERRORS = (nats.errors.Error, TimeoutError, OSError)


class PublishFailed(RegionLimitError):
    """Some entries were not acknowledged by JetStream; ``remaining`` still need sending."""

    def __init__(self, remaining: list[UsageEntry], reason: str) -> None:
        super().__init__(f"publish failed: {reason}")
        self.remaining = remaining
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """How the usage stream is stored (REGIONLIMIT_STREAM_REPLICAS / _MAX_BYTES).

    ``replicas`` must not exceed the JetStream servers of the hub: a single dev server
    takes 1 (the default), the shipped 3-server hub 3. ``max_bytes`` bounds the stream;
    once full, JetStream refuses new usage (discard new) instead of dropping unbilled
    usage: nodes keep it in their counters and retry.
    """

    replicas: int = 1
    max_bytes: int = DEFAULT_STREAM_MAX_BYTES


def usage_stream_config(limits: StreamLimits) -> StreamConfig:
    return StreamConfig(
        name=USAGE_STREAM, subjects=[USAGE_SUBJECTS], storage=StorageType.FILE,
        max_age=STREAM_MAX_AGE_S, num_replicas=limits.replicas, max_bytes=limits.max_bytes,
        discard=DiscardPolicy.NEW)


async def ensure_usage_stream(js: JetStreamContext, *, limits: StreamLimits | None = None,
                              update: bool = False) -> None:
    """Create the usage stream, or verify an existing one covers our subjects. With
    ``update`` (central's leader), an existing stream's replicas and size are brought to
    ``limits``."""
    limits = limits or StreamLimits()
    try:
        info = await js.stream_info(USAGE_STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(usage_stream_config(limits))
        except nats.js.errors.BadRequestError as exc:
            if "already in use" not in str(exc.description or ""):
                raise StreamSetupFailed(limits, exc) from None
            # created concurrently by another process
        except nats.js.errors.ServerError as exc:  # e.g. more replicas than servers
            raise StreamSetupFailed(limits, exc) from None
        return
    subjects = info.config.subjects or []
    if USAGE_SUBJECTS not in subjects:
        raise RegionLimitError(f"stream {USAGE_STREAM} exists without subject {USAGE_SUBJECTS}")
    if update and (info.config.num_replicas != limits.replicas
                   or info.config.max_bytes != limits.max_bytes):
        try:
            await js.update_stream(usage_stream_config(limits))
        except nats.js.errors.APIError as exc:
            raise StreamSetupFailed(limits, exc) from None
        log.info("usage stream updated: %d replicas, max %d bytes", limits.replicas,
                 limits.max_bytes)


class StreamSetupFailed(RegionLimitError):
    """JetStream refused the usage stream as configured (the message says which limit)."""

    def __init__(self, limits: StreamLimits, exc: nats.js.errors.APIError) -> None:
        super().__init__(
            f"JetStream refused stream {USAGE_STREAM} with {limits.replicas} replicas and "
            f"max {limits.max_bytes} bytes ({exc.description or type(exc).__name__}); check "
            "REGIONLIMIT_STREAM_REPLICAS against the hub's JetStream servers and "
            "REGIONLIMIT_STREAM_MAX_BYTES against its storage")
        self.limits = limits
        self.description = exc.description


class UsagePublisher:
    """Publishes a node's usage. Until ``partitions`` is known (central announces it in
    its configuration), everything goes on the region's subject, which central splits by
    partition; after that each key's usage goes on its partition's subject."""

    def __init__(self, js: JetStreamContext, *, node_id: str, region: str,
                 timeout: float = 2.0, partitions: int | None = None) -> None:
        self._js = js
        self._node_id = node_id
        self._region = region
        self._subject = usage_subject(region)
        self._timeout = timeout
        self.partitions = partitions

    async def publish(self, flushed_at: int, entries: Sequence[UsageEntry]) -> int:
        """Publish all ``entries``; returns the number of messages. On failure raises
        PublishFailed with the entries JetStream did not acknowledge."""
        if self.partitions is None:
            groups = [(self._subject, list(entries))]
        else:
            by_partition = group_by_partition(
                entries, lambda e: (e.namespace, e.key_hash), partitions=self.partitions)
            groups = [(partition_usage_subject(p, self._region), group)
                      for p, group in sorted(by_partition.items())]
        chunks = [(subject, group[start:start + ENTRIES_PER_MESSAGE])
                  for subject, group in groups
                  for start in range(0, len(group), ENTRIES_PER_MESSAGE)]
        # All at once: one partition's acknowledgement need not wait for another's (16
        # round trips one after the other stretched every flush). Order does not matter:
        # counts are cumulative and central keeps the maximum.
        results = await asyncio.gather(
            *(self._publish_chunk(subject, flushed_at, chunk) for subject, chunk in chunks),
            return_exceptions=True)
        failed = [(chunk, result) for (_, chunk), result in zip(chunks, results, strict=True)
                  if isinstance(result, BaseException)]
        for _, result in failed:
            if not isinstance(result, PUBLISH_ERRORS):
                raise result  # a bug or a cancellation, not a failed publish
        if failed:
            raise PublishFailed([e for chunk, _ in failed for e in chunk],
                                type(failed[0][1]).__name__)
        return len(chunks)

    async def _publish_chunk(self, subject: str, flushed_at: int,
                             chunk: list[UsageEntry]) -> None:
        data = encode_usage(UsageBatch(self._node_id, self._region, flushed_at, chunk))
        await self._js.publish(subject, data, timeout=self._timeout)

    async def publish_encoded(self, data: bytes) -> None:
        """Publish a batch encoded earlier (a spill file's), under its original node id,
        on the region's subject (central splits it by partition)."""
        await self._js.publish(self._subject, data, timeout=self._timeout)
