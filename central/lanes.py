"""Requests on one NATS subject, served by every replica in a queue group and spread over
a few in-memory lanes by key: what the consistent and the lease authorities share.

Requests of one key always go to the same lane, so they wait on each other in memory
rather than on a database row lock, while unrelated keys are served side by side. A
request that does not decode is counted, logged by its reason only, and answered with
``refusal`` at once, so the node does not wait for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from central.metrics import CentralMetrics
from sync.errors import MalformedMessage, UnsupportedVersion


class KeyedRequest(Protocol):
    @property
    def namespace(self) -> str: ...

    @property
    def key_hash(self) -> str: ...


R = TypeVar("R", bound=KeyedRequest)
Lane = asyncio.Queue[tuple[R, Msg]]


class LaneServer(Generic[R]):
    def __init__(self, *, subject: str, queue_group: str, lanes: int,
                 decode: Callable[[bytes], R], refusal: bytes, what: str,
                 metrics: CentralMetrics, log: logging.Logger) -> None:
        self._subject = subject
        self._queue_group = queue_group
        self._decode = decode
        self._refusal = refusal
        self._what = what
        self._metrics = metrics
        self._log = log
        self.lanes: list[Lane[R]] = [asyncio.Queue() for _ in range(lanes)]

    async def serve(self, nc: Client, work: Callable[[Lane[R]], Coroutine[Any, Any, None]],
                    *others: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on every lane (and ``others`` beside them) until cancelled."""
        sub = await nc.subscribe(self._subject, queue=self._queue_group, cb=self._receive)
        try:
            async with asyncio.TaskGroup() as group:
                for lane in self.lanes:
                    group.create_task(work(lane))
                for other in others:
                    group.create_task(other)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _receive(self, msg: Msg) -> None:
        try:
            request = self._decode(msg.data)
        except (MalformedMessage, UnsupportedVersion) as exc:
            self._metrics.malformed.inc()
            self._log.warning("dropped a malformed %s request: %s", self._what, exc)
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(self._refusal)
            return
        lane = hash((request.namespace, request.key_hash)) % len(self.lanes)
        self.lanes[lane].put_nowait((request, msg))
