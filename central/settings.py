"""Central settings: environment (REGIONLIMIT_ prefix), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sync.durations import check_interval, setting_ms
from sync.interest import DEFAULT_BROADCAST_SHARE
from sync.partitions import DEFAULT_PARTITIONS, MAX_PARTITIONS
from sync.publisher import DEFAULT_STREAM_MAX_BYTES, StreamLimits


class CentralSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: SecretStr | None = None
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
    admin_token: SecretStr | None = None
    tick_interval: str = "100ms"
    # How often the leader checkpoints dirty components and buckets to the ledger.
    commit_interval: str = "1s"
    # Rows (components, and buckets, each) per checkpoint transaction.
    checkpoint_batch: int = Field(default=5000, ge=1, le=100_000)
    # Ingest stops fetching while this many dirty components + pending buckets are owed.
    max_dirty: int = Field(default=200_000, ge=1)
    # How long JetStream waits for the leader's ack of a usage message before it
    # redelivers it (set when the durable consumer is created).
    ack_wait: str = "60s"
    # Tests only: the checkpoint task kills its process (SIGKILL) at this point.
    test_crash_at: Literal["", "before_write", "after_write", "mid_batch"] = ""
    retention: str = "7d"
    # Usage rollups (central/billing/rollups.py): hour-level detail is kept this long, day-level
    # detail that long; monthly totals forever. Whole days / months are pruned at once.
    hourly_retention: str = "35d"
    daily_retention: str = "400d"
    rollup_interval: str = "10m"
    # A leader whose lease session stays silent this long (frozen, partitioned) is
    # deposed by a standby; the leader renews it every second.
    lease_timeout: str = "10s"
    log_level: str = "info"
    # Interest rule (sync/interest.py, central/totals_routing.py): a fixed-window key's
    # total goes to the nodes serving it once it reaches this share of its limit.
    broadcast_share: float = Field(default=DEFAULT_BROADCAST_SHARE, ge=0.0, le=1.0)
    # Key partitions (sync/partitions.py); identical on every node and replica.
    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1, le=MAX_PARTITIONS)
    # Lease mode (central/lease/; not the leader lease above): how long a node may spend a
    # slice from the moment it asked, and how long after that the authority waits before
    # taking back what an unheard-from node did not report using ("0" = never take it back).
    lease_ttl: str = "10s"
    lease_reclaim_after: str = "30s"

    @property
    def stream_limits(self) -> StreamLimits:
        return StreamLimits(replicas=self.stream_replicas, max_bytes=self.stream_max_bytes)

    _intervals = field_validator("tick_interval", "commit_interval", "retention",
                                 "rollup_interval", "lease_timeout", "ack_wait", "lease_ttl"
                                 )(check_interval)

    @field_validator("lease_timeout")
    @classmethod
    def _lease_timeout_range(cls, value: str) -> str:
        if not 3_000 <= setting_ms(value) <= 300_000:
            raise ValueError("the lease timeout must be between 3s and 5m")
        return value

    @field_validator("lease_reclaim_after")
    @classmethod
    def _zero_or_interval(cls, value: str) -> str:
        return value if value == "0" else check_interval(value)

    @field_validator("hourly_retention", "daily_retention")
    @classmethod
    def _at_least_a_day(cls, value: str) -> str:
        check_interval(value)
        if setting_ms(value) < 86_400_000:
            raise ValueError("a usage retention must be at least 1d")
        return value

    def seconds(self, name: str) -> float:
        return setting_ms(getattr(self, name)) / 1000

    @property
    def retention_ms(self) -> int:
        return setting_ms(self.retention)
