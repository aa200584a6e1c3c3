"""gRPC ShouldRateLimit (one descriptor) vs HTTP POST /v1/check on the same node, side by
side in one run: prints both throughputs. A benchmark, asserts nothing (not a test).

    .venv/bin/python bench/grpc_vs_http.py                 # 3 rounds of 10 s each
    .venv/bin/python bench/grpc_vs_http.py --seconds 5 --rounds 1 --connections 32

One `regionlimit node` process (uvloop + httptools for HTTP, grpc.aio for gRPC, one event
loop, one Checker) serves both. Rounds alternate HTTP and gRPC so drift in machine load
hits both alike; the best round of each is printed. Both load generators are Python in
this process (asyncio keep-alive HTTP/1.1 client from node_bench.py; grpc.aio with one
call in flight per "connection" spread over a few HTTP/2 channels), so on a small machine
the client's own cost is part of the figure for both. With taskset, the node is pinned to
CPU 0 and the client to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from node_bench import Server, run_python_load  # noqa: E402

from tests.support.processes import free_port, region_node  # noqa: E402
from tests.support.rls_client import OK, descriptor, request, stub  # noqa: E402

POLICY = """
[namespaces.bench]
limit = 1000000000
duration = "1h"
algorithm = "sliding_window"

[rls.domains.bench]
namespace = "bench"
"""
CHANNELS = 4


def http_body(counter: int) -> bytes:
    return b'{"namespace":"bench","identifier":"sk_live_%d","cost":1}' % (counter % 10_000)


async def grpc_load(target: str, connections: int, seconds: float) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [stub(channel) for channel in channels]
    requests = [request("bench", [descriptor(("api_key", f"sk_live_{i}"))])
                for i in range(10_000)]
    latencies: list[float] = []
    not_ok = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal not_ok
        rls = stubs[index % CHANNELS]
        counter = index
        while time.perf_counter() < deadline:
            counter += connections
            started = time.perf_counter()
            answer = await rls.ShouldRateLimit(requests[counter % 10_000])
            latencies.append(time.perf_counter() - started)
            if answer.overall_code != OK:
                not_ok += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {"rps": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "non_ok": float(not_ok)}


def run_grpc(target: str, connections: int, seconds: int, pin: bool) -> dict[str, float]:
    if pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    try:
        return asyncio.run(grpc_load(target, connections, seconds))
    finally:
        if pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "node.toml"
        config.write_text(POLICY)
        grpc_port = free_port()
        managed = region_node(region="bench", port=free_port(), config=config,
                              extra_env={"REGIONLIMIT_GRPC_PORT": str(grpc_port)})
        server = Server(managed.args, managed.env, managed.url, pin)
        try:
            target = f"127.0.0.1:{grpc_port}"
            run_grpc(target, 4, 1, pin)  # warm-up: channels, code paths
            runs: dict[str, list[dict[str, Any]]] = {"http": [], "grpc": []}
            for index in range(args.rounds):
                runs["http"].append(run_python_load(server.url, "/v1/check", http_body,
                                                    args.connections, args.seconds, pin))
                runs["grpc"].append(run_grpc(target, args.connections, args.seconds, pin))
                print(f"round {index + 1}: http {runs['http'][-1]['rps']:,.0f}/s  "
                      f"grpc {runs['grpc'][-1]['rps']:,.0f}/s", flush=True)
        finally:
            server.stop()
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.connections} in flight, {args.seconds}s per round, best of {args.rounds}")
    best = {name: max(results, key=lambda r: r["rps"]) for name, results in runs.items()}
    for name, label in (("http", "HTTP POST /v1/check"),
                        ("grpc", "gRPC ShouldRateLimit, 1 descriptor")):
        b = best[name]
        print(f"{label:38s} {b['rps']:>10,.0f} checks/s   p50 {b['p50_ms']:.2f} ms   "
              f"p99 {b['p99_ms']:.2f} ms")
    print(f"{'gRPC / HTTP':38s} {best['grpc']['rps'] / best['http']['rps']:>10.2f}")


if __name__ == "__main__":
    main()
