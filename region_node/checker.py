"""One check, from a decoded JSON object to a result: validation, hashing, policy, decision.

Validation is written out by hand: a pydantic model per request costs more than the
whole decision, and the OpenAPI document describes the same shape (see app.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Protocol

from region_node.check_result import CheckResult
from region_node.counters import CounterStore
from region_node.metrics import NodeMetrics
from region_node.policies import InlineFields, PolicyResolver
from sync.api_errors import ApiError, from_invalid_field
from sync.clock import Clock, wall_clock_ms
from sync.errors import InvalidField
from sync.identifiers import IDENTIFIER_RULE, IdentifierHasher, is_identifier
from sync.policy import NAMESPACE, Policy

Result = CheckResult  # the name the HTTP layer and consistent mode use
_VALID_CACHE_MAX = 10_000  # names that passed validation (bounded: inline names are free)
INLINE_FIELDS = ("limit", "duration", "algorithm", "burst", "mode", "on_unavailable",
                 "timeout")


class Authority(Protocol):
    """The consistent-mode seam: asks central to decide one check exactly."""

    async def decide(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                     label: str, protocol: str = "http") -> Result: ...


class Leases(Protocol):
    """The lease-mode seam: answers from this node's slice, or waits for a grant."""

    def check(self, namespace: str, key_hash: str, policy: Policy, cost: int, label: str
              ) -> Result | Awaitable[Result]: ...


def _field_error(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field)


class InvalidCheck(Exception):
    """Check number ``index`` of a group is invalid: ``error`` says why."""

    def __init__(self, index: int, error: ApiError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class Checker:
    def __init__(self, *, store: CounterStore, resolver: PolicyResolver,
                 hasher: IdentifierHasher, metrics: NodeMetrics,
                 clock: Clock = wall_clock_ms, authority: Authority | None = None,
                 leases: Leases | None = None) -> None:
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self.authority = authority
        self.leases = leases
        self._hash = hasher.hash
        self._metrics = metrics
        self._valid_namespaces: set[str] = set()

    def check(self, body: Any, protocol: str = "http") -> Result | Awaitable[Result]:
        """Decide a fast-mode check at once; a consistent one returns an awaitable.

        Every protocol (the JSON API, Envoy's RLS over gRPC) comes through here, so the same
        key gets the same decision whichever way it is asked."""
        started = time.perf_counter()
        outcome = self._decide(body, self.clock(), protocol)
        if outcome.__class__ is CheckResult:
            self._metrics.latency.observe(time.perf_counter() - started)
        return outcome

    def check_with_policy(self, body: Any, protocol: str = "http"
                          ) -> tuple[Policy, Result | Awaitable[Result]]:
        """``check``, also naming the policy that decided it (for RateLimit fields and the
        RLS answer's current_limit, which describe the window)."""
        started = time.perf_counter()
        resolved = self.resolve(body)
        outcome = self.decide_resolved(*resolved, self.clock(), protocol)
        if outcome.__class__ is CheckResult:
            self._metrics.latency.observe(time.perf_counter() - started)
        return resolved[2], outcome

    def check_all(self, bodies: list[Any], protocol: str
                  ) -> tuple[list[Policy], list[Result | Awaitable[Result]]]:
        """Validate every check, then decide them all at one instant: an invalid one raises
        InvalidCheck before anything is counted (an RLS request is all or nothing)."""
        started = time.perf_counter()
        resolved = []
        for index, body in enumerate(bodies):
            try:
                resolved.append(self.resolve(body))
            except ApiError as exc:
                raise InvalidCheck(index, exc) from None
        now = self.clock()
        outcomes = [self.decide_resolved(*check, now, protocol) for check in resolved]
        self._metrics.latency.observe((time.perf_counter() - started) / len(bodies),
                                      len(bodies))
        return [check[2] for check in resolved], outcomes

    def check_batch(self, bodies: list[Any]) -> list[Result | Awaitable[Result] | ApiError]:
        """Decide every check of a batch at one instant; an invalid one yields its error."""
        started = time.perf_counter()
        now = self.clock()
        decide = self._decide
        outcomes: list[Result | Awaitable[Result] | ApiError] = []
        for body in bodies:
            try:
                outcomes.append(decide(body, now))
            except ApiError as exc:
                outcomes.append(exc)
        # One observation per check, at the batch's mean cost: a clock read per check
        # would cost more than the histogram is worth.
        self._metrics.latency.observe((time.perf_counter() - started) / len(bodies),
                                      len(bodies))
        return outcomes

    def _decide(self, body: Any, now: int, protocol: str = "http"
                ) -> Result | Awaitable[Result]:
        return self.decide_resolved(*self.resolve(body), now, protocol)

    def resolve(self, body: Any) -> tuple[str, str, Policy, int, str]:
        """Validate a check: (namespace, identifier hash, policy, cost, metrics label)."""
        # ``body`` is whatever the JSON held; every field is checked before use.
        if body.__class__ is not dict:
            raise ApiError(422, "invalid_body", "a check must be a JSON object")
        namespace = body.get("namespace")
        if type(namespace) is not str or namespace not in self._valid_namespaces:
            namespace = self._validate_namespace(namespace)
        identifier = body.get("identifier")
        if not is_identifier(identifier):
            raise _field_error("identifier", IDENTIFIER_RULE)
        cost = body.get("cost", 1)
        if cost.__class__ is not int or cost < 0:
            raise _field_error("cost", "cost must be a non-negative integer")
        key_hash = self._hash(identifier)
        inline: InlineFields | None = None
        if "limit" in body or "duration" in body:
            inline = tuple(map(body.get, INLINE_FIELDS))  # type: ignore[assignment]
        try:
            # The precedence (configuration, then override, then inline) is the resolver's.
            policy = self.resolver.resolve(namespace, key_hash, inline)
        except InvalidField as exc:
            raise from_invalid_field(exc) from None
        label = self.resolver.label(namespace)
        if cost > policy.capacity:
            raise _field_error("cost", f"cost must be 0..{policy.capacity}")
        return namespace, key_hash, policy, cost, label

    def decide_resolved(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                        label: str, now: int, protocol: str) -> Result | Awaitable[Result]:
        """Decide a check ``resolve`` validated; counts it under ``protocol`` (http, grpc)."""
        if policy.mode == "consistent" and self.authority is not None:
            return self.authority.decide(namespace, key_hash, policy, cost, label, protocol)
        if policy.mode == "lease" and self.leases is not None:
            return self.leases.check(namespace, key_hash, policy, cost, label)
        decision = self.store.check(namespace, key_hash, policy, cost, now)
        self._metrics.count_check(label, decision.allowed, "local", protocol)
        if not decision.allowed and policy.shadow_mode:
            return self._shadowed(namespace, key_hash, policy, cost, decision.reset_at)
        return CheckResult(decision.allowed, policy.limit, decision.remaining,
                           decision.reset_at, decision.retry_after_ms, policy.mode, "local")

    def _shadowed(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                  reset_at: int) -> Result:
        """A denial a shadow-mode policy lets through: the cost counts as admitted usage."""
        self.store.admit_denied(namespace, key_hash, cost)
        return CheckResult(True, policy.limit, 0, reset_at, None, policy.mode, "local",
                           shadowed=True)

    def _validate_namespace(self, namespace: Any) -> str:
        if type(namespace) is not str or not NAMESPACE.fullmatch(namespace):
            raise _field_error("namespace", "namespace must be 1..64 characters of "
                               "A-Z a-z 0-9 _ . : -")
        if len(self._valid_namespaces) >= _VALID_CACHE_MAX:
            self._valid_namespaces.clear()
        self._valid_namespaces.add(namespace)
        return namespace
