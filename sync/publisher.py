"""Node side: usage batches into the JetStream stream, chunked under NATS' payload limit."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from sync.errors import RegionLimitError
from sync.messages import UsageBatch, UsageEntry, encode_usage
from sync.subjects import USAGE_STREAM, USAGE_SUBJECTS, usage_subject

log = logging.getLogger("regionlimit.sync")
ENTRIES_PER_MESSAGE = 2000  # ~150 KB of msgpack, far below the 1 MiB payload limit
STREAM_MAX_AGE_S = 2 * 86_400  # shorter than central's component retention (7 days)
PUBLISH_ERRORS = (nats.errors.Error, TimeoutError, OSError)


class PublishFailed(RegionLimitError):
    """Some entries were not acknowledged by JetStream; ``remaining`` still need sending."""

    def __init__(self, remaining: list[UsageEntry], reason: str) -> None:
        super().__init__(f"publish failed: {reason}")
        self.remaining = remaining
        self.reason = reason


async def ensure_usage_stream(js: JetStreamContext) -> None:
    """Create the usage stream, or verify an existing one covers our subjects."""
    try:
        info = await js.stream_info(USAGE_STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(StreamConfig(
                name=USAGE_STREAM, subjects=[USAGE_SUBJECTS], storage=StorageType.FILE,
                max_age=STREAM_MAX_AGE_S))
        except nats.js.errors.BadRequestError:
            pass  # created concurrently by another process
        return
    subjects = info.config.subjects or []
    if USAGE_SUBJECTS not in subjects:
        raise RegionLimitError(f"stream {USAGE_STREAM} exists without subject {USAGE_SUBJECTS}")


class UsagePublisher:
    def __init__(self, js: JetStreamContext, *, node_id: str, region: str,
                 timeout: float = 2.0) -> None:
        self._js = js
        self._node_id = node_id
        self._region = region
        self._subject = usage_subject(region)
        self._timeout = timeout

    async def publish(self, flushed_at: int, entries: Sequence[UsageEntry]) -> int:
        """Publish all ``entries``; returns the number of messages. On failure raises
        PublishFailed with the entries JetStream did not acknowledge."""
        messages = 0
        for start in range(0, len(entries), ENTRIES_PER_MESSAGE):
            chunk = list(entries[start:start + ENTRIES_PER_MESSAGE])
            data = encode_usage(UsageBatch(self._node_id, self._region, flushed_at, chunk))
            try:
                await self._js.publish(self._subject, data, timeout=self._timeout)
            except PUBLISH_ERRORS as exc:
                raise PublishFailed(list(entries[start:]), type(exc).__name__) from None
            messages += 1
        return messages

    async def publish_encoded(self, data: bytes) -> None:
        """Publish a batch encoded earlier (a spill file's), under its original node id."""
        await self._js.publish(self._subject, data, timeout=self._timeout)
