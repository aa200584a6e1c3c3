"""Lease-mode authority state: one row per key (its window's budget, or its token bucket)
and one per node holding a grant. A windowed key's grants belong to its current window;
when the window moves on they are deleted with it. ``window_end`` is when the row may be
pruned (central/lease/tx.py): a window's end, or for a token bucket the moment its leases
have all ended and it has refilled (central/lease/bucket.py)."""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Index, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from central.models import Base


class LeaseKey(Base):
    __tablename__ = "lease_keys"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger)
    window_end: Mapped[int] = mapped_column(BigInteger)
    limit: Mapped[int] = mapped_column(BigInteger)
    # Admitted in the window before the key's first grant (fast or consistent mode).
    seeded: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # A token bucket's level in units of 1/unit token, as of tokens_at; NULL for windows.
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    unit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_lease_keys_window_end", "window_end"),)


class LeaseGrantRow(Base):
    __tablename__ = "lease_grants"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    node_id: Mapped[str] = mapped_column(Text, primary_key=True)
    granted: Mapped[int] = mapped_column(BigInteger)
    reported: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    demand: Mapped[int] = mapped_column(BigInteger)


lease_keys = cast(Table, LeaseKey.__table__)
lease_grants = cast(Table, LeaseGrantRow.__table__)
