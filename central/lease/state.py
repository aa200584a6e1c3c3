"""Lease-mode authority state: one row per key (its window's budget) and one per node
holding a grant in that window. Grants of a key belong to the key's current window; when
the window moves on they are deleted with it."""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Table, Text
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
