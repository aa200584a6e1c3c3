"""Region node settings: environment (REGIONLIMIT_ prefix), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sync.durations import check_interval, setting_ms
from sync.publisher import DEFAULT_STREAM_MAX_BYTES, StreamLimits

REGION_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    region: str | None = Field(default=None, pattern=REGION_PATTERN)
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    config: Path | None = None
    nats_url: str | None = None
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    # JetStream domain of the hub (deploy/nats/hub.conf declares it); required where the
    # process connects through a leaf node, harmless on the hub itself.
    js_domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # The usage stream: replicas must not exceed the hub's JetStream servers (1 for one
    # server, 3 for the shipped 3-server hub); bytes bound its storage.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    stream_max_bytes: int = Field(default=DEFAULT_STREAM_MAX_BYTES, ge=1 << 20)
    identifier_secret: SecretStr | None = None
    node_token: SecretStr | None = None
    flush_interval: str = "100ms"
    snapshot_timeout: str = "2s"
    spill_path: Path | None = None
    inline_namespaces: bool = True
    max_inline_namespaces: int = Field(default=1000, ge=0)
    log_level: str = "info"
    # Envoy's rate limit service (gRPC, envoy.service.ratelimit.v3) on this port; off if unset.
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    grpc_max_message_bytes: int = Field(default=64 * 1024, ge=1024, le=4 * 1024 * 1024)
    # RateLimit-Policy / RateLimit (draft-ietf-httpapi-ratelimit-headers-10) beside the
    # RateLimit-Limit/-Remaining/-Reset triple, on HTTP checks and RLS answers.
    ratelimit_fields: bool = True
    # One line per check costs about a third of the node's throughput and floods the log at
    # production rates: off unless asked for. Rejected requests are logged either way.
    access_log: bool = False
    # Lease mode: a key unchecked this long gives its unused slice back.
    lease_idle: str = "2s"

    @property
    def stream_limits(self) -> StreamLimits:
        return StreamLimits(replicas=self.stream_replicas, max_bytes=self.stream_max_bytes)

    _intervals = field_validator("flush_interval", "snapshot_timeout",
                                 "lease_idle")(check_interval)

    @property
    def flush_interval_s(self) -> float:
        return setting_ms(self.flush_interval) / 1000

    @property
    def snapshot_timeout_s(self) -> float:
        return setting_ms(self.snapshot_timeout) / 1000

    def spill_file(self) -> Path:
        return self.spill_path or Path(".regionlimit") / f"spill-{self.region}.msgpack"
