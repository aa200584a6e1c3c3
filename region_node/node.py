"""A region node: its parts, their lifecycle, and its readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
from typing import Any

import grpc

from region_node.checker import Checker
from region_node.consistent import ConsistentClient
from region_node.counters import CounterStore
from region_node.http import CheckEndpoints
from region_node.lease import LeaseClient
from region_node.metrics import NodeMetrics
from region_node.policies import PolicyResolver
from region_node.policy_file import load_policy_file
from region_node.rls import RateLimitService, start_rls_server
from region_node.rls_rules import load_rls_rules
from region_node.settings import NodeSettings
from region_node.sync_loop import NodeSync
from sync.clock import Clock, wall_clock_ms
from sync.connection import NatsOptions
from sync.durations import setting_ms
from sync.identifiers import IdentifierHasher

log = logging.getLogger("regionlimit.node")
EVICTION_INTERVAL_S = 1.0


def make_node_id(region: str) -> str:
    """Unique per process start: a restarted node never reuses its former component. One
    NATS subject token (totals addressed to the node travel on
    ``regionlimit.totals.node.<id>``), so the host name is cut to letters, digits,
    ``_`` and ``-`` (the region already is)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0][:32]) or "host"
    return f"{region}-{host}-{secrets.token_hex(4)}"


class RegionNode:
    def __init__(self, settings: NodeSettings, *, secret: str, clock: Clock = wall_clock_ms
                 ) -> None:
        assert settings.region is not None
        self.settings = settings
        self.region = settings.region
        self.node_id = make_node_id(settings.region)
        self.clock = clock
        file_namespaces = load_policy_file(settings.config) if settings.config else {}
        self.store = CounterStore(publishes=settings.nats_url is not None)
        self.resolver = PolicyResolver(
            file_namespaces=file_namespaces, inline_enabled=settings.inline_namespaces,
            max_inline_namespaces=settings.max_inline_namespaces)
        self.hasher = IdentifierHasher(secret)
        self.metrics = NodeMetrics(settings.region)
        self.metrics.gauges["active_keys"] = lambda: self.store.active_keys
        self.metrics.gauges["dirty_counters"] = lambda: self.store.unpublished
        self.metrics.counters["evictions"] = 0
        self.checker = Checker(store=self.store, resolver=self.resolver, hasher=self.hasher,
                               metrics=self.metrics, clock=clock)
        token = settings.node_token.get_secret_value() if settings.node_token else None
        self.endpoints = CheckEndpoints(self.checker, node_token=token,
                                        ietf_ratelimit_fields=settings.ratelimit_fields)
        self.rls: RateLimitService | None = None
        self.grpc_port: int | None = None  # the bound port once started (settings may say 0)
        self._grpc_server: grpc.aio.Server | None = None
        if settings.grpc_port is not None:
            self.rls = RateLimitService(self.checker, load_rls_rules(settings.config),
                                        node_token=token,
                                        ietf_ratelimit_fields=settings.ratelimit_fields)
        self._tasks: list[asyncio.Task[Any]] = []
        self.sync: NodeSync | None = None
        self.leases: LeaseClient | None = None
        if settings.nats_url:
            self.sync = NodeSync(
                options=NatsOptions(url=settings.nats_url, creds=settings.nats_creds,
                                    tls_ca=settings.nats_tls_ca, name=self.node_id,
                                    js_domain=settings.js_domain),
                node_id=self.node_id, region=self.region, store=self.store,
                resolver=self.resolver, metrics=self.metrics, clock=clock,
                flush_interval=settings.flush_interval_s,
                snapshot_timeout=settings.snapshot_timeout_s, spill_path=settings.spill_file(),
                stream_limits=settings.stream_limits)
            self.checker.authority = ConsistentClient(
                link=self.sync.link, node_id=self.node_id, region=self.region,
                store=self.store, metrics=self.metrics, clock=clock)
            self.leases = self.checker.leases = LeaseClient(
                link=self.sync.link, node_id=self.node_id, region=self.region,
                store=self.store, metrics=self.metrics, clock=clock,
                idle_s=setting_ms(settings.lease_idle) / 1000)

    async def start(self) -> None:
        if self.sync is None:
            log.warning("node %s running standalone (no REGIONLIMIT_NATS_URL): limits are "
                        "enforced by this process alone", self.node_id)
        else:
            await self.sync.start()
        if self.rls is not None:
            assert self.settings.grpc_port is not None
            # On the same event loop as HTTP: one Checker, no locks between the two.
            self._grpc_server, self.grpc_port = await start_rls_server(
                self.rls, host=self.settings.host, port=self.settings.grpc_port,
                max_message_bytes=self.settings.grpc_max_message_bytes)
        if self.leases is not None:
            self._tasks.append(asyncio.create_task(self.leases.run(), name="leases"))
        self._tasks.append(asyncio.create_task(self._evict_forever(), name="evict"))

    async def stop(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
            self._grpc_server = None
        if self.leases is not None:
            # Before the final flush, while NATS is still up: unused slices go back so
            # other nodes can spend them; the usage they admitted goes out with the flush.
            await self.leases.stop()
        if self.sync is not None:
            await self.sync.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _evict_forever(self) -> None:
        while True:
            await asyncio.sleep(EVICTION_INTERVAL_S)
            self.metrics.counters["evictions"] += self.store.evict(self.clock())

    def readiness(self) -> dict[str, Any]:
        if self.sync is None:
            ready, state, reason = True, "standalone", "no NATS configured"
        else:
            ready, state, reason = self.sync.ready.is_set(), self.sync.state(), self.sync.reason
        return {"ready": ready, "sync": state, "reason": reason, "region": self.region,
                "node_id": self.node_id}
