"""The lease-mode authority: hands nodes slices of a key's window budget over NATS.

Every central replica serves the request subject in one queue group, like the
consistent-mode authority, and every answer is committed before it goes out
(central/lease/tx.py), so any replica may answer any request and a replica killed
mid-request loses nothing a node was told. Requests of one key go to one lane of the
replica, so they wait on each other in memory rather than on the row lock.

Every replica also prunes ended rows now and then (in bounded batches; replicas skip
each other's), so the tables hold only the keys in use.

This module is the seam a per-partition authority replaces: it needs only a
LeaseTransactions and a NATS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client
from prometheus_client import Counter

from central.lanes import Lane, LaneServer
from central.lease.tx import PRUNE_BATCH, LeaseTransactions
from central.metrics import CentralMetrics
from sync.messages import LeaseGrant, LeaseRequest, decode_lease_request, encode_lease_grant
from sync.subjects import LEASE, LEASE_QUEUE

log = logging.getLogger("regionlimit.lease_authority")
LANES = 4
PRUNE_EVERY_S = 60.0
PRUNE_ROUNDS = 20  # batches per pass at most: the rest waits for the next pass


class LeaseAuthority:
    def __init__(self, transactions: LeaseTransactions, *, metrics: CentralMetrics,
                 lanes: int = LANES) -> None:
        self._transactions = transactions
        self._metrics = metrics
        self._server: LaneServer[LeaseRequest] = LaneServer(
            subject=LEASE, queue_group=LEASE_QUEUE, lanes=lanes, decode=decode_lease_request,
            refusal=encode_lease_grant(None), what="lease", metrics=metrics, log=log)
        self.requests = Counter("regionlimit_lease_requests", "Lease requests answered",
                                ["op", "outcome"], registry=metrics.registry)

    async def serve(self, nc: Client) -> None:
        """Answer lease requests until cancelled."""
        await self._server.serve(nc, self._lane, self._prune())

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            try:
                for _ in range(PRUNE_ROUNDS):
                    if await self._transactions.prune() < PRUNE_BATCH:
                        break
            except Exception as exc:
                # The rows wait for the next pass; requests are unaffected.
                log.warning("lease pruning failed (%s)", type(exc).__name__)

    async def _lane(self, queue: Lane[LeaseRequest]) -> None:
        while True:
            request, msg = await queue.get()
            grant: LeaseGrant | None = None
            try:
                grant = await self._transactions.handle(request)
                self.requests.labels(request.op, "ok").inc()
            except Exception as exc:
                # The node waits for its timeout or asks again; nothing was granted.
                log.warning("lease %s failed (%s)", request.op, type(exc).__name__)
                self._metrics.authority_errors.inc()
                self.requests.labels(request.op, "error").inc()
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode_lease_grant(grant))
