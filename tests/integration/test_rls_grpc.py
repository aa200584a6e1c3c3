"""Envoy's rate limit service (RLS v3 ShouldRateLimit) over the network: a real grpcio client
built from the published protos talks to a node serving HTTP (uvicorn) and gRPC on real
ports of 127.0.0.1, in this process, with an injected clock (no window boundary in reach)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
import pytest
import uvicorn

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.policies import NamespaceConfig
from region_node.settings import NodeSettings
from sync.identifiers import IdentifierHasher
from sync.policy import build_policy
from sync.subjects import CONSISTENT
from tests.support.nats_server import NatsServer
from tests.support.processes import free_port
from tests.support.rls_client import (
    OK,
    OVER_LIMIT,
    Response,
    descriptor,
    headers_of,
    request,
    stub,
)

SECRET = "s"
HOUR = 3_600_000
T0 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000 + 1_500  # just after midnight UTC
RAW_KEY = "sk_live_secret_key_42"
POLICY = """
[namespaces."edge.remote_address"]
limit = 3
duration = "1h"
algorithm = "fixed_window"

[namespaces."edge.generic_key.remote_address"]
limit = 10
duration = "1m"
algorithm = "fixed_window"

[namespaces.api]
limit = 4
duration = "1h"
algorithm = "fixed_window"

[namespaces.trial]
limit = 1
duration = "1h"
algorithm = "fixed_window"
shadow_mode = true

[namespaces.odd]
limit = 7
duration = "10s"

[rls.domains.gw]
namespace = "api"
identifier_keys = ["api_key"]

[rls.domains.plans]
namespace_key = "plan"
"""


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass
class RunningNode:
    node: RegionNode
    http: httpx.AsyncClient
    rls: Any  # RateLimitServiceStub
    channel: grpc.aio.Channel
    clock: Clock


@pytest.fixture(autouse=True)
def _no_regionlimit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)


async def start_node(tmp_path: Path, **settings: Any) -> AsyncIterator[RunningNode]:
    config = tmp_path / "node.toml"
    config.write_text(POLICY)
    clock = Clock(T0)
    port = free_port()
    node = RegionNode(NodeSettings(region="t", config=config, grpc_port=0, **settings),
                      secret=SECRET, clock=clock)
    server = uvicorn.Server(uvicorn.Config(build_app(node), host="127.0.0.1", port=port,
                                           lifespan="on", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    for _ in range(1000):  # poll with a generous deadline, not a fixed sleep
        if server.started or serving.done():
            break
        await asyncio.sleep(0.01)
    assert server.started and node.grpc_port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        try:
            yield RunningNode(node, http, stub(channel), channel, clock)
        finally:
            await channel.close()
            server.should_exit = True
            await serving


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningNode]:
    async for node in start_node(tmp_path):
        yield node


async def should(running: RunningNode, domain: str, *descriptors: Any,
                 hits_addend: int = 0, **call: Any) -> Any:
    return await running.rls.ShouldRateLimit(request(domain, descriptors, hits_addend), **call)


async def grpc_error(running: RunningNode, req: Any, **call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.rls.ShouldRateLimit(req, **call)
    return caught.value


async def test_ok_until_the_limit_then_over_limit(running: RunningNode) -> None:
    ip = descriptor(("remote_address", "10.0.0.1"))
    answers = [await should(running, "edge", ip) for _ in range(4)]
    assert [a.overall_code for a in answers] == [OK, OK, OK, OVER_LIMIT]
    assert [a.statuses[0].limit_remaining for a in answers] == [2, 1, 0, 0]
    first = answers[0].statuses[0]
    assert first.code == OK
    assert first.current_limit.requests_per_unit == 3
    assert first.current_limit.unit == Response.RateLimit.Unit.HOUR
    # The fixed window ends at the next hour boundary: 1h - 1.5s from T0.
    assert first.duration_until_reset.ToMilliseconds() == HOUR - 1_500
    assert answers[3].statuses[0].code == OVER_LIMIT
    headers = headers_of(answers[0])
    assert headers["ratelimit-policy"] == '"edge.remote_address";q=3;w=3600'
    assert headers["ratelimit"] == '"edge.remote_address";r=2;t=3599'
    assert (headers["ratelimit-limit"], headers["ratelimit-remaining"]) == ("3", "2")
    # Another address has its own counter.
    other = await should(running, "edge", descriptor(("remote_address", "10.0.0.2")))
    assert other.overall_code == OK and other.statuses[0].limit_remaining == 2


async def test_each_descriptor_is_decided_and_any_over_limit_wins(running: RunningNode
                                                                  ) -> None:
    ip = descriptor(("remote_address", "10.0.0.9"))
    route = descriptor(("generic_key", "checkout"), ("remote_address", "10.0.0.9"))
    for _ in range(3):
        assert (await should(running, "edge", ip, route)).overall_code == OK
    answer = await should(running, "edge", ip, route)
    assert answer.overall_code == OVER_LIMIT
    assert [s.code for s in answer.statuses] == [OVER_LIMIT, OK]
    assert [s.limit_remaining for s in answer.statuses] == [0, 6]
    assert answer.statuses[1].current_limit.unit == Response.RateLimit.Unit.MINUTE
    headers = headers_of(answer)
    assert headers["ratelimit-policy"] == ('"edge.remote_address";q=3;w=3600, '
                                           '"edge.generic_key.remote_address";q=10;w=60')
    assert headers["ratelimit"].startswith('"edge.remote_address";r=0;')


async def test_hits_addend_is_the_cost(running: RunningNode) -> None:
    key = descriptor(("api_key", RAW_KEY))
    assert (await should(running, "gw", key, hits_addend=3)).statuses[0].limit_remaining == 1
    # A descriptor's own hits_addend wins over the request's.
    own = descriptor(("api_key", RAW_KEY), hits_addend=1)
    assert (await should(running, "gw", own, hits_addend=3)).statuses[0].limit_remaining == 0
    over = await should(running, "gw", key, hits_addend=2)
    assert over.overall_code == OVER_LIMIT
    # hits_addend 0 means 1, as in Envoy; a descriptor's explicit 0 asks without consuming.
    peek = descriptor(("api_key", "other"), hits_addend=0)
    assert (await should(running, "gw", peek)).statuses[0].limit_remaining == 4
    assert (await should(running, "gw", descriptor(("api_key", "other")))
            ).statuses[0].limit_remaining == 3


async def test_grpc_and_http_share_one_counter_per_key(running: RunningNode) -> None:
    key = descriptor(("api_key", RAW_KEY))
    http_check = {"namespace": "api", "identifier": RAW_KEY}
    assert (await running.http.post("/v1/check", json=http_check)).json()["remaining"] == 3
    assert (await should(running, "gw", key)).statuses[0].limit_remaining == 2
    assert (await running.http.post("/v1/check", json=http_check)).json()["remaining"] == 1
    assert (await should(running, "gw", key)).statuses[0].limit_remaining == 0
    denied = await running.http.post("/v1/check", json=http_check)
    assert denied.json()["allowed"] is False
    assert (await should(running, "gw", key)).overall_code == OVER_LIMIT
    metrics = (await running.http.get("/metrics")).text
    for protocol, allowed, denied_count in (("http", 2, 1), ("grpc", 2, 1)):
        for outcome, value in (("allowed", allowed), ("denied", denied_count)):
            line = (f'regionlimit_checks_total{{namespace="api",outcome="{outcome}",'
                    f'protocol="{protocol}",region="t",source="local"}} {float(value)}')
            assert line in metrics


async def test_identifiers_are_hashed_on_arrival(running: RunningNode) -> None:
    await should(running, "gw", descriptor(("api_key", RAW_KEY)))
    key_hash = IdentifierHasher(SECRET).hash(RAW_KEY)
    state = running.node.store.get("api", key_hash)
    assert state is not None and state.cur == 1
    assert all(RAW_KEY not in key for key in running.node.store._states)


async def test_namespace_key_names_the_namespace(running: RunningNode) -> None:
    answer = await should(running, "plans", descriptor(("plan", "api"), ("user", "u1")))
    assert answer.statuses[0].current_limit.requests_per_unit == 4
    assert running.node.store.get("api", IdentifierHasher(SECRET).hash("u1")) is not None


async def test_a_window_of_no_whole_unit_is_unknown_with_its_length_named(
        running: RunningNode) -> None:
    answer = await should(running, "plans", descriptor(("plan", "odd"), ("user", "u1")))
    limit = answer.statuses[0].current_limit
    assert limit.unit == Response.RateLimit.Unit.UNKNOWN
    assert (limit.requests_per_unit, limit.name) == (7, "odd 7/10s")


async def test_shadow_mode_counts_and_bills_but_never_denies(running: RunningNode) -> None:
    answers = [await should(running, "plans", descriptor(("plan", "trial"), ("user", "u7")))
               for _ in range(3)]
    assert [a.overall_code for a in answers] == [OK, OK, OK]
    assert [a.statuses[0].code for a in answers] == [OK, OK, OK]
    assert not answers[0].HasField("dynamic_metadata")
    assert dict(answers[1].dynamic_metadata) == {"shadowed": True}
    http = (await running.http.post("/v1/check", json={"namespace": "trial",
                                                       "identifier": "u7"})).json()
    assert http["allowed"] is True and http["shadowed"] is True and http["remaining"] == 0
    state = running.node.store.get("trial", IdentifierHasher(SECRET).hash("u7"))
    assert state is not None and (state.cur, state.cur_denied) == (4, 0)  # all admitted


@pytest.mark.parametrize(("req", "status", "words"), [
    (request("", [descriptor(("remote_address", "1.2.3.4"))]),
     grpc.StatusCode.INVALID_ARGUMENT, "domain must not be empty"),
    (request("edge", []), grpc.StatusCode.INVALID_ARGUMENT, "descriptors must hold"),
    (request("edge", [descriptor()]), grpc.StatusCode.INVALID_ARGUMENT,
     "descriptors[0] has no entries"),
    (request("nowhere", [descriptor(("remote_address", "1.2.3.4"))]),
     grpc.StatusCode.NOT_FOUND, "nowhere.remote_address"),
    (request("edge", [descriptor(("remote_address", "1.2.3.4"))], hits_addend=4),
     grpc.StatusCode.INVALID_ARGUMENT, "hits_addend: cost must be 0..3"),
    (request("edge", [descriptor(("remote_address", "1.2.3.4"), hits_addend=2**40)]),
     grpc.StatusCode.INVALID_ARGUMENT, "hits_addend"),
    (request("edge", [descriptor(("remote_address", "x" * 300))]),
     grpc.StatusCode.INVALID_ARGUMENT, "identifier must be"),
    (request("gw", [descriptor(("user", "u1"))]),
     grpc.StatusCode.INVALID_ARGUMENT, "lacks the 'api_key' entry"),
    (request("edge", [descriptor(("remote_address", "1.2.3.4"))] * 65),
     grpc.StatusCode.INVALID_ARGUMENT, "at most 64 descriptors"),
])
async def test_bad_input_gets_a_grpc_status_naming_the_problem(
        running: RunningNode, req: Any, status: grpc.StatusCode, words: str) -> None:
    error = await grpc_error(running, req)
    assert error.code() == status
    assert words in (error.details() or "")
    assert "1.2.3.4" not in (error.details() or "")  # entry values are never echoed


async def test_a_bad_descriptor_consumes_nothing_from_the_good_ones(running: RunningNode
                                                                  ) -> None:
    good = descriptor(("remote_address", "10.1.1.1"))
    bad = descriptor(("remote_address", "10.1.1.1"), hits_addend=99)
    await grpc_error(running, request("edge", [good, bad]))
    answer = await should(running, "edge", good)
    assert answer.statuses[0].limit_remaining == 2  # the first check of this address


async def test_an_oversized_message_is_refused(running: RunningNode) -> None:
    huge = descriptor(*[(f"k{i}", "v" * 1000) for i in range(100)])  # ~100 KiB > 64 KiB
    error = await grpc_error(running, request("edge", [huge]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server lives on.
    assert (await should(running, "edge", descriptor(("remote_address", "10.2.2.2")))
            ).overall_code == OK


async def test_node_token_is_required_on_grpc_too(tmp_path: Path) -> None:
    async for running in start_node(tmp_path, node_token="t0ken"):
        ip = descriptor(("remote_address", "10.0.0.1"))
        error = await grpc_error(running, request("edge", [ip]))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await grpc_error(running, request("edge", [ip]),
                                 metadata=(("authorization", "Bearer wrong"),))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = await should(running, "edge", ip,
                              metadata=(("authorization", "Bearer t0ken"),))
        assert answer.overall_code == OK


async def test_ratelimit_fields_can_be_turned_off(tmp_path: Path) -> None:
    async for running in start_node(tmp_path, ratelimit_fields=False):
        answer = await should(running, "edge", descriptor(("remote_address", "10.0.0.1")))
        assert set(headers_of(answer)) == {"ratelimit-limit", "ratelimit-remaining",
                                           "ratelimit-reset"}
        http = await running.http.post("/v1/check", json={"namespace": "api",
                                                          "identifier": "k"})
        assert "ratelimit-policy" not in http.headers and "ratelimit" not in http.headers
        assert http.headers["ratelimit-limit"] == "4"


async def test_http_answers_carry_the_ietf_fields(running: RunningNode) -> None:
    http = await running.http.post("/v1/check", json={"namespace": "api", "identifier": "k"})
    assert http.headers["ratelimit-policy"] == '"api";q=4;w=3600'
    assert http.headers["ratelimit"] == '"api";r=3;t=3599'
    assert http.headers["ratelimit-remaining"] == "3"  # the old triple stays
    inline = await running.http.post("/v1/check", json={
        "namespace": "adhoc", "identifier": "k", "limit": 5, "duration": "month",
        "algorithm": "fixed_window"})
    assert inline.headers["ratelimit-policy"] == '"adhoc";q=5'  # a month has no fixed w


async def test_a_consistent_check_past_its_deadline_is_deadline_exceeded(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """An authority that takes requests but never answers, and a policy that waits 10 s for
    it: the call's 0.5 s deadline ends the wait, not the policy's timeout."""
    (tmp_path / "extra").mkdir()
    silent = await nats.connect(nats_server.url)
    await silent.subscribe(CONSISTENT, cb=_never_answer)
    await silent.flush()
    async for running in start_node(tmp_path / "extra", nats_url=nats_server.url,
                                    spill_path=tmp_path / "spill.msgpack"):
        policy = running.node.resolver.configured("api")
        assert policy is not None
        slow = build_policy(limit=4, duration="1h", mode="consistent", timeout="10s",
                            on_unavailable="closed")
        running.node.resolver.set_central({"api": NamespaceConfig(slow)}, 1)
        error = await grpc_error(running, request("gw", [descriptor(("api_key", "k"))]),
                                 timeout=0.5)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The node goes on answering.
        answer = await should(running, "edge", descriptor(("remote_address", "10.3.3.3")))
        assert answer.overall_code == OK
        assert running.node.metrics.fallbacks == {}  # the wait was abandoned, not decided
    await silent.close()


async def _never_answer(_: Any) -> None:
    return None
