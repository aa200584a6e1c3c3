"""The gateway examples in deploy/envoy: checked against Envoy's own protos (the published
xds-protos messages, strict: an unknown or misspelt field fails), by `envoy --mode validate`
where an envoy binary is on PATH, and end to end through Envoy where one is."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

# Registers the typed_config messages the examples name, so Any fields resolve.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.policy_file import load_policy_file
from region_node.rls_rules import load_rls_rules
from region_node.settings import NodeSettings
from tests.support.cluster import HOUR_MS, avoid_window_boundary
from tests.support.processes import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
ENVOY = shutil.which("envoy")


def bootstrap() -> Any:
    data = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    return json_format.ParseDict(data, bootstrap_pb2.Bootstrap())


def hcm_of(config: Any) -> Any:
    listener = config.static_resources.listeners[0]
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_example_envoy_config_is_a_valid_bootstrap() -> None:
    config = bootstrap()
    hcm = hcm_of(config)
    names = [f.name for f in hcm.http_filters]
    assert names == ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    ratelimit = rate_limit_pb2.RateLimit()
    assert hcm.http_filters[0].typed_config.Unpack(ratelimit)
    assert ratelimit.domain == "edge"
    service = ratelimit.rate_limit_service
    clusters = {c.name: c for c in config.static_resources.clusters}
    assert service.grpc_service.envoy_grpc.cluster_name in clusters
    options = clusters["regionlimit"].typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    http = http_protocol_options_pb2.HttpProtocolOptions()
    assert options.Unpack(http) and http.explicit_http_config.HasField(
        "http2_protocol_options")  # gRPC needs HTTP/2 to the node


def test_a_misspelt_field_would_fail_the_check() -> None:
    data = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    data["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(data, bootstrap_pb2.Bootstrap())


def test_example_node_policy_covers_the_descriptors_envoy_sends() -> None:
    path = DEPLOY / "node-rls.toml"
    namespaces = load_policy_file(path)
    rules = load_rls_rules(path)
    vhost = hcm_of(bootstrap()).route_config.virtual_hosts[0]
    descriptors = []
    for limit in vhost.routes[0].route.rate_limits:
        action = limit.actions[0]
        key = ("remote_address" if action.HasField("remote_address")
               else action.request_headers.descriptor_key)
        descriptors.append([(key, "value")])
    mapped = {rules.map_descriptor("edge", d, "d")[0] for d in descriptors}
    assert mapped == {"edge.remote_address", "edge.api_key"}
    assert mapped <= set(namespaces)


def test_istio_envoyfilter_patches_are_valid_envoy_messages() -> None:
    document = yaml.safe_load((DEPLOY / "istio-envoyfilter.yaml").read_text())
    assert (document["apiVersion"], document["kind"]) == ("networking.istio.io/v1alpha3",
                                                          "EnvoyFilter")
    filter_patch, vhost_patch = document["spec"]["configPatches"]
    assert filter_patch["applyTo"] == "HTTP_FILTER"
    http_filter = json_format.ParseDict(filter_patch["patch"]["value"],
                                        http_connection_manager_pb2.HttpFilter())
    ratelimit = rate_limit_pb2.RateLimit()
    assert http_filter.typed_config.Unpack(ratelimit) and ratelimit.domain == "edge"
    assert vhost_patch["applyTo"] == "VIRTUAL_HOST"
    vhost = json_format.ParseDict(vhost_patch["patch"]["value"],
                                  route_components_pb2.VirtualHost())
    assert len(vhost.rate_limits) == 2


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary on PATH: the example is checked "
                    "against Envoy's protos only (install envoy to validate it with Envoy)")
def test_envoy_itself_accepts_the_example() -> None:
    assert ENVOY is not None
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(DEPLOY / "envoy.yaml")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- end to end through Envoy --------------------------------------------------------------


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


async def serve(app: Any, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield
    finally:
        server.should_exit = True
        await task


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary on PATH: the end-to-end test "
                    "through Envoy's ratelimit filter needs one")
async def test_requests_through_envoy_are_limited_by_the_node(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    assert ENVOY is not None
    for name in list(os.environ):
        if name.startswith("REGIONLIMIT_"):
            monkeypatch.delenv(name)
    policy = tmp_path / "node.toml"
    policy.write_text('[namespaces."edge.remote_address"]\nlimit = 3\nduration = "1h"\n'
                      'algorithm = "fixed_window"\n')
    grpc_port, http_port, api_port, envoy_port, admin_port = (free_port() for _ in range(5))
    text = (DEPLOY / "envoy.yaml").read_text()
    for old, new in (("port_value: 8082", f"port_value: {grpc_port}"),
                     ("port_value: 8000", f"port_value: {api_port}"),
                     ("port_value: 10000", f"port_value: {envoy_port}"),
                     ("port_value: 9901", f"port_value: {admin_port}"),
                     ("address: 0.0.0.0", "address: 127.0.0.1")):
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    node = RegionNode(NodeSettings(region="t", config=policy, grpc_port=grpc_port),
                      secret="s")
    avoid_window_boundary(HOUR_MS, span_s=90)  # wall clock: keep the hour's end out of reach
    async for _ in serve(build_app(node), http_port):
        async for _ in serve(upstream_app, api_port):
            envoy = await asyncio.create_subprocess_exec(
                ENVOY, "-c", str(config), "--log-level", "warn", "--base-id", str(envoy_port),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await _through_envoy(envoy_port)
            finally:
                envoy.terminate()
                await asyncio.wait_for(envoy.wait(), 30)


async def _through_envoy(port: int) -> None:
    url = f"http://127.0.0.1:{port}/"
    async with httpx.AsyncClient() as client:
        # Until Envoy listens and reaches the node, requests fail or pass unchecked
        # (failure_mode_deny: false); the first answer with RateLimit fields was counted.
        for _ in range(600):
            try:
                first = await client.get(url)
                if "ratelimit-policy" in first.headers:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        else:
            pytest.fail("envoy never answered with the node's RateLimit fields")
        statuses = [first.status_code] + [(await client.get(url)).status_code
                                          for _ in range(3)]
    assert statuses == [200, 200, 200, 429]
    assert first.headers["ratelimit-policy"] == '"edge.remote_address";q=3;w=3600'
    assert first.headers["ratelimit"].startswith('"edge.remote_address";r=2;')
