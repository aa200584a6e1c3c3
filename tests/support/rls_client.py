"""A real Envoy RLS v3 client (grpcio + the published xds-protos messages) for tests and bench."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

Response = rls_pb2.RateLimitResponse
OK = Response.Code.OK
OVER_LIMIT = Response.Code.OVER_LIMIT


def descriptor(*entries: tuple[str, str], hits_addend: int | None = None) -> Any:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
    if hits_addend is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits_addend))
    return d


def request(domain: str, descriptors: Sequence[Any], hits_addend: int = 0) -> Any:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors),
                                    hits_addend=hits_addend)


def stub(channel: grpc.aio.Channel) -> Any:
    return rls_pb2_grpc.RateLimitServiceStub(channel)


def headers_of(response: Any) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}
