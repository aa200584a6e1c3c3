"""Central settings: environment (REGIONLIMIT_ prefix), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from region_node.settings import check_interval
from sync.durations import parse_duration


class CentralSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: SecretStr | None = None
    nats_url: str | None = None
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    identifier_secret: SecretStr | None = None
    admin_token: SecretStr | None = None
    tick_interval: str = "100ms"
    commit_interval: str = "1s"
    retention: str = "7d"
    log_level: str = "info"

    _intervals = field_validator("tick_interval", "commit_interval", "retention")(
        check_interval)

    def seconds(self, name: str) -> float:
        return parse_duration(getattr(self, name)).ms / 1000

    @property
    def retention_ms(self) -> int:
        return parse_duration(self.retention).ms
