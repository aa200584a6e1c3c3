"""gRPC ShouldRateLimit (one descriptor) vs HTTP POST /v1/check on the same node, side by
side in one run: prints both throughputs. A benchmark, asserts nothing (not a test).

    .venv/bin/python bench/grpc_vs_http.py                 # 3 rounds of 10 s each
    .venv/bin/python bench/grpc_vs_http.py --seconds 5 --rounds 1 --in-flight 32
    .venv/bin/python bench/grpc_vs_http.py --python-load   # no h2load: Python generators

One `regionlimit node` process (uvloop + httptools for HTTP, grpc.aio for gRPC, one event
loop, one Checker) serves both. Rounds alternate HTTP and gRPC so drift in machine load hits
both alike; the best round of each is printed.

The load generator is h2load (Debian `nghttp2-client`) when installed: one native tool for
both protocols (HTTP/1.1 keep-alive for /v1/check, HTTP/2 streams for gRPC), so the figures
are the server's and not a Python client's. Every request carries the same body (h2load
repeats one), so both protocols check one key. A third row measures the ceiling of the gRPC
stack itself: a grpc.aio server in its own process that answers every call with a constant
response, under the same load. Without h2load, both load generators are Python in this
process (the asyncio HTTP/1.1 client of node_bench.py; grpc.aio channels), whose own cost is
then part of the figures. With taskset, servers are pinned to CPU 0 and the client to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc  # noqa: E402
from node_bench import Server, _ms, run_python_load  # noqa: E402

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
CHANNELS = 4  # HTTP/2 connections for gRPC; in-flight calls are spread over them
RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
HTTP_BODY = b'{"namespace":"bench","identifier":"sk_live_1","cost":1}'


def http_body(counter: int) -> bytes:
    return b'{"namespace":"bench","identifier":"sk_live_%d","cost":1}' % (counter % 10_000)


def grpc_frame() -> bytes:
    """One gRPC message on the wire: uncompressed flag, 4-byte length, the protobuf."""
    message: bytes = request("bench", [descriptor(("api_key", "sk_live_1"))]).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


# -- h2load -----------------------------------------------------------------------------

def run_h2load(url: str, body: bytes, headers: list[str], *, h1: bool, in_flight: int,
               seconds: int, pin: bool) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(delete=False) as file:
        file.write(body)
    connections = in_flight if h1 else CHANNELS
    args = ["h2load", f"--duration={seconds}", "--warm-up-time=1", "-c", str(connections),
            "-m", "1" if h1 else str(max(1, in_flight // CHANNELS)), "-d", file.name]
    if h1:
        args.append("--h1")
    for header in headers:
        args += ["-H", header]
    args.append(url)
    if pin and shutil.which("taskset"):
        args = ["taskset", "-c", "1", *args]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    os.unlink(file.name)
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: .* (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    latency = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    assert done and latency, out
    return {"rps": rps, "mean_ms": _ms(latency.group(3)), "max_ms": _ms(latency.group(2)),
            "failed": float(int(done.group(2)) + int(done.group(3)))}


def h2load_http(url: str, in_flight: int, seconds: int, pin: bool) -> dict[str, float]:
    return run_h2load(url + "/v1/check", HTTP_BODY, ["content-type: application/json"],
                      h1=True, in_flight=in_flight, seconds=seconds, pin=pin)


def h2load_grpc(target: str, in_flight: int, seconds: int, pin: bool) -> dict[str, float]:
    # h2load counts a 200 as success; a gRPC error would still be a 200 with an error
    # status in the trailers, so the Python generator's non-OK count is the check for that.
    return run_h2load(f"http://{target}{RLS_PATH}", grpc_frame(),
                      ["content-type: application/grpc", "te: trailers"],
                      h1=False, in_flight=in_flight, seconds=seconds, pin=pin)


# -- Python load generators (no h2load) -------------------------------------------------

async def grpc_load(target: str, in_flight: int, seconds: float) -> dict[str, float]:
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
            counter += in_flight
            started = time.perf_counter()
            answer = await rls.ShouldRateLimit(requests[counter % 10_000])
            latencies.append(time.perf_counter() - started)
            if answer.overall_code != OK:
                not_ok += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(in_flight)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {"rps": len(latencies) / elapsed,
            "mean_ms": sum(latencies) / len(latencies) * 1000,
            "max_ms": latencies[-1] * 1000, "failed": float(not_ok)}


def python_grpc(target: str, in_flight: int, seconds: int, pin: bool) -> dict[str, float]:
    if pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    try:
        return asyncio.run(grpc_load(target, in_flight, seconds))
    finally:
        if pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def python_http(url: str, in_flight: int, seconds: int, pin: bool) -> dict[str, float]:
    result = run_python_load(url, "/v1/check", http_body, in_flight, seconds, pin)
    return {"rps": result["rps"], "mean_ms": result["p50_ms"], "max_ms": result["p99_ms"],
            "failed": result.get("non_2xx", 0.0)}


# -- the grpc.aio ceiling: a constant answer ---------------------------------------------

class ConstantAnswer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    ANSWER = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.Code.OK)

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        return self.ANSWER


async def serve_constant(port: int) -> None:
    import uvloop  # the node's loop too

    del uvloop
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(ConstantAnswer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def start_constant(port: int, pin: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "--constant-grpc-server", str(port)]
    if pin and shutil.which("taskset"):
        args = ["taskset", "-c", "0", *args]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 20
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        channel.close()
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python load generators even where h2load exists")
    parser.add_argument("--constant-grpc-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.constant_grpc_server:
        import uvloop

        uvloop.run(serve_constant(args.constant_grpc_server))
        return
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    native = shutil.which("h2load") is not None and not args.python_load
    http_load, grpc_load_ = (h2load_http, h2load_grpc) if native else (python_http, python_grpc)
    tool = "h2load" if native else "Python (asyncio HTTP/1.1 client, grpc.aio)"
    runs: dict[str, list[dict[str, float]]] = {"http": [], "grpc": [], "ceiling": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "node.toml"
        config.write_text(POLICY)
        grpc_port = free_port()
        managed = region_node(region="bench", port=free_port(), config=config,
                              extra_env={"REGIONLIMIT_GRPC_PORT": str(grpc_port)})
        server = Server(managed.args, managed.env, managed.url, pin)
        try:
            target = f"127.0.0.1:{grpc_port}"
            python_grpc(target, 4, 1, pin)  # warm-up: channels, code paths
            for index in range(args.rounds):
                runs["http"].append(http_load(server.url, args.in_flight, args.seconds, pin))
                runs["grpc"].append(grpc_load_(target, args.in_flight, args.seconds, pin))
                print(f"round {index + 1}: http {runs['http'][-1]['rps']:,.0f}/s  "
                      f"grpc {runs['grpc'][-1]['rps']:,.0f}/s", flush=True)
        finally:
            server.stop()
    ceiling_port = free_port()
    constant = start_constant(ceiling_port, pin)
    try:
        for _ in range(args.rounds):
            runs["ceiling"].append(grpc_load_(f"127.0.0.1:{ceiling_port}", args.in_flight,
                                              args.seconds, pin))
    finally:
        constant.terminate()
        constant.wait()
    load = os.getloadavg()
    print(f"\nload generator: {tool}; {args.in_flight} in flight, {args.seconds}s per round, "
          f"best of {args.rounds}; load average at the end {load[0]:.2f} {load[1]:.2f}")
    best = {name: max(results, key=lambda r: r["rps"]) for name, results in runs.items()}
    for name, label in (("http", "node: HTTP POST /v1/check"),
                        ("grpc", "node: gRPC ShouldRateLimit, 1 descriptor"),
                        ("ceiling", "grpc.aio alone, constant answer")):
        b = best[name]
        print(f"{label:42s} {b['rps']:>9,.0f} calls/s   mean {b['mean_ms']:.2f} ms   "
              f"max {b['max_ms']:.2f} ms   failed {b['failed']:.0f}")
    print(f"{'node gRPC / node HTTP':42s} {best['grpc']['rps'] / best['http']['rps']:>9.2f}")


if __name__ == "__main__":
    main()
