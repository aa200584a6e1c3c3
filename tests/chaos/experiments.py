"""Chaos experiments against real processes: nats-server, Postgres, central, region nodes.

Each experiment builds on a ``ChaosSystem`` (its own nats-server and a fresh database),
injects one fault, and returns an ``Outcome``: the cost the nodes admitted, the cost the
ledger billed, and whether the experiment's promise held. The quick ones run in CI
(tests/chaos/test_chaos.py); ``bench/chaos.py --full`` runs them all and prints the table.

Windows are an hour long and every experiment starts clear of an hour boundary, so no
count moves between windows while it runs. Waits poll with generous deadlines; where the
fault itself is a duration ("NATS down for 10 s") the experiment sleeps for it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import nats

from sync.algorithms.base import MAX_COUNT
from sync.messages import UsageBatch, UsageEntry, encode_usage
from sync.policy import build_policy
from sync.publisher import ensure_usage_stream
from sync.subjects import usage_subject
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    avoid_window_boundary,
    check,
    partition0_holder,
    wait_until,
)
from tests.support.nats_server import NatsServer
from tests.support.postgres import EmbeddedPostgres
from tests.support.processes import TEST_ADMIN_TOKEN, ManagedProcess

NAMESPACE = "chaos"
POLICIES = f"""
[namespaces.{NAMESPACE}]
limit = 1000000000
duration = "1h"
algorithm = "fixed_window"

[namespaces.tight]
limit = 200
duration = "1h"
algorithm = "fixed_window"
mode = "consistent"
on_unavailable = "closed"
timeout = "2s"
"""
BILL_TIMEOUT_S = 60.0
FLUSH_INTERVAL_S = 0.1  # the product's default REGIONLIMIT_FLUSH_INTERVAL


@dataclass(frozen=True, slots=True)
class Outcome:
    experiment: str
    allowed: int
    billed: int
    passed: bool
    note: str = ""


class ChaosSystem:
    """A ``Cluster`` (tests/support/cluster.py) plus the helpers the experiments share."""

    def __init__(self, *, nats_server: NatsServer, database_url: str, tmp: Path) -> None:
        self.nats = nats_server
        self.cluster = Cluster(nats=nats_server, database_url=database_url, tmp=tmp,
                               policy_toml=POLICIES)

    def close(self) -> None:
        self.cluster.close()

    def billed(self, namespace: str = NAMESPACE) -> int:
        return self.cluster.billed(namespace)[0]

    def wait_billed(self, expected: int, *, namespace: str = NAMESPACE,
                    timeout: float = BILL_TIMEOUT_S) -> int:
        """The billed cost once it reaches ``expected`` (or what it is at the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            billed = self.billed(namespace)
            if billed >= expected:
                return billed
            time.sleep(0.1)
        return self.billed(namespace)

    def leader(self, replicas: list[ManagedProcess]) -> ManagedProcess | None:
        """The replica leading partition 0 (both replicas lead some partitions; this one
        also splits per-region usage and answers snapshots)."""
        return partition0_holder(replicas)


class Traffic:
    """Checks of cost 1 on a background thread, round-robin over nodes, until stopped.

    Answers that are not a 200 (a node being killed) count as failures, not as admitted."""

    def __init__(self, urls: list[str], *, identifier: str, namespace: str = NAMESPACE,
                 rate: float = 100.0) -> None:
        self.urls = urls
        self.identifier = identifier
        self.namespace = namespace
        self.rate = rate
        self.admitted = 0
        self.answered = 0
        self.failures = 0
        self.admitted_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        wait_until(lambda: self.answered > 0, timeout=30, what="first answer")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            i = 0
            while not self._stop.is_set():
                delay = started + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                url = self.urls[i % len(self.urls)]
                i += 1
                try:
                    result = check(client, url, self.namespace, self.identifier)
                except (httpx.HTTPError, AssertionError):
                    self.failures += 1
                    continue
                self.answered += 1
                if result["allowed"]:
                    self.admitted += 1
                    self.admitted_at.append(time.monotonic())

    def wait_answers(self, count: int) -> None:
        target = self.answered + count
        wait_until(lambda: self.answered >= target, timeout=60, what=f"{count} more answers")


def admit(url: str, count: int, *, identifier: str, namespace: str = NAMESPACE) -> int:
    """``count`` checks in a row; returns how many were admitted."""
    with httpx.Client(timeout=10.0) as client:
        return sum(bool(check(client, url, namespace, identifier)["allowed"])
                   for _ in range(count))


def exact(name: str, system: ChaosSystem, allowed: int, note: str = "") -> Outcome:
    billed = system.wait_billed(allowed)
    return Outcome(name, allowed, billed, billed == allowed, note)


# --- quick experiments (CI) ----------------------------------------------------------------

def baseline(system: ChaosSystem) -> Outcome:
    system.cluster.central()
    nodes = [system.cluster.node("us"), system.cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=120)
    allowed = sum(admit(node.url, 100, identifier="baseline") for node in nodes)
    return exact("baseline", system, allowed)


def poison_messages(system: ChaosSystem) -> Outcome:
    """Every kind of bad usage message, then traffic that must be billed exactly."""
    system.cluster.central()
    node = system.cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=120)
    poison = poison_payloads()
    publish_usage(system.nats.url, poison)
    allowed = admit(node.url, 200, identifier="after-poison")
    outcome = exact("poison messages", system, allowed, f"{len(poison)} poison messages")
    leaked = system.billed("poison")
    if leaked:
        return Outcome(outcome.experiment, outcome.allowed, outcome.billed, False,
                       f"poison billed {leaked}")
    # The valid entry that travelled in a message with poisoned ones is billed all the same.
    kept = system.wait_billed(MIXED_ADMITTED, namespace="mixed")
    if kept != MIXED_ADMITTED:
        return Outcome(outcome.experiment, outcome.allowed, outcome.billed, False,
                       f"valid entry beside poison billed {kept} of {MIXED_ADMITTED}")
    return outcome


MIXED_ADMITTED = 7


def poison_payloads() -> list[bytes]:
    now = int(time.time() * 1000)
    window = now - now % HOUR_MS
    policy = build_policy(limit=1000, duration="1h", algorithm="fixed_window")

    def usage(namespace: str = "poison", key: str = "a" * 32, start: int = window,
              admitted: int = 1) -> bytes:
        return encode_usage(UsageBatch("poison.node", "poison", now, [
            UsageEntry(namespace, key, start, admitted, 0, policy)]))

    def raw(**changes: Any) -> bytes:
        fields: dict[str, Any] = {"v": 2, "t": "usage", "node": "poison.node",
                                  "region": "poison", "sent": now,
                                  "policies": [[1000, "1h", "fixed_window", None]],
                                  "entries": [["poison", "b" * 32, window, 1, 0, 0]]}
        fields.update(changes)
        return bytes(msgpack.packb(fields, use_bin_type=True))

    return [
        usage(namespace="pois\x00n"),                      # NUL: Postgres refuses it
        usage(key="c" * 31 + "\x00"),
        usage(admitted=2**63),                             # beyond BIGINT
        usage(admitted=MAX_COUNT + 1),                     # beyond the counters' bound
        raw(entries=[["poison", "d" * 32, window, "1", 0, 0]]),  # wrong types
        raw(entries=[["poison", "d" * 32, str(window), 1, 0, 0]]),
        raw(entries=[["poison", 32, window, 1, 0, 0]]),
        raw(node=None),
        raw(policies=[["1000", "1h", "fixed_window", None]]),
        raw(v=99),                                          # a newer version
        usage(start=window + 1, key="e" * 32),              # misaligned window
        usage(start=window + 10 * HOUR_MS, key="f" * 32),   # future window
        raw(entries=[["pois\x00n", "b" * 32, window, 1, 0, 0],   # one bad entry, one good
                     ["mixed", "b" * 32, window, MIXED_ADMITTED, 0, 0],
                     ["poison", "b" * 32, window, 2**63, 0, 0]]),
        b"\xc1 not msgpack",
        b"",
    ]


def publish_usage(nats_url: str, payloads: list[bytes]) -> None:
    async def run() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await ensure_usage_stream(js)
            for payload in payloads:
                await js.publish(usage_subject("poison"), payload)
        finally:
            await nc.close()
    asyncio.run(run())


def sigterm_node_nats_stalled(system: ChaosSystem) -> Outcome:
    """SIGTERM of a node while nats-server is SIGSTOPped: the stop spills, nothing lost."""
    system.cluster.central()
    node = system.cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=120)
    allowed = admit(node.url, 50, identifier="stalled")
    system.wait_billed(allowed)
    system.nats.pause()
    try:
        allowed += admit(node.url, 300, identifier="stalled")
        node.stop()
    finally:
        system.nats.resume()
    spilled = (system.cluster.tmp / "spill-us.msgpack").exists()
    system.cluster.node("us")  # the restart publishes the spill file
    return exact("SIGTERM node, NATS stalled", system, allowed,
                 "spill file written" if spilled else "no spill file")


def fuzzed_http(system: ChaosSystem, *, requests: int = 400, seed: int = 10) -> Outcome:
    """Random and hostile requests to a node and central over kept-alive connections: no
    5xx, no hang (a 10 s socket timeout), no connection dropped by the server."""
    central = system.cluster.central()
    node = system.cluster.node("us")
    rng = random.Random(seed)
    problems: list[str] = []
    for url, bodies in ((node.url, node_bodies), (central.url, central_bodies)):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for _ in range(requests):
                path, body, headers = bodies(rng)
                try:
                    connection.request("POST", path, body=body, headers=headers)
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as exc:
                    problems.append(f"{path}: {type(exc).__name__}")
                    connection.close()
                    continue
                if response.status >= 500:
                    problems.append(f"{path}: {response.status} for {body[:80]!r}")
                elif response.will_close:
                    problems.append(f"{path}: connection closed after {response.status}")
                    connection.close()
        finally:
            connection.close()
    return Outcome("fuzzed HTTP (node + central)", 0, 0, not problems,
                   f"{2 * requests} requests; " + ("; ".join(problems[:3]) or "0 5xx"))


HOSTILE_VALUES: list[Any] = [
    None, True, -1, 0, 2**63, 2**64 + 7, 1.5, 1e308, "", "x" * 300, "a\x00b", "\ud800",
    [], {}, [[[[[]]]]], "9999-12-31", "9999-12-31T23:00:00Z", "0001-01-01", "month",
    "1e9h", "2026-13-01", 253_402_300_799_999, "🙂" * 50,
]


def _json(rng: random.Random, base: dict[str, Any]) -> bytes:
    body = dict(base)
    for name in rng.sample(sorted(body), k=rng.randint(0, len(body))):
        body[name] = rng.choice(HOSTILE_VALUES)
    if rng.random() < 0.1:
        body[rng.choice(["extra", "limit", "\x00"])] = rng.choice(HOSTILE_VALUES)
    return json.dumps(body).encode()


def _bytes(rng: random.Random) -> bytes:
    return rng.choice([b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"a":' * 500,
                       bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))])


def node_bodies(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    headers = {"content-type": "application/json"}
    check_body = {"namespace": NAMESPACE, "identifier": "fuzz", "cost": 1, "limit": 5,
                  "duration": "1h", "algorithm": "sliding_window"}
    if rng.random() < 0.15:
        return "/v1/check", _bytes(rng), headers
    if rng.random() < 0.2:
        checks = [json.loads(_json(rng, check_body)) for _ in range(rng.randint(0, 3))]
        return "/v1/check/batch", json.dumps({"checks": checks}).encode(), headers
    return "/v1/check", _json(rng, check_body), headers


def central_bodies(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    headers = {"content-type": "application/json",
               "authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    query = {"namespace": NAMESPACE, "from": "2026-11-01", "to": "2026-12-01",
             "group_by": ["region", "month"], "identifier_hash": "0" * 32}
    if rng.random() < 0.15:
        return "/v1/usage/query", _bytes(rng), headers
    return "/v1/usage/query", _json(rng, query), headers


QUICK: dict[str, Callable[[ChaosSystem], Outcome]] = {
    "baseline": baseline,
    "poison": poison_messages,
    "sigterm-stalled": sigterm_node_nats_stalled,
    "fuzz": fuzzed_http,
}


# --- the full run's experiments ------------------------------------------------------------

def kill_leader(system: ChaosSystem) -> Outcome:
    replicas = [system.cluster.central(), system.cluster.central()]
    leader = wait_until(lambda: system.leader(replicas), timeout=30,
                        what="one holder of partition 0")
    node = system.cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=120)
    with Traffic([node.url], identifier="leader-kill") as traffic:
        traffic.wait_answers(200)
        leader.kill()
        wait_until(lambda: system.leader(replicas), timeout=60,
                   what="the other replica to lead partition 0")
        traffic.wait_answers(200)
    return exact("kill -9 central replica (2 sharing the partitions)", system,
                 traffic.admitted,
                 f"{traffic.failures} failed checks")


def kill_nats(system: ChaosSystem) -> Outcome:
    system.cluster.central()
    nodes = [system.cluster.node("us"), system.cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=120)
    with Traffic([n.url for n in nodes], identifier="nats-kill") as traffic:
        traffic.wait_answers(100)
        system.nats.kill()
        time.sleep(10.0)  # the fault: NATS away for ten seconds
        system.nats.start()
        traffic.wait_answers(200)
    return exact("kill -9 NATS for 10 s", system, traffic.admitted,
                 f"{traffic.failures} failed checks")


def sigterm_node_nats_down(system: ChaosSystem) -> Outcome:
    system.cluster.central()
    node = system.cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=120)
    allowed = admit(node.url, 50, identifier="down")
    system.wait_billed(allowed)
    system.nats.kill()
    allowed += admit(node.url, 300, identifier="down")
    node.stop()
    system.nats.start()
    system.cluster.node("us")
    return exact("SIGTERM node, NATS down", system, allowed)


def sigkill_node(system: ChaosSystem) -> Outcome:
    """A crashed node loses at most what it admitted in its last flush interval (plus
    the publication in flight): checked against the admission times."""
    system.cluster.central()
    node = system.cluster.node("us")
    avoid_window_boundary(HOUR_MS, span_s=120)
    with Traffic([node.url], identifier="node-kill", rate=200) as traffic:
        traffic.wait_answers(400)
        node.kill()
        killed_at = time.monotonic()
    allowed = traffic.admitted
    system.wait_billed(allowed, timeout=15)
    billed = system.billed()
    slack = FLUSH_INTERVAL_S + 0.5
    recent = sum(1 for t in traffic.admitted_at if t > killed_at - slack)
    return Outcome("SIGKILL node", allowed, billed, allowed - recent <= billed <= allowed,
                   f"lost {allowed - billed}; admitted in the last {slack:.1f} s: {recent}")


def consistent_replica_killed(system: ChaosSystem) -> Outcome:
    """Consistent mode (limit 200, closed on unavailability) with the leading replica
    killed mid-traffic: never more than the limit admitted."""
    replicas = [system.cluster.central(), system.cluster.central()]
    leader = wait_until(lambda: system.leader(replicas), timeout=30, what="one leader")
    nodes = [system.cluster.node("us"), system.cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=120)
    with Traffic([n.url for n in nodes], identifier="consistent", namespace="tight",
                 rate=50) as traffic:
        traffic.wait_answers(100)
        leader.kill()
        wait_until(lambda: system.leader(replicas), timeout=60, what="the standby to lead")
        traffic.wait_answers(300)
    admitted = traffic.admitted
    return Outcome("consistent mode, leader replica killed", admitted,
                   system.wait_billed(admitted, namespace="tight", timeout=20),
                   admitted <= 200, f"limit 200; {traffic.failures} failed checks")


FULL: dict[str, Callable[[ChaosSystem], Outcome]] = {
    **QUICK,
    "kill-leader": kill_leader,
    "kill-nats": kill_nats,
    "sigterm-down": sigterm_node_nats_down,
    "sigkill-node": sigkill_node,
    "consistent-replica": consistent_replica_killed,
}


def postgres_outage(system: ChaosSystem, postgres: EmbeddedPostgres) -> Outcome:
    """The ledger's Postgres (one the suite owns) stopped for 10 s under traffic."""
    system.cluster.central()
    nodes = [system.cluster.node("us"), system.cluster.node("eu")]
    avoid_window_boundary(HOUR_MS, span_s=120)
    with Traffic([n.url for n in nodes], identifier="pg-outage") as traffic:
        traffic.wait_answers(100)
        postgres.outage(10.0)  # the fault: Postgres away for ten seconds
        traffic.wait_answers(200)
    return exact("Postgres stopped 10 s", system, traffic.admitted,
                 f"{traffic.failures} failed checks")
