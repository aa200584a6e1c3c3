"""Lease-mode wire messages and policy rules: round trips, validation, refusals."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.errors import InvalidField, MalformedMessage, UnsupportedVersion
from sync.messages import (
    STATE_VERSION,
    LeaseGrant,
    LeaseRequest,
    decode_lease_grant,
    decode_lease_request,
    encode_lease_grant,
    encode_lease_request,
)
from sync.policy import build_policy

KEY = "0123456789abcdef0123456789abcdef"
MONTHLY = build_policy(limit=100, duration="month", algorithm="fixed_window", mode="lease",
                       on_unavailable="closed", timeout="2s")
REQUEST = LeaseRequest("acquire", "plans", KEY, MONTHLY, "eu.host.1", "eu",
                       window_start=1_796_083_200_000, used=7, seq=42, want=1, demand=30)


def test_requests_and_grants_round_trip() -> None:
    assert decode_lease_request(encode_lease_request(REQUEST)) == REQUEST
    grant = LeaseGrant(12, 1_796_083_200_000, 1_798_761_600_000, 10_000, 88)
    assert decode_lease_grant(encode_lease_grant(grant)) == grant
    assert decode_lease_grant(encode_lease_grant(None)) is None


def _raw(**changes: Any) -> bytes:
    obj = msgpack.unpackb(encode_lease_request(REQUEST))
    obj.update(changes)
    return bytes(msgpack.packb(obj))


@pytest.mark.parametrize("changes", [
    {"op": "steal"}, {"used": -1}, {"used": 101}, {"want": 101}, {"seq": "1"},
    {"policy": [100, "month", "fixed_window", None, "fast", "closed", "2s"]},
    {"node": ""}, {"window": 2**62}, {"demand": True}, {"t": "decide"},
    # The API's rules, as for usage entries: namespace, key hash shape, counts.
    {"ns": "plans/free"}, {"ns": "n" * 65}, {"ns": ""}, {"key": "raw-api-key"},
    {"key": KEY + "0"}, {"key": "g" * 32}, {"seq": 2**53}, {"demand": 10**12 + 1},
])
def test_a_bad_request_is_malformed(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        decode_lease_request(_raw(**changes))


def test_a_newer_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_lease_request(_raw(v=STATE_VERSION + 1))


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    for decode in (decode_lease_request, decode_lease_grant):
        try:
            decode(data)
        except (MalformedMessage, UnsupportedVersion):
            pass


def test_a_grant_with_an_empty_window_is_malformed() -> None:
    raw = msgpack.unpackb(encode_lease_grant(LeaseGrant(1, 10, 20, 5, 0)))
    raw["end"] = 10
    with pytest.raises(MalformedMessage):
        decode_lease_grant(msgpack.packb(raw))


def test_lease_mode_refuses_sliding_windows_and_takes_fixed_windows_and_buckets() -> None:
    with pytest.raises(InvalidField) as caught:
        build_policy(limit=10, duration="1h", algorithm="sliding_window", mode="lease")
    assert caught.value.field == "algorithm"
    # The default algorithm (sliding_window) is refused the same way.
    with pytest.raises(InvalidField):
        build_policy(limit=10, duration="1h", mode="lease")
    assert build_policy(limit=10, duration="month", algorithm="fixed_window",
                        mode="lease").mode == "lease"
    assert build_policy(limit=10, duration="1h", algorithm="token_bucket", burst=20,
                        mode="lease").mode == "lease"


def test_a_token_bucket_holder_may_have_used_more_than_the_limit() -> None:
    # Its slices belong to no window: over time it spends any number of tokens.
    policy = build_policy(limit=10, duration="1s", algorithm="token_bucket", burst=20,
                          mode="lease")
    request = LeaseRequest("acquire", "plans", "0" * 32, policy, "eu-a~1", "eu",
                           window_start=0, used=1_000_000, seq=3, want=20)
    assert decode_lease_request(encode_lease_request(request)) == request
    raw = msgpack.unpackb(encode_lease_request(request))
    raw["want"] = 21  # above the burst: no check could cost that much
    with pytest.raises(MalformedMessage):
        decode_lease_request(msgpack.packb(raw))
