"""The answer to one check, built here and serialised by orjson from these fields alone.

Every path that decides a check (local counters, the consistent authority, the
on_unavailable fallback) returns this one type; the HTTP layer writes it out as the
contract's JSON object (field order as declared) and derives the RateLimit-* headers from
it. region_node/schemas.py describes the same shape for the OpenAPI document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CheckResult", "Source"]

Source = Literal["local", "authority", "fallback"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # epoch ms
    retry_after_ms: int | None
    mode: str
    source: Source
    # True when a shadow_mode policy admitted a check it would have denied. Always written
    # out (false otherwise): one fixed shape is cheaper for orjson and for clients.
    shadowed: bool = False
