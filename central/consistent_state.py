"""The consistent-mode authority's per-key state: a KeyState kept in Postgres.

``level`` is text because a token bucket's level (burst x duration in ms) can exceed a
64-bit integer for large limits.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from central.models import Base


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
