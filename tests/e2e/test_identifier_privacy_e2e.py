"""Raw identifiers never leave the request body: not on NATS, not in any process log, not
in the ledger, not in metrics or responses (whole system, real services)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import httpx
import nats

from tests.support.cluster import Cluster, admin, wait_until
from tests.support.nats_server import NatsServer

POLICIES = """
[namespaces.fast]
limit = 2
duration = "1h"
"""


class Capture:
    """Every message on regionlimit.> as raw bytes, from a subscriber of our own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.payloads: list[bytes] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        nc = await nats.connect(self.url)

        async def keep(msg: nats.aio.msg.Msg) -> None:
            self.payloads.append(msg.subject.encode() + b" " + msg.data)

        await nc.subscribe("regionlimit.>", cb=keep)
        await nc.subscribe("_INBOX.>", cb=keep)
        self.ready.set()
        await asyncio.to_thread(self.stop.wait)
        await nc.close()


def test_raw_identifiers_appear_nowhere(nats_server: NatsServer, postgres_url: str,
                                        tmp_path: Path) -> None:
    secret_key = f"sk_live_LEAKCANARY_{uuid.uuid4().hex}"
    client_ip = "203.0.113.77"
    cluster = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                      policy_toml=POLICIES)
    capture = Capture(nats_server.url)
    capture.thread.start()
    assert capture.ready.wait(10)
    try:
        central = cluster.central()
        nodes = [cluster.node("us"), cluster.node("eu")]
        r = admin(central.url, "PUT", "/v1/namespaces/exact", {
            "limit": 1, "duration": "1h", "mode": "consistent", "timeout": "2s"})
        assert r.status_code == 200
        responses: list[str] = []
        admitted = {"fast": 0, "exact": 0}
        responses.append(admin(central.url, "PUT", "/v1/namespaces/exact/overrides",
                               {"identifier": secret_key, "limit": 2}).text)
        responses.append(admin(central.url, "POST", "/v1/identifiers/hash",
                               {"identifier": client_ip}).text)
        with httpx.Client() as client:
            for node in nodes:
                for identifier in (secret_key, client_ip):
                    for namespace in ("fast", "exact"):
                        for _ in range(3):  # allowed, then denied
                            r = client.post(node.url + "/v1/check", json={
                                "namespace": namespace, "identifier": identifier})
                            responses.append(r.text)
                            admitted[namespace] += r.json()["allowed"]
                    r = client.post(node.url + "/v1/check/batch", json={
                        "checks": [{"namespace": "fast", "identifier": identifier},
                                   {"namespace": "nope", "identifier": identifier},
                                   {"namespace": "fast", "identifier": identifier,
                                    "cost": -1}]})
                    responses.append(r.text)
                    admitted["fast"] += r.json()["results"][0]["allowed"]
        assert admitted["exact"] == 3  # the override's 2 plus the IP's 1
        for namespace, count in admitted.items():
            wait_until(lambda ns=namespace, n=count: cluster.billed(ns)[0] == n,
                       what=f"{namespace} usage billed")
        metrics = [httpx.get(p.url + "/metrics").text for p in [central, *nodes]]
        for process in cluster.processes:
            process.stop()
        tables = ["components", "usage_hourly", "namespaces", "overrides", "consistent_keys"]
        ledger = repr([cluster.query(f"SELECT * FROM {t}") for t in tables])
    finally:
        capture.stop.set()
        capture.thread.join(10)
        cluster.close()
    assert len(capture.payloads) > 10
    logs = [p.log() for p in cluster.processes] + [nats_server.log()]
    for raw in (secret_key, client_ip):
        assert all(raw.encode() not in payload for payload in capture.payloads), raw
        assert all(raw not in text for text in logs), raw
        assert raw not in ledger
        assert all(raw not in text for text in metrics)
        assert all(raw not in text for text in responses)
