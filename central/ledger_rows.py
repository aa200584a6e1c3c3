"""The ledger's row types, apart from the SQL that stores them.

Pure values: central/totals.py (which must not import SQL) builds them, central/ledger.py
writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BucketIncrement", "ComponentRow"]


@dataclass(frozen=True, slots=True)
class ComponentRow:
    """One node's cumulative counts for one key-window, with the policy it enforced."""

    namespace: str
    key_hash: str
    window_start: int
    node_id: str
    region: str
    window_end: int
    admitted: int
    denied: int
    limit: int
    duration: str
    algorithm: str
    burst: int | None
    updated_at: int

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.namespace, self.key_hash, self.window_start, self.node_id)


@dataclass(frozen=True, slots=True)
class BucketIncrement:
    """Cost to add to one key's usage in one region and UTC hour (epoch ms)."""

    namespace: str
    key_hash: str
    region: str
    hour_start: int
    admitted: int
    denied: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.namespace, self.key_hash, self.region, self.hour_start)
