"""central/lanes.py against a real nats-server: the shape both authorities share."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats
import pytest

from central.lanes import Lane, LaneServer
from central.metrics import CentralMetrics
from sync.errors import MalformedMessage
from tests.support.nats_server import NatsServer

SUBJECT, QUEUE = "test.lanes", "test-lanes"
REFUSAL = b"refused"


@dataclass(frozen=True)
class Request:
    namespace: str
    key_hash: str


def decode(data: bytes) -> Request:
    namespace, _, key_hash = data.decode().partition("/")
    if not key_hash:
        raise MalformedMessage("no key")
    return Request(namespace, key_hash)


async def test_a_key_always_lands_in_one_lane_and_garbage_is_refused_at_once(
        nats_server: NatsServer) -> None:
    metrics = CentralMetrics("r1")
    server: LaneServer[Request] = LaneServer(
        subject=SUBJECT, queue_group=QUEUE, lanes=4, decode=decode, refusal=REFUSAL,
        what="test", metrics=metrics, log=logging.getLogger("test"))
    seen: dict[str, set[int]] = {}

    async def work(lane: Lane[Request]) -> None:
        index = server.lanes.index(lane)
        while True:
            request, msg = await lane.get()
            seen.setdefault(request.key_hash, set()).add(index)
            await msg.respond(f"lane {index}".encode())

    nc = await nats.connect(nats_server.url)
    serving = asyncio.create_task(server.serve(nc, work))
    try:
        client = await nats.connect(nats_server.url)
        for _ in range(50):  # the subscription exists once a request is answered
            try:
                await client.request(SUBJECT, b"ns/warm", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                continue
        for _ in range(3):
            for key in ("a", "b", "c", "d", "e", "f"):
                reply = await client.request(SUBJECT, f"ns/{key}".encode(), timeout=5)
                assert reply.data.startswith(b"lane ")
        assert all(len(lanes) == 1 for lanes in seen.values())
        assert (await client.request(SUBJECT, b"no key here", timeout=5)).data == REFUSAL
        assert metrics.registry.get_sample_value("regionlimit_messages_malformed_total") == 1
        # The lanes still serve after the garbage.
        assert (await client.request(SUBJECT, b"ns/a", timeout=5)).data.startswith(b"lane ")
        await client.close()
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        await nc.close()
