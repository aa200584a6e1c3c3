"""Node side of consistent mode: ask the authority, or let ``on_unavailable`` decide."""

from __future__ import annotations

import logging
import time

import nats.errors

from region_node.check_result import CheckResult
from region_node.checker import Result
from region_node.counters import CounterStore
from region_node.metrics import NodeMetrics
from sync.clock import Clock
from sync.connection import NatsLink
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import (
    ConsistentRequest,
    decode_consistent_decision,
    encode_consistent_request,
)
from sync.policy import Policy
from sync.subjects import CONSISTENT

log = logging.getLogger("regionlimit.consistent")
UNAVAILABLE = (nats.errors.Error, TimeoutError, MalformedMessage, UnsupportedVersion)
LOG_EVERY_S = 1.0  # one fallback line per second at most, with a count: an outage
                   # must not turn into a log flood


class ConsistentClient:
    def __init__(self, *, link: NatsLink, node_id: str, region: str, store: CounterStore,
                 metrics: NodeMetrics, clock: Clock) -> None:
        self._link = link
        self._node_id = node_id
        self._region = region
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._unlogged = 0
        self._logged_at = 0.0

    async def decide(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                     label: str, protocol: str = "http") -> Result:
        started = time.perf_counter()
        decision = None
        reason = "NATS disconnected"
        nc = self._link.nc
        if nc is not None and nc.is_connected:
            request = ConsistentRequest(namespace, key_hash, cost, policy, self._node_id,
                                        self._region)
            try:
                reply = await nc.request(CONSISTENT, encode_consistent_request(request),
                                         timeout=policy.timeout.ms / 1000)
                decision = decode_consistent_decision(reply.data)
                reason = "authority could not decide"
            except UNAVAILABLE as exc:
                reason = type(exc).__name__
        self._metrics.latency.observe(time.perf_counter() - started)
        if decision is not None:
            self._metrics.count_check(label, decision.allowed, "authority", protocol)
            if not decision.allowed and policy.shadow_mode:
                # The authority counted a denial; the caller goes through all the same.
                return CheckResult(True, policy.limit, 0, decision.reset_at, None,
                                   "consistent", "authority", shadowed=True)
            return CheckResult(decision.allowed, policy.limit, decision.remaining,
                               decision.reset_at, decision.retry_after_ms, "consistent",
                               "authority")
        return self._fallback(namespace, key_hash, policy, cost, label, reason, protocol)

    def _fallback(self, namespace: str, key_hash: str, policy: Policy, cost: int,
                  label: str, reason: str, protocol: str) -> Result:
        allowed = policy.on_unavailable == "open" or policy.shadow_mode
        now = self._clock()
        # Admitted cost is still usage: it goes out with the fast-mode counters, so the
        # ledger bills it even though the authority never saw it.
        self._store.record(namespace, key_hash, policy, cost, allowed, now)
        self._metrics.count_check(label, allowed, "fallback", protocol)
        self._metrics.fallbacks[label] = self._metrics.fallbacks.get(label, 0) + 1
        self._log_fallback(key_hash, label, reason, allowed)
        retry = None if allowed else policy.timeout.ms
        # Shadowed only where the fallback itself would have denied (on_unavailable closed).
        shadowed = policy.shadow_mode and policy.on_unavailable == "closed"
        return CheckResult(allowed, policy.limit, 0, now + policy.timeout.ms, retry,
                           "consistent", "fallback", shadowed=shadowed)

    def _log_fallback(self, key_hash: str, label: str, reason: str, allowed: bool) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("consistent authority unavailable (%s): %s by on_unavailable for "
                        "namespace %s, key %s (%d fallbacks since the last line)", reason,
                        "admitted" if allowed else "denied", label, key_hash, self._unlogged)
            self._unlogged = 0
            self._logged_at = now
