"""Latency RateLimitMiddleware adds to a trivial FastAPI endpoint: p50 and p99.

    python -m bench.middleware_overhead [--requests 5000] [--url http://127.0.0.1:8081]

What is measured: one request at a time, in-process through httpx.ASGITransport, to
`GET /ping` returning `{"ok": true}`, once bare and once behind the middleware. The
middleware asks a real region node over HTTP on loopback (a pooled keep-alive connection):
started here (`regionlimit node`, standalone) unless --url names one. Every request is
allowed (limit far above the request count), so the figure is the allow path: identifier
extraction, one check round trip to the node, RateLimit-* headers. Rounds of bare and
limited requests alternate, so drift in the machine affects both alike. A direct
`AsyncRegionLimitClient.check` is timed as well, to show how much of the overhead is the
round trip to the node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from fastapi import FastAPI

from regionlimit_client.client import AsyncRegionLimitClient
from regionlimit_client.middleware import RateLimitMiddleware
from tests.support.processes import region_node

ROUNDS = 10
WARMUP = 200


def make_app(limiter_url: str | None) -> FastAPI:
    app = FastAPI()
    if limiter_url is not None:
        app.add_middleware(
            RateLimitMiddleware,
            url=limiter_url,
            namespace=f"bench-{uuid.uuid4().hex[:8]}",
            limit=1_000_000_000,
            duration="1h",
            identifier_header="x-api-key",
        )

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def timed(call: Callable[[], Awaitable[object]], count: int, into: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter_ns()
        await call()
        into.append((time.perf_counter_ns() - started) / 1000)


async def measure(url: str, requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"bare": [], "middleware": [], "client.check": []}
    headers = {"x-api-key": "sk_bench"}
    bare_app, limited_app = make_app(None), make_app(url)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_app), base_url="http://b") as bare,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=limited_app), base_url="http://l"
        ) as limited,
        AsyncRegionLimitClient(url, timeout=1.0) as client,
    ):
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "bare": lambda: bare.get("/ping", headers=headers),
            "middleware": lambda: limited.get("/ping", headers=headers),
            "client.check": lambda: client.check(
                "bench-client", "sk_bench", limit=1_000_000_000, duration="1h"
            ),
        }
        for name, call in calls.items():
            await timed(call, WARMUP, [])
            response = await limited.get("/ping", headers=headers)
            assert response.status_code == 200 and "ratelimit-limit" in response.headers, name
        per_round = max(1, requests // ROUNDS)
        for _ in range(ROUNDS):
            for name, call in calls.items():
                await timed(call, per_round, samples[name])
    return samples


def report(samples: dict[str, list[float]], url: str) -> str:
    p50s = {name: statistics.median(values) for name, values in samples.items()}
    p99s = {name: p99(values) for name, values in samples.items()}
    lines = [
        f"regionlimit middleware overhead: {len(samples['bare'])} requests per variant, "
        f"sequential, in-process app, node at {url} (loopback)",
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| variant | p50 (us) | p99 (us) |",
        "| --- | ---: | ---: |",
    ]
    for name in samples:
        lines.append(f"| {name} | {p50s[name]:.0f} | {p99s[name]:.0f} |")
    lines.append(
        f"| overhead (middleware - bare) | {p50s['middleware'] - p50s['bare']:.0f} "
        f"| {p99s['middleware'] - p99s['bare']:.0f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="per variant")
    parser.add_argument("--url", help="a running region node (default: start one)")
    args = parser.parse_args()
    node = None
    url = args.url
    if url is None:
        spill = Path(tempfile.mkdtemp(prefix="regionlimit-bench-")) / "spill.msgpack"
        node = region_node(region="bench", extra_env={"REGIONLIMIT_SPILL_PATH": str(spill)})
        url = node.start(ready_path="/readyz").url
    try:
        print(report(asyncio.run(measure(url, args.requests)), url))
    finally:
        if node is not None:
            node.stop()


if __name__ == "__main__":
    main()
