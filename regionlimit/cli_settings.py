"""Settings of the operator commands (`regionlimit usage|namespaces|overrides`)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Where central is and the admin token; environment first, flags override.

    The token is best given in the environment: a flag shows in ``ps`` and shell history.
    """

    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    central_url: str = "http://127.0.0.1:8080"
    admin_token: SecretStr | None = None
