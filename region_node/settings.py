"""Region node settings: environment (REGIONLIMIT_ prefix), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sync.durations import check_interval, setting_ms

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
    identifier_secret: SecretStr | None = None
    node_token: SecretStr | None = None
    flush_interval: str = "100ms"
    snapshot_timeout: str = "2s"
    spill_path: Path | None = None
    inline_namespaces: bool = True
    max_inline_namespaces: int = Field(default=1000, ge=0)
    log_level: str = "info"
    # Lease mode: a key unchecked this long gives its unused slice back.
    lease_idle: str = "2s"

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
