"""NATS subjects and JetStream names: the wire addresses both sides agree on."""

from __future__ import annotations

PREFIX = "regionlimit"
USAGE_STREAM = "REGIONLIMIT_USAGE"
USAGE_SUBJECTS = f"{PREFIX}.usage.>"
USAGE_CONSUMER = "regionlimit-central"
TOTALS = f"{PREFIX}.totals"
CONFIG = f"{PREFIX}.config"
SNAPSHOT = f"{PREFIX}.snapshot"
CONSISTENT = f"{PREFIX}.consistent"
CONSISTENT_QUEUE = "regionlimit-authority"


def usage_subject(region: str) -> str:
    return f"{PREFIX}.usage.{region}"
LEASE = f"{PREFIX}.lease"
LEASE_QUEUE = "regionlimit-lease-authority"
