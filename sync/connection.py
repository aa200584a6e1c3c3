"""A NATS connection that keeps trying: the first connect is retried with backoff (nats.py
gives up on it), later reconnects are nats.py's own, and both are reported."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger("regionlimit.nats")
Callback = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsOptions:
    url: str
    creds: Path | None = None
    tls_ca: Path | None = None
    name: str = "regionlimit"
    # The hub's JetStream domain (REGIONLIMIT_JS_DOMAIN): through a leaf node, the JetStream
    # API is only reachable under $JS.<domain>.API, so clients must name the domain.
    js_domain: str | None = None


def redact(url: str) -> str:
    """The URL without user and password: credentials never reach a log."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _noop() -> None:
    return None


class NatsLink:
    def __init__(self, options: NatsOptions, *, on_connect: Callback = _noop,
                 on_disconnect: Callback = _noop, max_backoff: float = 2.0) -> None:
        self.options = options
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._max_backoff = max_backoff
        self.nc: Client | None = None
        self.connected = asyncio.Event()

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def run(self) -> None:
        """Connect, retrying until it works; returns once connected the first time."""
        backoff = 0.05
        while True:
            try:
                self.nc = await nats.connect(
                    self.options.url, name=self.options.name,
                    user_credentials=str(self.options.creds) if self.options.creds else None,
                    tls=self._tls(), connect_timeout=2, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    error_cb=self._error)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning("NATS %s unreachable (%s); retrying", redact(self.options.url),
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                continue
            log.info("connected to NATS %s", redact(self.options.url))
            self.connected.set()
            await self._on_connect()
            return

    def jetstream(self) -> JetStreamContext:
        """A JetStream context in the configured domain (connected links only)."""
        assert self.nc is not None
        return self.nc.jetstream(domain=self.options.js_domain)

    def _tls(self) -> ssl.SSLContext | None:
        if self.options.tls_ca is None:
            return None
        return ssl.create_default_context(cafile=str(self.options.tls_ca))

    async def _disconnected(self) -> None:
        self.connected.clear()
        log.warning("disconnected from NATS")
        await self._on_disconnect()

    async def _reconnected(self) -> None:
        log.info("reconnected to NATS")
        self.connected.set()
        await self._on_connect()

    async def _error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", type(exc).__name__)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
