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
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a replica last said of itself, and when it was heard."""

    at: float
    partitions: int | None = None  # its REGIONLIMIT_PARTITIONS; None: not said
    leads_partition0: bool = False
    sees_legacy_nodes: bool = False
    held: int | None = None  # partitions it leads

    def encode(self, replica_id: str) -> bytes:
        return (f"{replica_id} {self.partitions} {int(self.leads_partition0)} "
                f"{int(self.sees_legacy_nodes)} {self.held}").encode()

    @staticmethod
    def decode(data: bytes, at: float) -> tuple[str, Heartbeat] | None:
        """(replica id, heartbeat), or None for what is not one."""
        try:
            replica, *fields = data.decode().split(" ")
            beat = Heartbeat(
                at, partitions=int(fields[0]) if fields else None,
                leads_partition0=len(fields) > 1 and fields[1] == "1",
                sees_legacy_nodes=len(fields) > 2 and fields[2] == "1",
                held=int(fields[3]) if len(fields) > 3 else None)
        except (UnicodeDecodeError, ValueError):
            return None
        return (replica, beat) if 0 < len(replica) <= MAX_ID else None


class ReplicaRoster:
    def __init__(self, replica_id: str, *, partitions: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.replica_id = replica_id
        self.partitions = partitions
        self._monotonic = monotonic
        self._peers: dict[str, Heartbeat] = {}  # other replicas, by id
        # This replica's own state, set by its owner and sent in its heartbeats.
        self.held = 0
        self.leads_partition0 = False
        self.sees_legacy_nodes = False  # central/totals_routing.py

    def heard(self, replica_id: str, partitions: int | None = None, *,
              leads_partition0: bool = False, sees_legacy_nodes: bool = False,
              held: int | None = None) -> None:
        self._record(replica_id, Heartbeat(
            self._monotonic(), partitions, leads_partition0, sees_legacy_nodes, held))

    def _record(self, replica_id: str, beat: Heartbeat) -> None:
        if replica_id == self.replica_id:
            return  # our own heartbeat, echoed back
        if self._disagrees(beat) and not self._disagrees(self._peers.get(replica_id)):
            log.error("replica %s runs %d partitions, this one %d: not leading any "
                      "until REGIONLIMIT_PARTITIONS agrees", replica_id, beat.partitions,
                      self.partitions)
        self._peers[replica_id] = beat

    def _disagrees(self, beat: Heartbeat | None) -> bool:
        return beat is not None and beat.partitions not in (None, self.partitions)

    def _live(self) -> list[Heartbeat]:
        """The other replicas heard within EXPIRE_S (the silent ones are forgotten)."""
        cutoff = self._monotonic() - EXPIRE_S
        for replica, beat in list(self._peers.items()):
            if beat.at < cutoff:
                del self._peers[replica]
        return list(self._peers.values())

    def alive(self) -> int:
        """Replicas heard within EXPIRE_S, this one included."""
        return len(self._live()) + 1

    def someone_below(self, count: int) -> bool:
        """Whether a live other replica said it leads fewer than ``count`` partitions."""
        return any(beat.held is not None and beat.held < count for beat in self._live())

    def peers_see_legacy_nodes(self) -> bool:
        """Whether a live other replica receives usage of previous-release nodes."""
        return any(beat.sees_legacy_nodes for beat in self._live())

    @property
    def partition0_led(self) -> bool:
        """Whether this replica or a live one of the roster leads partition 0."""
        return self.leads_partition0 or any(beat.leads_partition0 for beat in self._live())

    @property
    def conflict(self) -> bool:
        """Whether a live replica announced another partition count."""
        return any(self._disagrees(beat) for beat in self._live())

    async def run(self, nc: Client) -> None:
        """Heartbeat and listen until cancelled."""
        sub = await nc.subscribe(REPLICAS, cb=self._on_heartbeat)
        try:
            while True:
                own = Heartbeat(0.0, self.partitions, self.leads_partition0,
                                self.sees_legacy_nodes, self.held)
                with contextlib.suppress(nats.errors.Error):
                    await nc.publish(REPLICAS, own.encode(self.replica_id))
                await asyncio.sleep(HEARTBEAT_S)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_heartbeat(self, msg: Msg) -> None:
        heard = Heartbeat.decode(msg.data, self._monotonic())
        if heard is not None:
            self._record(*heard)
