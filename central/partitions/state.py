"""What one partition's leader keeps in memory: its components and totals, and the
snapshot index fed as they change."""

from __future__ import annotations

from dataclasses import dataclass

from central.partitions.snapshot_index import SnapshotIndex
from central.totals import GlobalTotals, WindowKey


@dataclass(frozen=True, slots=True)
class PartitionState:
    totals: GlobalTotals
    index: SnapshotIndex[WindowKey]

    @classmethod
    def empty(cls, retention_ms: int, over_admission: dict[str, int]) -> PartitionState:
        index: SnapshotIndex[WindowKey] = SnapshotIndex()
        return cls(GlobalTotals(retention_ms=retention_ms, over_admission=over_admission,
                                observer=index), index)
