"""The consistent-mode authority's per-key state: a KeyState kept in Postgres.

``level`` is text because a token bucket's level (burst x duration in ms) can exceed a
64-bit integer for large limits.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Delete, Table, Text, delete, func, or_
from sqlalchemy.orm import Mapped, mapped_column

from central.models import Base
from sync.algorithms import ALGORITHMS


class ConsistentKey(Base):
    __tablename__ = "consistent_keys"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    cur_start: Mapped[int] = mapped_column(BigInteger)
    cur_end: Mapped[int] = mapped_column(BigInteger)
    cur: Mapped[int] = mapped_column(BigInteger)
    cur_denied: Mapped[int] = mapped_column(BigInteger)
    prev: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(Text)
    level_at: Mapped[int] = mapped_column(BigInteger)
    limit: Mapped[int] = mapped_column(BigInteger)
    burst: Mapped[int | None] = mapped_column(BigInteger)
    duration: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[int] = mapped_column(BigInteger)


consistent_keys = cast(Table, ConsistentKey.__table__)


def idle_keys_delete(*, now: int, updated_before: int) -> Delete:
    """Delete keys whose state can no longer change a decision, untouched since
    ``updated_before``: a deleted key starts again from a fresh row, which for them is
    the same thing. Idle means both windows a sliding window weighs have ended, and a
    token bucket has had time to refill from empty (capacity / limit durations, rounded
    up). A lane that locks a key first keeps it: its update moves ``updated_at``."""
    c = consistent_keys.c
    span = c.cur_end - c.cur_start
    refill_spans = (func.coalesce(c.burst, c.limit) + c.limit - 1) / c.limit
    return delete(consistent_keys).where(
        c.updated_at < updated_before,
        c.cur_end + span <= now,
        or_(c.algorithm.not_in(_LEVEL_ALGORITHMS), c.level_at + refill_spans * span <= now))


# Algorithms whose state is a level that refills (not usage per window): their keys stay
# until the level could be full again.
_LEVEL_ALGORITHMS = tuple(name for name, a in ALGORITHMS.items() if not a.windowed_usage)
