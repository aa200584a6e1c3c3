"""The msgpack contract (sync/messages.py): round trips, versions, validation, fuzzing.

Pure: no I/O. Every decoder must either return a value or raise MalformedMessage /
UnsupportedVersion, whatever the bytes; a consumer relies on that to never crash.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.algorithms.base import MAX_COUNT
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import (
    MAX_TIMESTAMP_MS,
    STATE_VERSION,
    USAGE_VERSION,
    ConfigUpdate,
    ConsistentDecision,
    ConsistentRequest,
    KeyTotal,
    NamespacePolicies,
    SnapshotPage,
    SnapshotRequest,
    TotalsUpdate,
    UsageBatch,
    UsageEntry,
    decode_config,
    decode_consistent_decision,
    decode_consistent_request,
    decode_snapshot_page,
    decode_snapshot_request,
    decode_totals,
    decode_usage,
    encode_config,
    encode_consistent_decision,
    encode_consistent_request,
    encode_snapshot_page,
    encode_snapshot_request,
    encode_totals,
    encode_usage,
    encode_usage_v1,
)
from sync.policy import MAX_LIMIT, Policy, build_policy

PROPERTY = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

KEY = "0123456789abcdef0123456789abcdef"
FIXED = build_policy(limit=10, duration="1m", algorithm="fixed_window")
BUCKET = build_policy(limit=5, duration="1s", algorithm="token_bucket", burst=7)
MONTHLY = build_policy(limit=100, duration="month", algorithm="fixed_window")
FULL = build_policy(limit=3, duration="1h", algorithm="sliding_window", mode="consistent",
                    on_unavailable="closed", timeout="2s")
def decode_usage_refusing(data: bytes) -> UsageBatch:
    """decode_usage, where a refused entry counts as the message's fault: the field
    tests below ask whether each bad field is caught, at the envelope or per entry."""
    batch = decode_usage(data)
    if batch.invalid_entries:
        raise MalformedMessage(batch.invalid_reason)
    return batch


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "usage": decode_usage_refusing,
    "totals": decode_totals,
    "snapshot_req": decode_snapshot_request,
    "snapshot": decode_snapshot_page,
    "config": decode_config,
    "decide": decode_consistent_request,
    "decision": decode_consistent_decision,
}
ALLOWED = (MalformedMessage, UnsupportedVersion)

# --- strategies ------------------------------------------------------------------------

namespaces = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
key_hashes = st.text("0123456789abcdef", min_size=32, max_size=32)
counts = st.one_of(st.integers(0, 1000), st.integers(0, MAX_COUNT))
times = st.one_of(st.integers(0, 1000), st.integers(0, MAX_TIMESTAMP_MS))
ids = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
              max_size=40)
BASE_DURATIONS = ("1ms", "250ms", "1s", "90s", "1m", "15m", "1h", "1d", "7d", "366d")
durations = st.one_of(
    st.sampled_from(BASE_DURATIONS),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 999), st.sampled_from(["ms", "s", "m"])),
)


@st.composite
def policies(draw: st.DrawFn, *, full: bool = False) -> Policy:
    """Valid policies; ``full`` also draws mode, on_unavailable and timeout (config only:
    usage and totals carry limit, duration, algorithm and burst)."""
    algorithm = draw(st.sampled_from(["fixed_window", "sliding_window", "token_bucket"]))
    if algorithm == "fixed_window" and draw(st.booleans()):
        duration = "month"
    else:
        duration = draw(durations)
    burst = None
    if algorithm == "token_bucket" and draw(st.booleans()):
        burst = draw(st.integers(1, MAX_LIMIT))
    extra: dict[str, Any] = {}
    if full:
        extra = {"mode": draw(st.sampled_from(["fast", "consistent"])),
                 "on_unavailable": draw(st.sampled_from(["open", "closed"])),
                 "timeout": draw(st.sampled_from(["1ms", "250ms", "2s", "60s", "1m"])),
                 "shadow_mode": draw(st.booleans())}
    return build_policy(limit=draw(st.integers(1, MAX_LIMIT)), duration=duration,
                        algorithm=algorithm, burst=burst, **extra)


usage_entries = st.builds(UsageEntry, namespace=namespaces, key_hash=key_hashes,
                          window_start=times, admitted=counts, denied=counts,
                          policy=policies())
usage_batches = st.builds(UsageBatch, node_id=ids, region=st.from_regex(r"[a-z0-9-]{1,64}",
                                                                        fullmatch=True),
                          flushed_at=times, entries=st.lists(usage_entries, max_size=8))
key_totals = st.builds(KeyTotal, namespace=namespaces, key_hash=key_hashes,
                       window_start=times, total=counts,
                       components=st.dictionaries(ids, counts, max_size=4),
                       blocked_until=times, policy=policies(), as_of=times)
configs = st.builds(
    ConfigUpdate, version=counts,
    namespaces=st.dictionaries(namespaces, st.builds(
        NamespacePolicies, policy=policies(full=True),
        overrides=st.dictionaries(key_hashes, policies(full=True), max_size=3)), max_size=4))


@st.composite
def consistent_requests(draw: st.DrawFn) -> ConsistentRequest:
    policy = draw(policies(full=True))
    return ConsistentRequest(draw(namespaces), draw(key_hashes),
                             draw(st.integers(0, policy.capacity)), policy, draw(ids),
                             draw(st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True)))


decisions = st.none() | st.builds(ConsistentDecision, allowed=st.booleans(), remaining=counts,
                                  reset_at=times, retry_after_ms=st.none() | counts)
snapshot_pages = st.builds(SnapshotPage, totals=st.lists(key_totals, max_size=5),
                           next_cursor=st.none() | counts, config=st.none() | configs)

msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
              st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
              st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1),
                        st.integers(0, 999_999_999))),
    lambda children: st.one_of(st.lists(children, max_size=6),
                               st.dictionaries(st.text(max_size=8), children, max_size=6)),
    max_leaves=30)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def entry(**changes: Any) -> UsageEntry:
    fields: dict[str, Any] = {"namespace": "api.v1:pro-key_x", "key_hash": KEY,
                              "window_start": 1_717_200_000_000, "admitted": 7, "denied": 2,
                              "policy": FIXED}
    fields.update(changes)
    return UsageEntry(**fields)


def sample_batch() -> UsageBatch:
    return UsageBatch("eu-host-1-boot", "eu", 1_717_200_012_345, [
        entry(), entry(key_hash="f" * 32, policy=BUCKET, admitted=0, denied=0),
        entry(namespace="m", policy=MONTHLY, window_start=1_717_200_000_000), entry(admitted=9)])


def sample_total() -> KeyTotal:
    return KeyTotal("ns", KEY, 1_717_200_000_000, 12, {"a": 5, "b": 7}, 1_717_200_060_000,
                    FIXED, 1_717_200_001_000)


def sample_config() -> ConfigUpdate:
    return ConfigUpdate(4, {"login": NamespacePolicies(FULL, {KEY: FIXED}),
                            "free": NamespacePolicies(MONTHLY, {})})


def sample_messages() -> dict[str, bytes]:
    return {
        "usage": encode_usage(sample_batch()),
        "usage_v1": encode_usage_v1(sample_batch()),
        "totals": encode_totals(TotalsUpdate(1_717_200_000_500, [sample_total()])),
        "snapshot_req": encode_snapshot_request(SnapshotRequest("node-1", 3)),
        "snapshot": encode_snapshot_page(SnapshotPage([sample_total()], 7, sample_config())),
        "config": encode_config(sample_config()),
        "decide": encode_consistent_request(
            ConsistentRequest("login", KEY, 1, FULL, "eu-host-1-boot", "eu")),
        "decision": encode_consistent_decision(
            ConsistentDecision(False, 0, 1_717_200_060_000, 59_500)),
    }


def decoder_for(name: str) -> Callable[[bytes], Any]:
    return DECODERS["usage" if name == "usage_v1" else name]


def decodes_or_rejects(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decode(data)
    except ALLOWED:
        pass


# --- round trips -----------------------------------------------------------------------


@PROPERTY
@given(usage_batches)
def test_usage_round_trip(batch: UsageBatch) -> None:
    assert decode_usage(encode_usage(batch)) == batch


@PROPERTY
@given(usage_batches)
def test_usage_v1_decodes_like_v2(batch: UsageBatch) -> None:
    v1 = encode_usage_v1(batch)
    assert unpack(v1)["v"] == 1
    # A version-1 node predates addressed totals: central must keep the shared subject.
    assert decode_usage(v1) == replace(decode_usage(encode_usage(batch)), addressed=False)
    assert decode_usage(encode_usage(batch)) == batch


def test_a_previous_release_v2_batch_is_not_addressed_and_a_bad_mark_is_malformed() -> None:
    raw = unpack(encode_usage(sample_batch()))
    assert raw["addr"] is True
    del raw["addr"]
    assert decode_usage(pack(raw)) == replace(sample_batch(), addressed=False)
    raw["addr"] = 1
    with pytest.raises(MalformedMessage, match="addressed"):
        decode_usage(pack(raw))


def test_usage_v2_deduplicates_policies() -> None:
    raw = unpack(encode_usage(sample_batch()))
    assert raw["v"] == USAGE_VERSION == 2
    assert len(raw["policies"]) == 3
    assert [row[5] for row in raw["entries"]] == [0, 1, 2, 0]


def test_usage_carries_only_the_limit_fields_of_a_policy() -> None:
    batch = UsageBatch("n", "eu", 1, [entry(policy=FULL)])
    decoded = decode_usage(encode_usage(batch)).entries[0].policy
    assert (decoded.limit, decoded.duration, decoded.algorithm, decoded.burst) == (
        FULL.limit, FULL.duration, FULL.algorithm, FULL.burst)


@PROPERTY
@given(st.builds(TotalsUpdate, sent_at=times, totals=st.lists(key_totals, max_size=6)))
def test_totals_round_trip(update: TotalsUpdate) -> None:
    assert decode_totals(encode_totals(update)) == update


@PROPERTY
@given(st.builds(SnapshotRequest, node_id=ids, cursor=counts))
def test_snapshot_request_round_trip(request: SnapshotRequest) -> None:
    assert decode_snapshot_request(encode_snapshot_request(request)) == request


@PROPERTY
@given(snapshot_pages)
def test_snapshot_page_round_trip(page: SnapshotPage) -> None:
    assert decode_snapshot_page(encode_snapshot_page(page)) == page


@PROPERTY
@given(configs)
def test_config_round_trip(config: ConfigUpdate) -> None:
    assert decode_config(encode_config(config)) == config


def test_a_config_policy_without_shadow_mode_never_shadows() -> None:
    """A central from before shadow_mode sends seven policy fields; nodes read them."""
    shadowed = build_policy(limit=5, duration="1h", shadow_mode=True)
    data = msgpack.unpackb(encode_config(ConfigUpdate(3, {"api": NamespacePolicies(
        shadowed, {})})))
    assert data["namespaces"]["api"][0][7] is True
    data["namespaces"]["api"][0] = data["namespaces"]["api"][0][:7]
    decoded = decode_config(msgpack.packb(data))
    assert decoded.namespaces["api"].policy == build_policy(limit=5, duration="1h")
    data["namespaces"]["api"][0] += ["yes"]
    with pytest.raises(MalformedMessage, match="shadow_mode"):
        decode_config(msgpack.packb(data))


@PROPERTY
@given(consistent_requests())
def test_consistent_request_round_trip(request: ConsistentRequest) -> None:
    assert decode_consistent_request(encode_consistent_request(request)) == request


@PROPERTY
@given(decisions)
def test_consistent_decision_round_trip(decision: ConsistentDecision | None) -> None:
    assert decode_consistent_decision(encode_consistent_decision(decision)) == decision


def test_fixed_round_trips() -> None:
    assert decode_usage(encode_usage(sample_batch())) == sample_batch()
    assert decode_config(encode_config(sample_config())) == sample_config()
    page = SnapshotPage([], None, None)
    assert decode_snapshot_page(encode_snapshot_page(page)) == page


# --- versions --------------------------------------------------------------------------


@given(version=st.integers(USAGE_VERSION + 1, 2**64 - 1), tail=msgpack_values)
@settings(max_examples=60, deadline=None)
def test_newer_usage_version_is_unsupported(version: int, tail: Any) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode_usage(pack({"v": version, "t": "usage", "entries": tail}))
    assert info.value.version == version
    assert info.value.newest == USAGE_VERSION


def test_newer_usage_version_is_not_malformed() -> None:
    raw = unpack(encode_usage(sample_batch()))
    raw["v"] = USAGE_VERSION + 1
    with pytest.raises(UnsupportedVersion):
        decode_usage(pack(raw))
    # UnsupportedVersion must not be a MalformedMessage: consumers ack malformed ones.
    assert not issubclass(UnsupportedVersion, MalformedMessage)


@pytest.mark.parametrize("name", ["totals", "snapshot_req", "snapshot", "config", "decide",
                                  "decision"])
def test_newer_state_version_is_unsupported(name: str) -> None:
    raw = unpack(sample_messages()[name])
    raw["v"] = STATE_VERSION + 1
    with pytest.raises(UnsupportedVersion):
        DECODERS[name](pack(raw))


@pytest.mark.parametrize("version", [None, 0, -1, True, False, "2", 1.0, [2]])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_missing_or_bad_version_is_malformed(name: str, version: Any) -> None:
    raw = unpack(sample_messages()[name])
    if version is None:
        del raw["v"]
    else:
        raw["v"] = version
    with pytest.raises(MalformedMessage):
        DECODERS[name](pack(raw))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_wrong_message_kind_is_malformed(name: str) -> None:
    for other, data in sample_messages().items():
        if decoder_for(other) is DECODERS[name]:
            continue
        newest = USAGE_VERSION if name == "usage" else STATE_VERSION
        # The version is checked first: a message newer than this decoder knows waits.
        expected = UnsupportedVersion if unpack(data)["v"] > newest else MalformedMessage
        with pytest.raises(expected):
            DECODERS[name](data)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [[1, 2], 5, "usage", None, b"\x01", 1.5, True, []])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_non_map_payload_is_malformed(name: str, payload: Any) -> None:
    with pytest.raises(MalformedMessage):
        DECODERS[name](pack(payload))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81\x01", b"\x92\x01", b"\xd6\xff\x00",
                                  b"\x81\xa1v", b"\x81\x01\x02", b"\xa2\xff\xfe"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_undecodable_bytes_are_malformed(name: str, data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        DECODERS[name](data)


BAD_STR = [None, 5, b"bytes", "", ["x"], {"a": 1}, True]
BAD_COUNT = [None, -1, "5", 1.5, True, False, [], {}, b"1"]
BAD_POLICY_FIELDS = [
    [0, "1m", "fixed_window", None],  # limit 0
    [MAX_LIMIT + 1, "1m", "fixed_window", None],
    [True, "1m", "fixed_window", None],
    ["10", "1m", "fixed_window", None],
    [10, "1x", "fixed_window", None],
    [10, "0s", "fixed_window", None],
    [10, "367d", "fixed_window", None],
    [10, 60, "fixed_window", None],
    [10, "month", "sliding_window", None],
    [10, "month", "token_bucket", None],
    [10, "1m", "leaky_bucket", None],
    [10, "1m", 1, None],
    [10, "1m", "fixed_window", 5],  # burst without a token bucket
    [10, "1s", "token_bucket", 0],
    [10, "1s", "token_bucket", "5"],
    [10, "1m", "fixed_window"],
    [10, "1m", "fixed_window", None, None],
    None, "fixed_window", 10, {"limit": 10},
]

# (message, path to the field, bad values). A path step is a key or an index.
FIELD_CASES: list[tuple[str, tuple[Any, ...], list[Any]]] = [
    ("usage", ("node",), [*BAD_STR, "n" * 257]),
    ("usage", ("region",), [*BAD_STR, "r" * 65]),
    ("usage", ("sent",), BAD_COUNT),
    ("usage", ("policies",), [None, 5, "x", {"0": [10, "1m", "fixed_window", None]}]),
    ("usage", ("policies", 0), BAD_POLICY_FIELDS),
    ("usage", ("entries",), [None, 5, "x", {"0": []}]),
    ("usage", ("entries", 0), [None, 5, "x", [], ["ns", KEY, 0, 1, 1], [*"abcdefg"]]),
    ("usage", ("entries", 0, 0), [*BAD_STR, "n" * 65]),
    ("usage", ("entries", 0, 1), [*BAD_STR, "k" * 129]),
    ("usage", ("entries", 0, 2), BAD_COUNT),
    ("usage", ("entries", 0, 3), BAD_COUNT),
    ("usage", ("entries", 0, 4), BAD_COUNT),
    ("usage", ("entries", 0, 5), [*BAD_COUNT, 3, 4, 2**40]),  # 3 policies in the table
    ("usage_v1", ("node",), BAD_STR),
    ("usage_v1", ("entries", 0, 3), BAD_COUNT),
    ("usage_v1", ("entries", 0, 5), [None, 0, [10, "1m", "fixed_window", None], "x"]),
    ("usage_v1", ("entries", 0, 5, "limit"), [None, 0, -3, "10", True, 1.0]),
    ("usage_v1", ("entries", 0, 5, "duration"), [None, "1y", 60, ""]),
    ("usage_v1", ("entries", 0, 5, "algorithm"), ["gcra", 3]),
    ("usage_v1", ("entries", 0, 5, "burst"), [3, "3"]),
    ("totals", ("sent",), BAD_COUNT),
    ("totals", ("totals",), [None, 5, "x", {"a": 1}]),
    ("totals", ("totals", 0), [None, 5, [], ["ns", KEY, 0, 1, {}, 0, [10, "1m", None, None]]]),
    ("totals", ("totals", 0, 0), [*BAD_STR, "n" * 65]),
    ("totals", ("totals", 0, 1), BAD_STR),
    ("totals", ("totals", 0, 2), BAD_COUNT),
    ("totals", ("totals", 0, 3), BAD_COUNT),
    ("totals", ("totals", 0, 4), [None, 5, "x", [["a", 5]]]),
    ("totals", ("totals", 0, 4, "a"), BAD_COUNT),
    ("totals", ("totals", 0, 5), BAD_COUNT),
    ("totals", ("totals", 0, 6), BAD_POLICY_FIELDS),
    ("totals", ("totals", 0, 7), BAD_COUNT),
    ("snapshot_req", ("node",), [*BAD_STR, "n" * 257]),
    ("snapshot_req", ("cursor",), BAD_COUNT),
    ("snapshot", ("totals",), [None, 5, {"a": 1}]),
    ("snapshot", ("totals", 0, 3), BAD_COUNT),
    ("snapshot", ("next",), [-1, "7", 1.5, True, []]),
    ("snapshot", ("config",), [5, "x", [], {"version": 1}, {"namespaces": []}]),
    ("snapshot", ("config", "version"), BAD_COUNT),
    ("config", ("version",), BAD_COUNT),
    ("config", ("namespaces",), [None, 5, [], "x"]),
    ("config", ("namespaces", "login"), [None, 5, [], [[3, "1h"]], [None, {}, {}]]),
    ("config", ("namespaces", "login", 0), [None, [3, "1h", "sliding_window", None],
                                            [3, "1h", "sliding_window", None, "slow", "open",
                                             "250ms"],
                                            [3, "1h", "sliding_window", None, "fast", "maybe",
                                             "250ms"],
                                            [3, "1h", "sliding_window", None, "fast", "open",
                                             "61s"],
                                            [3, "1h", "sliding_window", None, "fast", "open",
                                             "month"],
                                            [0, "1h", "sliding_window", None, "fast", "open",
                                             "250ms"]]),
    ("config", ("namespaces", "login", 1), [None, 5, [], "x"]),
    ("config", ("namespaces", "login", 1, KEY), [None, 5, [10, "1m"]]),
    ("decide", ("ns",), [*BAD_STR, "n" * 65]),
    ("decide", ("key",), [*BAD_STR, "k" * 129]),
    ("decide", ("cost",), [*BAD_COUNT, 4, 2**40]),  # FULL's capacity is 3
    ("decide", ("policy",), [None, 5, "x", [3, "1h", "sliding_window", None]]),
    ("decide", ("policy", 0), [0, "3", None, True]),
    ("decide", ("policy", 4), ["slow", 1]),
    ("decide", ("policy", 5), ["maybe", 0]),
    ("decide", ("policy", 6), ["61s", "month", 250, "0ms"]),
    ("decide", ("node",), [*BAD_STR, "n" * 257]),
    ("decide", ("region",), [*BAD_STR, "r" * 65]),
    ("decision", ("allowed",), [None, 0, 1, "true", [], {}]),
    ("decision", ("remaining",), BAD_COUNT),
    ("decision", ("reset_at",), BAD_COUNT),
    ("decision", ("retry",), [c for c in BAD_COUNT if c is not None]),
]
FIELD_PARAMS = [pytest.param(name, path, value, id=f"{name}-{'.'.join(map(str, path))}-{i}")
                for name, path, values in FIELD_CASES for i, value in enumerate(values)]


def replace_at(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    obj = copy.deepcopy(obj)
    target = obj
    for step in path[:-1]:
        target = target[step]
    assert path[-1] in target if isinstance(target, dict) else path[-1] < len(target)
    target[path[-1]] = value
    return obj


@pytest.mark.parametrize(("name", "path", "value"), FIELD_PARAMS)
def test_bad_field_is_malformed(name: str, path: tuple[Any, ...], value: Any) -> None:
    raw = unpack(sample_messages()[name])
    with pytest.raises(MalformedMessage):
        decoder_for(name)(pack(replace_at(raw, path, value)))


@pytest.mark.parametrize("name", ["usage", "totals", "snapshot"])
def test_bad_namespace_key_in_config_or_components_is_malformed(name: str) -> None:
    raw = unpack(sample_messages()[name])
    if name == "usage":
        raw["entries"][0][0] = "n" * 65
    elif name == "totals":
        raw["totals"][0][4] = {"": 3}
    else:
        raw["config"]["namespaces"]["n" * 65] = raw["config"]["namespaces"].pop("login")
    with pytest.raises(MalformedMessage):
        decoder_for(name)(pack(raw))


@pytest.mark.parametrize("name", sorted(sample_messages()))
def test_missing_field_is_malformed(name: str) -> None:
    raw = unpack(sample_messages()[name])
    optional = {"snapshot": {"next", "config"}, "decision": {"retry"}, "usage": {"addr"}
                }.get(name, set())
    for field in sorted(set(raw) - {"v", "t"} - optional):
        broken = dict(raw)
        del broken[field]
        with pytest.raises(MalformedMessage):
            decoder_for(name)(pack(broken))


def test_negative_counts_are_malformed() -> None:
    for index in (2, 3, 4):
        raw = unpack(encode_usage(sample_batch()))
        raw["entries"][1][index] = -1
        with pytest.raises(MalformedMessage):
            decode_usage_refusing(pack(raw))


def test_policy_index_out_of_range_is_malformed() -> None:
    raw = unpack(encode_usage(sample_batch()))
    raw["entries"][0][5] = len(raw["policies"])
    with pytest.raises(MalformedMessage):
        decode_usage_refusing(pack(raw))
    raw["policies"] = []
    raw["entries"][0][5] = 0
    with pytest.raises(MalformedMessage):
        decode_usage_refusing(pack(raw))


def test_decision_error_flag_means_no_decision() -> None:
    assert decode_consistent_decision(encode_consistent_decision(None)) is None
    raw = unpack(sample_messages()["decision"])
    raw["error"] = False
    assert decode_consistent_decision(pack(raw)) == ConsistentDecision(
        False, 0, 1_717_200_060_000, 59_500)


def test_empty_batch_with_no_policies_decodes() -> None:
    batch = UsageBatch("n", "eu", 5, [])
    assert decode_usage(encode_usage(batch)) == batch
    assert decode_usage(encode_usage_v1(batch)) == replace(batch, addressed=False)


# --- fuzzing ---------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=200))
def test_garbage_bytes_never_raise_other_errors(data: bytes) -> None:
    for decode in DECODERS.values():
        decodes_or_rejects(decode, data)


@FUZZ
@given(value=msgpack_values)
def test_arbitrary_msgpack_never_raises_other_errors(value: Any) -> None:
    data = pack(value)
    for decode in DECODERS.values():
        decodes_or_rejects(decode, data)


@FUZZ
@given(kind=st.sampled_from([*DECODERS, "x"]),
       version=st.sampled_from([1, 2]),
       body=st.dictionaries(st.sampled_from(["node", "region", "sent", "policies", "entries",
                                              "totals", "cursor", "next", "config", "version",
                                              "namespaces", "ns", "key", "cost", "policy",
                                              "allowed", "remaining", "reset_at", "retry",
                                              "error"]), msgpack_values))
def test_well_framed_random_bodies_never_raise_other_errors(
        kind: str, version: int, body: dict[str, Any]) -> None:
    data = pack({"v": version, "t": kind, **body})
    for decode in DECODERS.values():
        decodes_or_rejects(decode, data)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += _paths(value, (*prefix, index))
    return found


@FUZZ
@given(name=st.sampled_from(sorted(sample_messages())), data=st.data())
def test_mutated_valid_messages_never_raise_other_errors(name: str, data: st.DataObject) -> None:
    raw = unpack(sample_messages()[name])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(raw)))
        raw = replace_at(raw, path, data.draw(msgpack_values))
    decodes_or_rejects(decoder_for(name), pack(raw))


@FUZZ
@given(batch=usage_batches, cut=st.integers(0, 400))
def test_truncated_messages_are_malformed(batch: UsageBatch, cut: int) -> None:
    data = encode_usage(batch)
    if cut >= len(data):
        return
    with pytest.raises(MalformedMessage):
        decode_usage(data[:cut])


@pytest.mark.parametrize("field", ["window start", "flush time"])
def test_times_past_year_9999_are_malformed(field: str) -> None:
    policy = build_policy(limit=1, duration="1m", algorithm="fixed_window")
    late = MAX_TIMESTAMP_MS + 1
    batch = UsageBatch("n", "r", late if field == "flush time" else 0,
                       [UsageEntry("ns", "0" * 32, late if field == "window start" else 0, 1,
                                   0, policy)])
    with pytest.raises(MalformedMessage, match=field):
        decode_usage_refusing(encode_usage(batch))


# --- poison fields (issue 10): decodable, but the ledger or the arithmetic can't hold them --

def _usage_with(**changes: Any) -> bytes:
    policy = build_policy(limit=10, duration="1h", algorithm="fixed_window")
    fields: dict[str, Any] = {"namespace": "api", "key_hash": "0" * 32, "window_start": 0,
                              "admitted": 1, "denied": 0, "policy": policy}
    batch_fields: dict[str, Any] = {"node_id": "n1", "region": "eu"}
    for name, value in changes.items():
        (batch_fields if name in batch_fields else fields)[name] = value
    return encode_usage(UsageBatch(batch_fields["node_id"], batch_fields["region"], 0,
                                   [UsageEntry(**fields)]))


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("namespace", "a\x00b", "namespace"),
    ("namespace", "has space", "namespace"),
    ("namespace", "x" * 65, "namespace"),
    ("key_hash", "f" * 31 + "\x00", "key hash"),
    ("key_hash", "K" * 32, "key hash"),
    ("key_hash", "0" * 33, "key hash"),
    ("admitted", 2**63, "admitted"),
    ("denied", 2**63, "denied"),
    ("admitted", MAX_COUNT + 1, "admitted"),
    ("node_id", "n\x00", "node id"),
    ("region", "eu\x00", "region"),
])
def test_usage_fields_outside_the_api_rules_are_malformed(field: str, value: Any,
                                                          reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        decode_usage_refusing(_usage_with(**{field: value}))


def test_the_largest_count_a_node_can_hold_decodes() -> None:
    batch = decode_usage(_usage_with(admitted=MAX_COUNT, denied=MAX_COUNT))
    assert (batch.entries[0].admitted, batch.entries[0].denied) == (MAX_COUNT, MAX_COUNT)


def test_a_bad_entry_is_dropped_alone_and_the_rest_of_its_batch_is_kept() -> None:
    raw = unpack(sample_messages()["usage"])
    good = raw["entries"][0]
    raw["entries"] = [good, [*good[:3], 2**63, *good[4:]], ["a\x00b", *good[1:]],
                      [*good[:5], 99], "not a row", good]
    batch = decode_usage(pack(raw))
    assert batch.invalid_entries == 4
    assert len(batch.entries) == 2
    assert batch.entries[0] == batch.entries[1]
    assert batch.entries[0].admitted == good[3]


def test_a_bad_policy_drops_only_the_entries_that_use_it() -> None:
    raw = unpack(sample_messages()["usage"])
    good = raw["entries"][0]
    raw["policies"].append([0, "1h", "fixed_window", None])  # limit 0: not a policy
    raw["entries"] = [good, [*good[:5], len(raw["policies"]) - 1]]
    batch = decode_usage(pack(raw))
    assert batch.invalid_entries == 1
    assert [e.key_hash for e in batch.entries] == [good[1]]
