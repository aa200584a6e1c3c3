"""Which central replicas are alive, from heartbeats on core NATS, and each one's share of
the partitions.

Every replica publishes its id every ``HEARTBEAT_S`` and counts the replicas it heard
within ``EXPIRE_S`` (itself included). Its fair share is ``ceil(partitions / replicas)``:
a replica holds no more than that, so a new replica finds partitions to take, and a dead
one's partitions are taken once its heartbeats expire (its leases are free sooner: its
sessions die with it). Since ``ceil`` can leave a replica with nothing (16 partitions,
5 replicas: 4, 4, 4, 4, 0), a replica holding more than ``floor(partitions / replicas)``
also hands one back while a live replica holds fewer than that (``someone_below``): 3, 3,
3, 3, 4. The count only balances load; exclusion is the leases' job, so
replicas that briefly disagree on it cost a partition's idle second, never a double count.

A heartbeat also says whether the replica leads partition 0. Partition 0's lock is the
single leader's lock of earlier releases, so while partition 0 is led by no replica of the
roster (an earlier release's central may hold that lock, consuming every usage subject)
a replica claims partition 0 only (``partition0_led``).

A heartbeat also carries the replica's partition count. Replicas with different counts
would each lead "partition 3" of a different key set, so a replica that hears another
count stops leading and claims nothing until the disagreement is gone (``conflict``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from sync.subjects import PREFIX

log = logging.getLogger("regionlimit.central")
REPLICAS = f"{PREFIX}.central.replicas"
HEARTBEAT_S = 1.0
EXPIRE_S = 3.5 * HEARTBEAT_S
MAX_ID = 200


def fair_share(partitions: int, replicas: int) -> int:
    """How many partitions one of ``replicas`` live replicas should hold."""
    return math.ceil(partitions / max(1, replicas))


class ReplicaRoster:
    def __init__(self, replica_id: str, *, partitions: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.replica_id = replica_id
        self.partitions = partitions
        self._monotonic = monotonic
        self._seen: dict[str, float] = {}
        self._other_counts: dict[str, tuple[int, float]] = {}
        self._partition0: dict[str, float] = {}  # replicas that said they lead it
        self._legacy: dict[str, float] = {}  # replicas that said they see old nodes
        self._held: dict[str, int] = {}  # partitions each replica said it leads
        self.held = 0  # this replica's own, set by its owner
        self.leads_partition0 = False  # this replica's own, set by its owner
        self.sees_legacy_nodes = False  # likewise (central/totals_routing.py)

    def heard(self, replica_id: str, partitions: int | None = None, *,
              leads_partition0: bool = False, sees_legacy_nodes: bool = False,
              held: int | None = None) -> None:
        now = self._monotonic()
        self._seen[replica_id] = now
        if held is not None:
            self._held[replica_id] = held
        if sees_legacy_nodes:
            self._legacy[replica_id] = now
        else:
            self._legacy.pop(replica_id, None)
        if leads_partition0:
            self._partition0[replica_id] = now
        else:
            self._partition0.pop(replica_id, None)
        if partitions is not None and partitions != self.partitions:
            if replica_id not in self._other_counts:
                log.error("replica %s runs %d partitions, this one %d: not leading any "
                          "until REGIONLIMIT_PARTITIONS agrees", replica_id, partitions,
                          self.partitions)
            self._other_counts[replica_id] = (partitions, now)
        else:
            self._other_counts.pop(replica_id, None)

    def someone_below(self, count: int) -> bool:
        """Whether a live other replica said it leads fewer than ``count`` partitions."""
        self.alive()  # forgets the silent ones
        return any(held < count for replica, held in self._held.items()
                   if replica != self.replica_id and replica in self._seen)

    def peers_see_legacy_nodes(self) -> bool:
        """Whether a live other replica receives usage of previous-release nodes."""
        cutoff = self._monotonic() - EXPIRE_S
        return any(seen >= cutoff for replica, seen in self._legacy.items()
                   if replica != self.replica_id)

    @property
    def partition0_led(self) -> bool:
        """Whether this replica or a live one of the roster leads partition 0."""
        cutoff = self._monotonic() - EXPIRE_S
        return self.leads_partition0 or any(
            seen >= cutoff for replica, seen in self._partition0.items()
            if replica != self.replica_id)

    @property
    def conflict(self) -> bool:
        """Whether a live replica announced another partition count."""
        cutoff = self._monotonic() - EXPIRE_S
        for replica, (_, seen) in list(self._other_counts.items()):
            if seen < cutoff:
                del self._other_counts[replica]
        return bool(self._other_counts)

    def alive(self) -> int:
        """Replicas heard within EXPIRE_S, this one always included."""
        cutoff = self._monotonic() - EXPIRE_S
        for replica, seen in list(self._seen.items()):
            if seen < cutoff:
                del self._seen[replica]
        return len(self._seen.keys() | {self.replica_id})

    async def run(self, nc: Client) -> None:
        """Heartbeat and listen until cancelled."""
        sub = await nc.subscribe(REPLICAS, cb=self._on_heartbeat)
        try:
            while True:
                with contextlib.suppress(nats.errors.Error):
                    await nc.publish(REPLICAS,
                                     f"{self.replica_id} {self.partitions} "
                                     f"{int(self.leads_partition0)} "
                                     f"{int(self.sees_legacy_nodes)} "
                                     f"{self.held}".encode())
                await asyncio.sleep(HEARTBEAT_S)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            replica, *fields = msg.data.decode().split(" ")
            partitions = int(fields[0]) if fields else None
            leads0 = len(fields) > 1 and fields[1] == "1"
            legacy = len(fields) > 2 and fields[2] == "1"
            held = int(fields[3]) if len(fields) > 3 else None
        except (UnicodeDecodeError, ValueError):
            return
        if 0 < len(replica) <= MAX_ID:
            self.heard(replica, partitions, leads_partition0=leads0,
                       sees_legacy_nodes=legacy, held=held)
