"""Msgpack messages between nodes and central, versioned and validated on decode.

Usage batches are at version 2 (policies deduplicated into a table the entries index);
version 1 (a policy map inside every entry) is still decoded so a node that is one
release behind keeps being counted. A newer version raises UnsupportedVersion: the
consumer leaves it unacked until central is upgraded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from sync.algorithms import ALGORITHMS
from sync.algorithms.base import MAX_COUNT
from sync.errors import InvalidField, MalformedMessage, UnsupportedVersion
from sync.identifiers import KEY_HASH
from sync.partitions import MAX_PARTITIONS
from sync.policy import NAMESPACE, Policy, build_policy

USAGE_VERSION = 2
STATE_VERSION = 1
MAX_MESSAGE_BYTES = 1_000_000  # NATS' default max_payload is 1 MiB
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """A node's cumulative admitted and denied cost for one key in one window."""

    namespace: str
    key_hash: str
    window_start: int
    admitted: int
    denied: int
    policy: Policy


@dataclass(frozen=True, slots=True)
class UsageBatch:
    node_id: str
    region: str
    flushed_at: int
    entries: list[UsageEntry]
    # The sending node listens for totals addressed to it (regionlimit.totals.node.<id>)
    # and on the partition subjects. Absent from a previous release's batches: central
    # then keeps the shared totals subject going for it (central/totals_routing.py).
    addressed: bool = True
    # Entries the decoder refused (bad field): dropped one by one, so one poisoned entry
    # never costs the valid usage that travelled with it.
    invalid_entries: int = 0
    invalid_reason: str = ""  # the first refused entry's, for the log line


@dataclass(frozen=True, slots=True)
class KeyTotal:
    """Central's view of one key-window: global admitted, per-node components, block."""

    namespace: str
    key_hash: str
    window_start: int
    total: int
    components: dict[str, int]
    blocked_until: int
    policy: Policy
    as_of: int = 0  # flush time of the newest batch counted in ``total``


@dataclass(frozen=True, slots=True)
class TotalsUpdate:
    sent_at: int
    totals: list[KeyTotal]


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    node_id: str
    cursor: int = 0
    # At most this many totals in the page (central's page size caps it); None: the
    # page size. Set by central's snapshot proxy to fill one page from several partitions.
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class NamespacePolicies:
    policy: Policy
    overrides: dict[str, Policy]  # identifier hash -> fully resolved policy


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """Central's whole configuration (it is small), stamped with its version."""

    version: int
    namespaces: dict[str, NamespacePolicies]
    # Central's key partition count (sync/partitions.py), so a node publishes each key's
    # usage on its partition's subject. None: a central of an earlier release, which
    # consumes only the per-region subject.
    partitions: int | None = None


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    totals: list[KeyTotal]
    next_cursor: int | None
    config: ConfigUpdate | None = None


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes, kind: str, newest: int) -> tuple[int, dict[str, Any]]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessage(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage("not a map")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedMessage("missing version")
    if version > newest:
        raise UnsupportedVersion(version, newest)
    if obj.get("t") != kind:
        raise MalformedMessage(f"expected a {kind} message")
    return version, obj


def _policy_fields(policy: Policy) -> list[Any]:
    return [policy.limit, policy.duration.text, policy.algorithm, policy.burst]


def _policy_from_fields(fields: Any) -> Policy:
    if not isinstance(fields, list | tuple) or len(fields) != 4:
        raise MalformedMessage("bad policy")
    try:
        return build_policy(limit=fields[0], duration=fields[1], algorithm=fields[2],
                            burst=fields[3])
    except InvalidField as exc:
        raise MalformedMessage(f"bad policy: {exc.message}") from None


def _str(value: Any, what: str, *, max_len: int = 256) -> str:
    # Postgres refuses NUL in text: one such row would fail the whole ledger write.
    if not isinstance(value, str) or not 0 < len(value) <= max_len or "\x00" in value:
        raise MalformedMessage(f"bad {what}")
    return value


def _namespace(value: Any) -> str:
    """The HTTP API's namespace rule (sync/policy.py), so the ledger only sees names a
    client could have sent."""
    if not isinstance(value, str) or NAMESPACE.fullmatch(value) is None:
        raise MalformedMessage("bad namespace")
    return value


def _key_hash(value: Any) -> str:
    """The shape every identifier hash has (sync/identifiers.py)."""
    if not isinstance(value, str) or KEY_HASH.fullmatch(value) is None:
        raise MalformedMessage("bad key hash")
    return value


# datetime's last representable millisecond (9999-12-31): every time on the wire must be
# one, so window arithmetic on calendar months can't overflow.
MAX_TIMESTAMP_MS = 253_402_300_799_999


def _time(value: Any, what: str) -> int:
    moment = _count(value, what)
    if moment > MAX_TIMESTAMP_MS:
        raise MalformedMessage(f"bad {what}")
    return moment


def _count(value: Any, what: str) -> int:
    """A count, cost or time: counters saturate at MAX_COUNT (sync/algorithms/base.py), so
    anything larger was never produced by a node and would overflow the ledger's BIGINT."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < 0
            or value > MAX_COUNT):
        raise MalformedMessage(f"bad {what}")
    return value


# --- usage batches (node -> central, JetStream) -------------------------------------------

def encode_usage(batch: UsageBatch) -> bytes:
    policies: dict[Policy, int] = {}
    rows = []
    for e in batch.entries:
        index = policies.setdefault(e.policy, len(policies))
        rows.append([e.namespace, e.key_hash, e.window_start, e.admitted, e.denied, index])
    return _pack({
        "v": USAGE_VERSION, "t": "usage", "node": batch.node_id, "region": batch.region,
        "sent": batch.flushed_at, "policies": [_policy_fields(p) for p in policies],
        "entries": rows, **({"addr": True} if batch.addressed else {}),
    })


def encode_usage_v1(batch: UsageBatch) -> bytes:
    """The previous wire format; kept so tests can prove central still reads it."""
    rows = [[e.namespace, e.key_hash, e.window_start, e.admitted, e.denied,
             {"limit": e.policy.limit, "duration": e.policy.duration.text,
              "algorithm": e.policy.algorithm, "burst": e.policy.burst}]
            for e in batch.entries]
    return _pack({"v": 1, "t": "usage", "node": batch.node_id, "region": batch.region,
                  "sent": batch.flushed_at, "entries": rows})


def decode_usage(data: bytes) -> UsageBatch:
    version, obj = _unpack(data, "usage", USAGE_VERSION)
    node_id = _str(obj.get("node"), "node id")
    region = _str(obj.get("region"), "region", max_len=64)
    flushed_at = _time(obj.get("sent"), "flush time")
    rows = obj.get("entries")
    if not isinstance(rows, list):
        raise MalformedMessage("bad entries")
    # An optional field of version 2 (a previous central ignores it, so a node of this
    # release is still counted by it).
    addressed = obj.get("addr", False)
    if not isinstance(addressed, bool):
        raise MalformedMessage("bad addressed mark")
    policies: list[Policy | None] = []
    if version >= 2:
        raw_policies = obj.get("policies")
        if not isinstance(raw_policies, list):
            raise MalformedMessage("bad policies")
        policies = [_optional(_policy_from_fields, p) for p in raw_policies]
    entries = []
    reason = ""
    for row in rows:
        try:
            entries.append(_usage_entry(row, version, policies))
        except MalformedMessage as exc:
            reason = reason or exc.reason
    return UsageBatch(node_id, region, flushed_at, entries, addressed=addressed,
                      invalid_entries=len(rows) - len(entries), invalid_reason=reason)


def _optional(decode: Callable[..., T], *args: Any) -> T | None:
    """``decode(*args)``, or None where the value is malformed."""
    try:
        return decode(*args)
    except MalformedMessage:
        return None


def _usage_entry(row: Any, version: int, policies: list[Policy | None]) -> UsageEntry:
    if not isinstance(row, list) or len(row) != 6:
        raise MalformedMessage("bad entry")
    policy: Policy | None
    if version >= 2:
        index = _count(row[5], "policy index")
        policy = policies[index] if index < len(policies) else None
    else:
        p = row[5]
        if not isinstance(p, dict):
            raise MalformedMessage("bad policy")
        policy = _policy_from_fields(
            [p.get("limit"), p.get("duration"), p.get("algorithm"), p.get("burst")])
    if policy is None:
        raise MalformedMessage("bad policy")
    return UsageEntry(
        namespace=_namespace(row[0]),
        key_hash=_key_hash(row[1]),
        window_start=_time(row[2], "window start"),
        admitted=_count(row[3], "admitted"),
        denied=_count(row[4], "denied"),
        policy=policy,
    )


# --- totals and snapshots (central -> nodes, core NATS) -----------------------------------

def _total_row(t: KeyTotal) -> list[Any]:
    return [t.namespace, t.key_hash, t.window_start, t.total, t.components, t.blocked_until,
            _policy_fields(t.policy), t.as_of]


def _total_from_row(row: Any) -> KeyTotal:
    if not isinstance(row, list) or len(row) != 8:
        raise MalformedMessage("bad total")
    components = row[4]
    if not isinstance(components, dict):
        raise MalformedMessage("bad components")
    return KeyTotal(
        namespace=_namespace(row[0]),
        key_hash=_key_hash(row[1]),
        window_start=_time(row[2], "window start"),
        total=_count(row[3], "total"),
        components={_str(k, "node id"): _count(v, "component") for k, v in components.items()},
        blocked_until=_time(row[5], "blocked until"),
        policy=_policy_from_fields(row[6]),
        as_of=_time(row[7], "as of"),
    )


def encode_totals(update: TotalsUpdate) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "totals", "sent": update.sent_at,
                  "totals": [_total_row(t) for t in update.totals]})


def decode_totals(data: bytes) -> TotalsUpdate:
    _, obj = _unpack(data, "totals", STATE_VERSION)
    rows = obj.get("totals")
    if not isinstance(rows, list):
        raise MalformedMessage("bad totals")
    return TotalsUpdate(_time(obj.get("sent"), "sent"), [_total_from_row(r) for r in rows])


def encode_snapshot_request(request: SnapshotRequest) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "snapshot_req", "node": request.node_id,
                  "cursor": request.cursor,
                  **({} if request.limit is None else {"limit": request.limit})})


def decode_snapshot_request(data: bytes) -> SnapshotRequest:
    _, obj = _unpack(data, "snapshot_req", STATE_VERSION)
    limit = obj.get("limit")
    return SnapshotRequest(_str(obj.get("node"), "node id"), _count(obj.get("cursor"), "cursor"),
                           None if limit is None else max(1, _count(limit, "limit")))


def encode_snapshot_page(page: SnapshotPage) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "snapshot", "totals":
                  [_total_row(t) for t in page.totals], "next": page.next_cursor,
                  "config": _config_map(page.config) if page.config else None})


def decode_snapshot_page(data: bytes) -> SnapshotPage:
    _, obj = _unpack(data, "snapshot", STATE_VERSION)
    rows = obj.get("totals")
    if not isinstance(rows, list):
        raise MalformedMessage("bad totals")
    next_cursor = obj.get("next")
    if next_cursor is not None:
        next_cursor = _count(next_cursor, "cursor")
    config = obj.get("config")
    return SnapshotPage([_total_from_row(r) for r in rows], next_cursor,
                        None if config is None else _config_from_map(config))


# --- configuration (central -> nodes, core NATS and snapshots) ----------------------------

def _full_policy_fields(policy: Policy) -> list[Any]:
    return [policy.limit, policy.duration.text, policy.algorithm, policy.burst, policy.mode,
            policy.on_unavailable, policy.timeout.text, policy.shadow_mode]


def _full_policy(fields: Any) -> Policy:
    # 7 fields: a sender from before shadow_mode existed (it never shadows).
    if not isinstance(fields, list) or len(fields) not in (7, 8):
        raise MalformedMessage("bad policy")
    try:
        return build_policy(limit=fields[0], duration=fields[1], algorithm=fields[2],
                            burst=fields[3], mode=fields[4], on_unavailable=fields[5],
                            timeout=fields[6],
                            shadow_mode=fields[7] if len(fields) == 8 else None)
    except InvalidField as exc:
        raise MalformedMessage(f"bad policy: {exc.message}") from None


def _config_map(config: ConfigUpdate) -> dict[str, Any]:
    mapped: dict[str, Any] = {"version": config.version, "namespaces": {
        name: [_full_policy_fields(ns.policy),
               {h: _full_policy_fields(p) for h, p in ns.overrides.items()}]
        for name, ns in config.namespaces.items()}}
    if config.partitions is not None:
        mapped["partitions"] = config.partitions
    return mapped


def _config_from_map(obj: Any) -> ConfigUpdate:
    if not isinstance(obj, dict) or not isinstance(obj.get("namespaces"), dict):
        raise MalformedMessage("bad config")
    namespaces = {}
    for name, value in obj["namespaces"].items():
        if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], dict):
            raise MalformedMessage("bad namespace config")
        namespaces[_namespace(name)] = NamespacePolicies(
            _full_policy(value[0]),
            {_key_hash(h): _full_policy(p)
             for h, p in value[1].items()})
    partitions = obj.get("partitions")
    if partitions is not None and (type(partitions) is not int
                                   or not 1 <= partitions <= MAX_PARTITIONS):
        raise MalformedMessage("bad partitions")
    return ConfigUpdate(_count(obj.get("version"), "config version"), namespaces, partitions)


def encode_config(config: ConfigUpdate) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "config", **_config_map(config)})


def decode_config(data: bytes) -> ConfigUpdate:
    _, obj = _unpack(data, "config", STATE_VERSION)
    return _config_from_map(obj)



# --- consistent mode (node -> authority, request/reply) -----------------------------------

@dataclass(frozen=True, slots=True)
class ConsistentRequest:
    namespace: str
    key_hash: str
    cost: int
    policy: Policy
    node_id: str
    region: str


@dataclass(frozen=True, slots=True)
class ConsistentDecision:
    allowed: bool
    remaining: int
    reset_at: int
    retry_after_ms: int | None


def encode_consistent_request(request: ConsistentRequest) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "decide", "ns": request.namespace,
                  "key": request.key_hash, "cost": request.cost,
                  "policy": _full_policy_fields(request.policy), "node": request.node_id,
                  "region": request.region})


def decode_consistent_request(data: bytes) -> ConsistentRequest:
    _, obj = _unpack(data, "decide", STATE_VERSION)
    policy = _full_policy(obj.get("policy"))
    cost = _count(obj.get("cost"), "cost")
    if cost > policy.capacity:
        raise MalformedMessage("cost above capacity")
    return ConsistentRequest(
        namespace=_namespace(obj.get("ns")),
        key_hash=_key_hash(obj.get("key")), cost=cost, policy=policy,
        node_id=_str(obj.get("node"), "node id"),
        region=_str(obj.get("region"), "region", max_len=64))


def encode_consistent_decision(decision: ConsistentDecision | None) -> bytes:
    """``None`` tells the node the authority could not decide (its fallback applies)."""
    if decision is None:
        return _pack({"v": STATE_VERSION, "t": "decision", "error": True})
    return _pack({"v": STATE_VERSION, "t": "decision", "allowed": decision.allowed,
                  "remaining": decision.remaining, "reset_at": decision.reset_at,
                  "retry": decision.retry_after_ms})


def decode_consistent_decision(data: bytes) -> ConsistentDecision | None:
    _, obj = _unpack(data, "decision", STATE_VERSION)
    if obj.get("error"):
        return None
    allowed = obj.get("allowed")
    if not isinstance(allowed, bool):
        raise MalformedMessage("bad decision")
    retry = obj.get("retry")
    return ConsistentDecision(allowed, _count(obj.get("remaining"), "remaining"),
                              _time(obj.get("reset_at"), "reset_at"),
                              None if retry is None else _count(retry, "retry"))


# --- lease mode (node -> lease authority, request/reply) ----------------------------------

LEASE_OPS = ("acquire", "return")
MAX_DEMAND = 1_000_000_000_000  # cost per second; far above any real rate


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """A node asks for (``acquire``) or gives back (``return``) part of a key's budget.

    ``used`` is what the node admitted from its slices in the window starting at
    ``window_start`` (0 when it holds none); ``want`` the cost it needs now (0 for a
    background refill), or for a return what it keeps of its unused slice; ``demand``
    the cost per second its checks asked for lately.
    """

    op: str
    namespace: str
    key_hash: str
    policy: Policy
    node_id: str
    region: str
    window_start: int
    used: int
    seq: int  # grows with every request of the node: a late, older one is ignored
    want: int = 0
    demand: int = 0


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """The node's new total for the window (not an increment, so a lost reply heals at
    the next request), the window, how long the node may spend it from the moment it sent
    the request, and how much of the budget nobody holds after this grant."""

    granted: int
    window_start: int
    window_end: int
    ttl_ms: int
    free: int


def encode_lease_request(request: LeaseRequest) -> bytes:
    return _pack({"v": STATE_VERSION, "t": "lease", "op": request.op,
                  "ns": request.namespace, "key": request.key_hash,
                  "policy": _full_policy_fields(request.policy), "node": request.node_id,
                  "region": request.region, "window": request.window_start,
                  "used": request.used, "seq": request.seq, "want": request.want,
                  "demand": request.demand})


def decode_lease_request(data: bytes) -> LeaseRequest:
    _, obj = _unpack(data, "lease", STATE_VERSION)
    op = obj.get("op")
    if op not in LEASE_OPS:
        raise MalformedMessage("bad lease op")
    policy = _full_policy(obj.get("policy"))
    if policy.mode != "lease":
        raise MalformedMessage("policy is not in lease mode")
    want = _count(obj.get("want"), "want")
    used = _count(obj.get("used"), "used")
    # Slices of no window (a token bucket's): what a holder used has no bound.
    windowed = ALGORITHMS[policy.algorithm].lease_windows
    if want > policy.capacity or (windowed and used > policy.limit):
        raise MalformedMessage("want or used above the limit")
    demand = _count(obj.get("demand"), "demand")
    if demand > MAX_DEMAND:
        raise MalformedMessage("bad demand")
    return LeaseRequest(
        op=op, namespace=_namespace(obj.get("ns")),
        key_hash=_key_hash(obj.get("key")), policy=policy,
        node_id=_str(obj.get("node"), "node id"),
        region=_str(obj.get("region"), "region", max_len=64),
        window_start=_time(obj.get("window"), "window start"), used=used,
        seq=_count(obj.get("seq"), "seq"), want=want, demand=demand)


def encode_lease_grant(grant: LeaseGrant | None) -> bytes:
    """``None`` tells the node the authority could not decide (it waits or falls back)."""
    if grant is None:
        return _pack({"v": STATE_VERSION, "t": "grant", "error": True})
    return _pack({"v": STATE_VERSION, "t": "grant", "granted": grant.granted,
                  "window": grant.window_start, "end": grant.window_end,
                  "ttl": grant.ttl_ms, "free": grant.free})


def decode_lease_grant(data: bytes) -> LeaseGrant | None:
    _, obj = _unpack(data, "grant", STATE_VERSION)
    if obj.get("error"):
        return None
    start, end = _time(obj.get("window"), "window start"), _time(obj.get("end"), "window end")
    if end <= start:
        raise MalformedMessage("bad window")
    return LeaseGrant(_count(obj.get("granted"), "granted"), start, end,
                      _count(obj.get("ttl"), "ttl"), _count(obj.get("free"), "free"))
