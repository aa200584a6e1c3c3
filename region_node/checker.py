"""One check, from a decoded JSON object to a result: validation, hashing, policy, decision.

Validation is written out by hand: a pydantic model per request costs more than the
whole decision, and the OpenAPI document describes the same shape (see app.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from region_node.counters import CounterStore
from region_node.errors import ApiError, from_invalid_field
from region_node.identifiers import IdentifierHasher
from region_node.metrics import NodeMetrics
from region_node.policies import PolicyResolver
from sync.errors import InvalidField
from sync.policy import Policy

Clock = Callable[[], int]
Result = dict[str, Any]
NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_IDENTIFIER_BYTES = 256
INLINE_FIELDS = ("limit", "duration", "algorithm", "burst", "mode", "on_unavailable",
                 "timeout")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Authority(Protocol):
    """The consistent-mode seam: asks central to decide one check exactly."""

    async def decide(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                     label: str) -> Result: ...


def _field_error(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field)


class Checker:
    def __init__(self, *, store: CounterStore, resolver: PolicyResolver,
                 hasher: IdentifierHasher, metrics: NodeMetrics,
                 clock: Clock = wall_clock_ms, authority: Authority | None = None) -> None:
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self.authority = authority
        self._hash = hasher.hash
        self._metrics = metrics

    def check(self, body: object) -> Result | Awaitable[Result]:
        """Decide a fast-mode check at once; a consistent one returns an awaitable."""
        started = time.perf_counter()
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_body", "a check must be a JSON object")
        namespace = body.get("namespace")
        if namespace.__class__ is not str or not NAMESPACE.fullmatch(namespace):
            raise _field_error("namespace", "namespace must be 1..64 characters of "
                               "A-Z a-z 0-9 _ . : -")
        identifier = body.get("identifier")
        if identifier.__class__ is not str or not identifier or (
                len(identifier) > MAX_IDENTIFIER_BYTES // 4
                and len(identifier.encode()) > MAX_IDENTIFIER_BYTES):
            raise _field_error("identifier", "identifier must be a string of 1..256 bytes")
        cost = body.get("cost", 1)
        if cost.__class__ is not int or cost < 0:
            raise _field_error("cost", "cost must be a non-negative integer")
        key_hash = self._hash(identifier)
        inline = None
        if "limit" in body or "duration" in body:
            inline = tuple(body.get(name) for name in INLINE_FIELDS)
        try:
            policy = self.resolver.resolve(namespace, key_hash, inline)  # type: ignore[arg-type]
        except InvalidField as exc:
            raise from_invalid_field(exc) from None
        if cost > policy.capacity:
            raise _field_error("cost", f"cost must be 0..{policy.capacity}")
        label = self.resolver.label(namespace)
        if policy.mode == "consistent" and self.authority is not None:
            return self.authority.decide(namespace, key_hash, policy, cost, label)
        decision = self.store.check(namespace, key_hash, policy, cost, self.clock())
        self._metrics.count_check(label, decision.allowed, "local")
        self._metrics.latency.observe(time.perf_counter() - started)
        return {"allowed": decision.allowed, "limit": policy.limit,
                "remaining": decision.remaining, "reset_at": decision.reset_at,
                "retry_after_ms": decision.retry_after_ms, "mode": policy.mode,
                "source": "local"}
