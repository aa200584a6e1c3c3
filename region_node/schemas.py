"""Pydantic models for the OpenAPI document only: the check path validates by hand
(checker.py) to the same shape, and these models must stay in step with it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sync.api_errors import ErrorBody
from sync.identifiers import MAX_IDENTIFIER_BYTES
from sync.policy import DURATION_PATTERN, NAMESPACE_PATTERN


class CheckRequest(BaseModel):
    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    identifier: str = Field(min_length=1, max_length=MAX_IDENTIFIER_BYTES,
                            description=f"Raw identifier (1..{MAX_IDENTIFIER_BYTES} bytes "
                            "UTF-8); hashed on arrival, never stored, logged, published or "
                            "returned.")
    cost: int = Field(default=1, ge=0, description="0..limit (0..burst for a token bucket)")
    limit: int | None = Field(default=None, ge=1, description="Inline policy: limit")
    duration: str | None = Field(default=None, pattern=DURATION_PATTERN)
    algorithm: Literal["fixed_window", "sliding_window", "token_bucket"] | None = None
    burst: int | None = Field(default=None, ge=1)
    mode: Literal["fast", "consistent", "lease"] | None = None
    on_unavailable: Literal["open", "closed"] | None = None
    timeout: str | None = Field(default=None, pattern=DURATION_PATTERN)


class CheckResult(BaseModel):
    allowed: bool
    limit: int
    remaining: int = Field(ge=0)
    reset_at: int = Field(description="Epoch ms when the limit is fully available again")
    retry_after_ms: int | None = Field(description="null when allowed, else > 0")
    mode: Literal["fast", "consistent", "lease"]
    source: Literal["local", "authority", "fallback"]
    shadowed: bool = Field(default=False, description="true when a shadow_mode policy "
                           "admitted a check it would have denied")


class BatchRequest(BaseModel):
    checks: list[CheckRequest] = Field(min_length=1, max_length=1000)


class BatchResponse(BaseModel):
    results: list[CheckResult | ErrorBody]


class Readiness(BaseModel):
    ready: bool
    sync: Literal["ok", "degraded", "standalone"]
    reason: str
    region: str
    node_id: str
