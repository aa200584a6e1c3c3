"""The usage stream's replicas and size come from settings; JetStream's refusal of an
impossible replica count is a clear error; central's leader brings an existing stream to
the configured limits."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import DiscardPolicy

from central.settings import CentralSettings
from region_node.settings import NodeSettings
from sync.publisher import (
    DEFAULT_STREAM_MAX_BYTES,
    StreamLimits,
    StreamSetupFailed,
    ensure_usage_stream,
)
from sync.subjects import USAGE_STREAM
from tests.support.nats_server import NatsServer


def test_settings_default_to_one_replica_and_a_bounded_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REGIONLIMIT_STREAM_REPLICAS", "REGIONLIMIT_STREAM_MAX_BYTES",
                 "REGIONLIMIT_JS_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    assert CentralSettings().stream_limits == StreamLimits(
        replicas=1, max_bytes=DEFAULT_STREAM_MAX_BYTES)
    monkeypatch.setenv("REGIONLIMIT_STREAM_REPLICAS", "3")
    monkeypatch.setenv("REGIONLIMIT_STREAM_MAX_BYTES", "16106127360")
    monkeypatch.setenv("REGIONLIMIT_JS_DOMAIN", "regionlimit")
    for settings in (CentralSettings(), NodeSettings()):
        assert settings.stream_limits == StreamLimits(replicas=3, max_bytes=16106127360)
        assert settings.js_domain == "regionlimit"
    monkeypatch.setenv("REGIONLIMIT_STREAM_REPLICAS", "0")
    with pytest.raises(ValueError, match="stream_replicas"):
        CentralSettings()


async def test_stream_created_updated_and_refused(nats_server: NatsServer) -> None:
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        # A single server cannot hold 3 replicas: refused, with the setting named.
        with pytest.raises(StreamSetupFailed, match="REGIONLIMIT_STREAM_REPLICAS"):
            await ensure_usage_stream(js, limits=StreamLimits(replicas=3))

        await ensure_usage_stream(js, limits=StreamLimits(max_bytes=50_000_000))
        config = (await js.stream_info(USAGE_STREAM)).config
        assert (config.num_replicas, config.max_bytes) == (1, 50_000_000)
        assert config.discard == DiscardPolicy.NEW  # never drop unbilled usage

        # A node's check leaves an existing stream alone; central's leader updates it.
        await ensure_usage_stream(js, limits=StreamLimits(max_bytes=80_000_000))
        assert (await js.stream_info(USAGE_STREAM)).config.max_bytes == 50_000_000
        await ensure_usage_stream(js, limits=StreamLimits(max_bytes=80_000_000), update=True)
        assert (await js.stream_info(USAGE_STREAM)).config.max_bytes == 80_000_000
    finally:
        await client.close()
