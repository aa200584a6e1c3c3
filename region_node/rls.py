"""Envoy's rate limit service (envoy.service.ratelimit.v3, ``ShouldRateLimit``) over gRPC.

Each descriptor becomes one regionlimit check (rls_rules.py names it) decided by the same
``Checker`` as ``POST /v1/check``: same key, same counters, same decision, every mode.
All descriptors are validated before any is counted, so a bad request consumes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from region_node.check_result import CheckResult
from region_node.checker import Checker, InvalidCheck, Result
from region_node.ratelimit_fields import ceil_seconds, policy_item
from region_node.rls_rules import MAX_DESCRIPTORS, RlsRules, RuleError
from sync.policy import Policy

log = logging.getLogger("regionlimit.rls")
Response = rls_pb2.RateLimitResponse
Unit = Response.RateLimit.Unit
# A policy whose duration is exactly one unit says so; any other length is UNKNOWN, with
# the real window in the limit's name (Envoy only shows the unit in x-ratelimit headers).
UNITS = {1_000: Unit.SECOND, 60_000: Unit.MINUTE, 3_600_000: Unit.HOUR,
         86_400_000: Unit.DAY, 604_800_000: Unit.WEEK}
MAX_UINT32 = 2**32 - 1  # the answer's counts are uint32; a limit may reach 10**12
STATUS_OF_HTTP = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND}


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, checker: Checker, rules: RlsRules, *, node_token: str | None = None,
                 ietf_ratelimit_fields: bool = True) -> None:
        self._checker = checker
        self._rules = rules
        self._token = f"Bearer {node_token}" if node_token else None
        self._ietf = ietf_ratelimit_fields

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext[Any, Any]
                              ) -> rls_pb2.RateLimitResponse:
        if self._token is not None and not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (authorization metadata)")
        try:
            names, bodies = self._checks(request)
        except RuleError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        try:
            policies, outcomes = self._checker.check_all(bodies, "grpc")
        except InvalidCheck as exc:
            error = exc.error
            field = "hits_addend" if error.field == "cost" else error.field
            await context.abort(
                STATUS_OF_HTTP.get(error.status, grpc.StatusCode.INVALID_ARGUMENT),
                f"descriptors[{exc.index}] (domain {request.domain!r}, namespace "
                f"{names[exc.index]!r}): {field}: {error.message}")
        pending: dict[int, Awaitable[Result]] = {
            i: outcome for i, outcome in enumerate(outcomes)
            if not isinstance(outcome, CheckResult)}
        if pending:
            try:
                done = await asyncio.wait_for(asyncio.gather(*pending.values()),
                                              context.time_remaining())
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the deadline passed before the consistent-mode "
                                    "authority answered")
            for i, result in zip(pending, done, strict=True):
                outcomes[i] = result
        results: list[Result] = outcomes  # type: ignore[assignment]  # all answered now
        return self._response(list(zip(names, policies, strict=True)), results)

    def _authorized(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        assert self._token is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                return hmac.compare_digest(value.encode(), self._token.encode())
        return False

    def _checks(self, request: rls_pb2.RateLimitRequest
                ) -> tuple[list[str], list[dict[str, Any]]]:
        """Every descriptor as a check body for the Checker, and its namespace."""
        if not request.domain:
            raise RuleError("domain", "domain must not be empty")
        if not request.descriptors:
            raise RuleError("descriptors", "descriptors must hold at least one descriptor")
        if len(request.descriptors) > MAX_DESCRIPTORS:
            raise RuleError("descriptors", f"at most {MAX_DESCRIPTORS} descriptors per request")
        # hits_addend 0 means 1 (Envoy's rule); a descriptor's own hits_addend wins.
        default_cost = request.hits_addend or 1
        names, bodies = [], []
        for i, descriptor in enumerate(request.descriptors):
            entries = [(entry.key, entry.value) for entry in descriptor.entries]
            namespace, identifier = self._rules.map_descriptor(request.domain, entries,
                                                               f"descriptors[{i}]")
            cost = (descriptor.hits_addend.value if descriptor.HasField("hits_addend")
                    else default_cost)
            names.append(namespace)
            bodies.append({"namespace": namespace, "identifier": identifier, "cost": cost})
        return names, bodies

    def _response(self, checks: list[tuple[str, Policy]], results: list[Result]
                  ) -> rls_pb2.RateLimitResponse:
        now = self._checker.clock()
        response = Response(overall_code=Response.Code.OK)
        tightest: Result | None = None
        shadowed = False
        for (namespace, policy), result in zip(checks, results, strict=True):
            allowed = result.allowed
            if not allowed:
                response.overall_code = Response.Code.OVER_LIMIT
            shadowed = shadowed or result.shadowed
            reset_in = max(0, result.reset_at - now)
            response.statuses.append(Response.DescriptorStatus(
                code=Response.Code.OK if allowed else Response.Code.OVER_LIMIT,
                current_limit=_limit(namespace, policy),
                limit_remaining=min(result.remaining, MAX_UINT32),
                duration_until_reset=duration_pb2.Duration(
                    seconds=reset_in // 1000, nanos=reset_in % 1000 * 1_000_000)))
            if tightest is None or result.remaining < tightest.remaining:
                tightest = result
        assert tightest is not None
        headers = [("ratelimit-limit", str(tightest.limit)),
                   ("ratelimit-remaining", str(tightest.remaining)),
                   ("ratelimit-reset", str(ceil_seconds(tightest.reset_at - now)))]
        if self._ietf:
            headers.append(("ratelimit-policy", ", ".join(
                policy_item(namespace, policy).decode() for namespace, policy in checks)))
            headers.append(("ratelimit", ", ".join(
                f'"{namespace}";r={result.remaining};'
                f't={ceil_seconds(result.reset_at - now)}'
                for (namespace, _), result in zip(checks, results, strict=True))))
        response.response_headers_to_add.extend(
            base_pb2.HeaderValue(key=key, value=value) for key, value in headers)
        if shadowed:
            # No status code says "would have been denied"; Envoy keeps this in the
            # request's dynamic metadata, where access logs can show it.
            response.dynamic_metadata.update({"shadowed": True})
        return response


def _limit(namespace: str, policy: Policy) -> Any:  # a RateLimitResponse.RateLimit
    if policy.duration.is_month:
        unit = Unit.MONTH
    else:
        unit = UNITS.get(policy.duration.ms, Unit.UNKNOWN)
    return Response.RateLimit(name=f"{namespace} {policy.limit}/{policy.duration.text}",
                              requests_per_unit=min(policy.limit, MAX_UINT32), unit=unit)


async def start_rls_server(service: RateLimitService, *, host: str, port: int,
                           max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Serve ``service`` on host:port (0: any free port); returns the server and its port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    log.info("Envoy rate limit service (gRPC) listening on %s:%d", host, bound)
    return server, bound
