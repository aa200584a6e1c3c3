"""Partitions of the key space: which partition a key-window belongs to, and its subjects.

Every process of a deployment (nodes and central replicas) must agree on the partition
count, so it is one setting, ``REGIONLIMIT_PARTITIONS`` (default 16). A key's partition
depends only on its namespace and key hash, never on the window or the node, so every
component, total and lease of one key lives in the same partition. The hash is keyed by
nothing and fixed (BLAKE2b), so it is stable across processes, restarts and Python
versions (``hash()`` is salted per process and would not be).

Subjects: the per-partition usage subjects have five tokens
(``regionlimit.usage.part.<NN>.<region>``) so they stay inside the existing usage stream
(``regionlimit.usage.>``) yet can never match the three-token subjects of the first
protocol (``regionlimit.usage.<region>``): a partition consumer filters on its own
partition only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sync.errors import InvalidField
from sync.subjects import PREFIX

DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024  # leases, consumers and subjects are per partition: keep them few


class PartitionSettings(BaseSettings):
    """``REGIONLIMIT_PARTITIONS``: the partition count; identical on every process."""

    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1, le=MAX_PARTITIONS)


def _check_count(partitions: int) -> None:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise InvalidField("partitions", f"must be between 1 and {MAX_PARTITIONS}")


def partition_of(namespace: str, key_hash: str, *, partitions: int = DEFAULT_PARTITIONS
                 ) -> int:
    """The partition (0 .. partitions - 1) of one key of one namespace."""
    _check_count(partitions)
    digest = hashlib.blake2b(f"{namespace}\x00{key_hash}".encode(), digest_size=8).digest()
    # 64 uniform bits modulo a count <= 1024: the bias is below 1e-16, i.e. none.
    return int.from_bytes(digest, "big") % partitions


T = TypeVar("T")


def group_by_partition(items: Iterable[T], key: Callable[[T], tuple[str, str]], *,
                       partitions: int) -> dict[int, list[T]]:
    """``items`` grouped by the partition of their (namespace, key hash), each group in
    the order given."""
    groups: dict[int, list[T]] = {}
    for item in items:
        namespace, key_hash = key(item)
        groups.setdefault(partition_of(namespace, key_hash, partitions=partitions),
                          []).append(item)
    return groups


def partition_token(partition: int) -> str:
    """A partition as a subject token: zero-padded so subjects sort and read alike."""
    return f"{partition:04d}"


def partition_usage_subject(partition: int, region: str) -> str:
    """Where a node publishes its usage of keys in ``partition``."""
    return f"{PREFIX}.usage.part.{partition_token(partition)}.{region}"


def partition_usage_filter(partition: int) -> str:
    """The consumer filter of one partition's leader: every region of that partition."""
    return f"{PREFIX}.usage.part.{partition_token(partition)}.*"


def partition_totals_subject(partition: int) -> str:
    """Blocks and broadcast totals of one partition (every node subscribes)."""
    return f"{PREFIX}.totals.part.{partition_token(partition)}"


def node_totals_subject(node_id: str) -> str:
    """Totals addressed to one node only (the keys it serves)."""
    if not node_id or any(c in node_id for c in ".*> \t\r\n"):
        raise InvalidField("node_id", "must be one NATS subject token (no '.', '*', '>' "
                           f"or spaces); got {node_id!r}"[:200])
    return f"{PREFIX}.totals.node.{node_id}"


def partition_snapshot_subject(partition: int) -> str:
    """Snapshot requests for one partition, answered by that partition's leader."""
    return f"{PREFIX}.snapshot.part.{partition_token(partition)}"
