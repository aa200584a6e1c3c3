"""Region node benchmark: prints figures, asserts nothing (not a test).

    .venv/bin/python bench/node_bench.py            # everything, ~2 minutes
    .venv/bin/python bench/node_bench.py --quick    # shorter runs
    .venv/bin/python bench/node_bench.py --only inproc,http,batch,memory
    .venv/bin/python bench/node_bench.py --profile  # cProfile of the in-process paths

1. In-process cost per check, per algorithm: CounterStore.check alone, with identifier
   hashing, and the full Checker.check on a decoded dict.
2. HTTP single checks at fixed concurrency against a real `regionlimit node` and against
   a raw-ASGI constant-JSON endpoint under the same uvicorn settings
   (region_node.server.uvicorn_config: uvloop + httptools, one process, access log off as
   is the node's default; REGIONLIMIT_ACCESS_LOG=true turns it on for both):
   req/s, the node/raw ratio, p50/p99 latency.
3. Batch throughput over HTTP (1000 checks per request, JSON in and out).
4. Memory per active key with 1M keys in a CounterStore (tracemalloc and RSS delta).

The load generator is wrk when installed (`apt-get install -y wrk`), else a Python
asyncio keep-alive client. With taskset, the server is pinned to CPU 0 and the load
generator to CPU 1 (on a 2-core machine they still share the memory bus and caches).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from region_node.counters import CounterStore  # noqa: E402
from region_node.node import RegionNode  # noqa: E402
from region_node.settings import NodeSettings  # noqa: E402
from sync.clock import wall_clock_ms  # noqa: E402
from sync.identifiers import IdentifierHasher  # noqa: E402
from sync.policy import build_policy  # noqa: E402
from tests.support.processes import (  # noqa: E402
    TEST_SECRET,
    base_env,
    free_port,
    region_node,
)

ALGORITHMS = ("fixed_window", "sliding_window", "token_bucket")
TARGETS = {"store_us": 1.5, "hashed_us": 2.5, "ratio": 0.6, "batch_cps": 250_000,
           "bytes_per_key": 400}
CONFIG = """
[namespaces.bench]
limit = 1000000000
duration = "1h"
algorithm = "sliding_window"
"""
SINGLE_CONNECTIONS = 64
BATCH_CONNECTIONS = 4
BATCH_SIZE = 1000
N_IDENTIFIERS = 10_000


# --- machine -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "loadavg": os.getloadavg()}


# --- 1. in process -------------------------------------------------------------------


def _per_call_us(run: Callable[[], int], repeats: int = 5) -> float:
    """Best of ``repeats``: microseconds per call of the loop ``run`` (which returns its
    count). The minimum, since interference only ever adds time."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter_ns()
        count = run()
        best = min(best, (time.perf_counter_ns() - started) / count / 1000)
    return best


def bench_inproc(n: int, profile: bool) -> dict[str, dict[str, float]]:
    hasher = IdentifierHasher(TEST_SECRET)
    identifiers = [f"sk_live_{i:08d}" for i in range(N_IDENTIFIERS)]
    hashes = [hasher.hash(identifier) for identifier in identifiers]
    rounds = max(1, n // N_IDENTIFIERS)
    stream_ids = identifiers * rounds
    stream_hashes = hashes * rounds
    now = wall_clock_ms()
    results: dict[str, dict[str, float]] = {}

    def empty_loop() -> int:
        for _ in stream_hashes:
            pass
        return len(stream_hashes)

    loop_us = _per_call_us(empty_loop)
    for algorithm in ALGORITHMS:
        policy = build_policy(limit=10**9, duration="1h", algorithm=algorithm)
        store = CounterStore()
        check = store.check
        hash_ = hasher.hash

        def store_only(check: Callable[..., Any] = check, policy: Any = policy) -> int:
            for key_hash in stream_hashes:
                check("bench", key_hash, policy, 1, now)
            return len(stream_hashes)

        def with_hashing(check: Callable[..., Any] = check, policy: Any = policy,
                         hash_: Callable[[str], str] = hash_) -> int:
            for identifier in stream_ids:
                check("bench", hash_(identifier), policy, 1, now)
            return len(stream_ids)

        node = RegionNode(NodeSettings(region="bench"), secret=TEST_SECRET)
        inline = {"limit": 10**9, "duration": "1h", "algorithm": algorithm}
        bodies = [{"namespace": "bench", "identifier": identifier, "cost": 1, **inline}
                  for identifier in identifiers] * rounds
        checker = node.checker.check

        def full_checker(checker: Callable[..., Any] = checker,
                         bodies: list[dict[str, Any]] = bodies) -> int:
            for body in bodies:
                checker(body)
            return len(bodies)

        results[algorithm] = {
            "store_us": _per_call_us(store_only),
            "hashed_us": _per_call_us(with_hashing),
            "checker_us": _per_call_us(full_checker),
            "loop_us": loop_us,
        }
        if profile:
            for name, run in (("CounterStore.check", store_only),
                              ("Checker.check", full_checker)):
                profiler = cProfile.Profile()
                profiler.runcall(run)
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
                print(f"\n--- cProfile: {name} ({algorithm}), by own time ---")
                print("\n".join(out.getvalue().splitlines()[6:20]))
    return results


# --- HTTP servers ---------------------------------------------------------------------


RAW_SERVER = """
import sys
import uvicorn
from region_node.settings import NodeSettings
from sync.http.serving import uvicorn_config

ACCESS_LOG = NodeSettings().access_log  # the same as the node under test

BODY = (b'{"allowed":true,"limit":1000000000,"remaining":999999999,'
        b'"reset_at":1800000000000,"retry_after_ms":null,"mode":"fast","source":"local"}')
HEADERS = [(b"content-type", b"application/json"),
           (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the body, as the node must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=int(sys.argv[1]),
                              log_level="info", access_log=ACCESS_LOG)).run()
"""


class Server:
    def __init__(self, args: list[str], env: dict[str, str], url: str, pin: bool) -> None:
        self.url = url
        self.log = Path(tempfile.mkstemp(prefix="node-bench-", suffix=".log")[1])
        if pin and shutil.which("taskset"):
            args = ["taskset", "-c", "0", *args]
        self.proc = subprocess.Popen(args, env=env, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.unlink(missing_ok=True)


def start_node(config: Path, pin: bool) -> Server:
    managed = region_node(region="bench", port=free_port(), config=config)
    return Server(managed.args, managed.env, managed.url, pin)


def start_raw(pin: bool) -> Server:
    port = free_port()
    env = base_env()
    env["PYTHONPATH"] = str(ROOT)
    return Server([sys.executable, "-c", RAW_SERVER, str(port)], env,
                  f"http://127.0.0.1:{port}", pin)


# --- load generators -----------------------------------------------------------------


SINGLE_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"namespace":"bench","identifier":"sk_live_' .. (counter % %(ids)d) ..
               '","cost":1}'
  return wrk.format(nil, "/v1/check", nil, body)
end
"""

FIXED_LUA = """
wrk.method = "POST"
wrk.path = "%(path)s"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*all")
f:close()
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: str, connections: int, seconds: int, pin: bool
            ) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua.name,
            url]
    if pin and shutil.which("taskset"):
        args = ["taskset", "-c", "1", *args]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    os.unlink(lua.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "non_2xx": float(errors.group(1)) if errors else 0.0,
            "socket_errors": 1.0 if socket_errors else 0.0}


async def _python_load(host: str, port: int, make_request: Callable[[int], bytes],
                       connections: int, seconds: float) -> dict[str, float]:
    """Keep-alive HTTP/1.1 over raw asyncio sockets: one request in flight per
    connection, Content-Length framed responses."""
    latencies: list[float] = []
    non_2xx = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal non_2xx
        reader, writer = await asyncio.open_connection(host, port)
        counter = index
        while time.perf_counter() < deadline:
            counter += connections
            request = make_request(counter)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 2"):
                non_2xx += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "non_2xx": float(non_2xx), "socket_errors": 0.0}


def run_python_load(url: str, path: str, body_for: Callable[[int], bytes],
                    connections: int, seconds: int, pin: bool) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")

    def make_request(counter: int) -> bytes:
        body = body_for(counter)
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    if pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    try:
        return asyncio.run(_python_load(host, int(port), make_request, connections, seconds))
    finally:
        if pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def single_body(counter: int) -> bytes:
    return (b'{"namespace":"bench","identifier":"sk_live_%d","cost":1}'
            % (counter % N_IDENTIFIERS))


def batch_body() -> bytes:
    return json.dumps({"checks": [
        {"namespace": "bench", "identifier": f"sk_live_{i}", "cost": 1}
        for i in range(BATCH_SIZE)]}, separators=(",", ":")).encode()


def load(tool: str, url: str, path: str, body_for: Callable[[int], bytes] | None,
         connections: int, seconds: int, pin: bool) -> dict[str, float]:
    if tool == "wrk":
        if body_for is None:
            script = SINGLE_LUA.replace("%(ids)d", str(N_IDENTIFIERS))
            return run_wrk(url, script, connections, seconds, pin)
        with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
            f.write(body_for(0))
        try:
            script = FIXED_LUA.replace("%(path)s", path).replace("%(body)s", f.name)
            return run_wrk(url + path, script, connections, seconds, pin)
        finally:
            os.unlink(f.name)
    return run_python_load(url, path, body_for or single_body, connections, seconds, pin)


# --- 2 and 3. over HTTP --------------------------------------------------------------


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the highest throughput (interference only ever slows a run down), with
    the median throughput of all runs beside it."""
    best = dict(max(runs, key=lambda r: r["rps"]))
    best["median_rps"] = statistics.median(r["rps"] for r in runs)
    best["runs"] = len(runs)
    return best


def bench_http(tool: str, seconds: int, rounds: int, pin: bool, only: set[str]
               ) -> dict[str, Any]:
    """Raw endpoint and node alternate, ``rounds`` times each, so that whatever else runs
    on the machine weighs on both alike; each keeps its best round."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG)
        raw = start_raw(pin) if "http" in only else None
        node = start_node(config, pin)
        try:
            if raw is not None:
                runs: dict[str, list[dict[str, float]]] = {"raw": [], "node": []}
                for server in (raw, node):  # warm up
                    load(tool, server.url, "/v1/check", None, SINGLE_CONNECTIONS, 2, pin)
                for _ in range(rounds):
                    for name, server in (("raw", raw), ("node", node)):
                        runs[name].append(load(tool, server.url, "/v1/check", None,
                                               SINGLE_CONNECTIONS, seconds, pin))
                results["raw"], results["node"] = _best(runs["raw"]), _best(runs["node"])
            if "batch" in only:
                body = batch_body()
                load(tool, node.url, "/v1/check/batch", lambda _: body, BATCH_CONNECTIONS,
                     2, pin)
                batch = _best([load(tool, node.url, "/v1/check/batch", lambda _: body,
                                    BATCH_CONNECTIONS, seconds, pin) for _ in range(rounds)])
                batch["checks_per_s"] = batch["rps"] * BATCH_SIZE
                batch["request_bytes"] = len(body)
                results["batch"] = batch
        finally:
            node.stop()
            if raw is not None:
                raw.stop()
    return results


# --- profile of the HTTP path --------------------------------------------------------


def profile_http(tool: str, seconds: int) -> None:
    """The node's app under uvicorn in this process, cProfile on the event loop thread,
    while the load generator sends single checks, then batches."""
    import threading

    import uvicorn

    from region_node.app import build_app
    from sync.http.serving import uvicorn_config

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG)
        node = RegionNode(NodeSettings(region="bench", config=config), secret=TEST_SECRET)
        port = free_port()
        server = uvicorn.Server(uvicorn_config(build_app(node), host="127.0.0.1", port=port,
                                               log_level="info", access_log=False))
        url = f"http://127.0.0.1:{port}"
        body = batch_body()
        stats: dict[str, cProfile.Profile] = {}

        def drive() -> None:
            while not server.started:
                time.sleep(0.05)
            for name, path, body_for, connections in (
                    ("single", "/v1/check", None, SINGLE_CONNECTIONS),
                    ("batch", "/v1/check/batch", lambda _: body, BATCH_CONNECTIONS)):
                profiler = stats[name] = cProfile.Profile()
                active.append(profiler)
                load(tool, url, path, body_for, connections, seconds, False)
                active.clear()
            server.should_exit = True

        active: list[cProfile.Profile] = []
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in saved:  # the access log goes to stdout, the rest of uvicorn's to stderr
            os.dup2(devnull, fd)
        threading.Thread(target=drive, daemon=True).start()

        async def serve() -> None:
            profiling: cProfile.Profile | None = None
            task = asyncio.ensure_future(server.serve())
            while not task.done():
                current = active[0] if active else None
                if current is not profiling:
                    if profiling is not None:
                        profiling.disable()
                    if current is not None:
                        current.enable()
                    profiling = current
                await asyncio.sleep(0.05)
            if profiling is not None:
                profiling.disable()

        try:
            import uvloop

            uvloop.run(serve())
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            os.close(devnull)
        for name, profiler in stats.items():
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            print(f"\n--- cProfile: node HTTP path, {name} checks, by own time ---")
            print("\n".join(out.getvalue().splitlines()[6:26]))


# --- 4. memory -----------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(keys: int) -> dict[str, float]:
    """Keys as the node creates them: hashed on arrival, one check each (cost 1, so each
    is dirty too), a clock that moves (1 ms per 10 checks)."""
    hasher = IdentifierHasher(TEST_SECRET)
    policy = build_policy(limit=100, duration="1m", algorithm="sliding_window")
    start = wall_clock_ms()

    def fill(store: CounterStore) -> None:
        check, hash_ = store.check, hasher.hash
        for i in range(keys):
            check("api", hash_(f"sk_live_{i}"), policy, 1, start + i // 10)

    gc.collect()
    before = _rss_bytes()
    store = CounterStore()
    fill(store)
    gc.collect()
    rss = (_rss_bytes() - before) / keys
    assert store.active_keys == keys
    del store
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    store = CounterStore()
    fill(store)
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    traced = sum(stat.size_diff for stat in snapshot.compare_to(base, "filename")) / keys
    # Without the publication outbox entry (after a flush the key is clean):
    dirty_set = sys.getsizeof(store._dirty) / keys
    return {"tracemalloc_bytes": traced, "rss_bytes": rss, "dirty_set_bytes": dirty_set,
            "keys": keys}


# --- report --------------------------------------------------------------------------


def verdict(value: float, target: float, *, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "ok"
    miss = (target - value) / target if higher_is_better else (value - target) / target
    return f"MISSED by {miss:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", default="inproc,http,batch,memory")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the in-process paths and the node's HTTP path")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python load generator even if wrk is installed")
    parser.add_argument("--memory-keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=0,
                        help="HTTP rounds per server (default 3, --quick 2)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    tool = "wrk" if shutil.which("wrk") and not args.python_load else "python-asyncio"
    seconds = 3 if args.quick else 5
    rounds = args.rounds or (2 if args.quick else 3)
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, "
          f"load average {info['loadavg'][0]:.2f} {info['loadavg'][1]:.2f}")
    print(f"load generator: {tool} ({'wrk -t1' if tool == 'wrk' else 'asyncio sockets'}); "
          + ("server pinned to CPU 0, load generator to CPU 1 (taskset): they still share "
             "the machine's 2 cores' caches and memory bus" if pin else
             "not pinned: server and load generator share the cores"))
    rows: list[tuple[str, str, str, str]] = []

    if "inproc" in only:
        n = 200_000 if args.quick else 1_000_000
        inproc = bench_inproc(n, args.profile)
        print(f"\n1. in-process, per check ({n} checks over {N_IDENTIFIERS} keys, best of 5; "
              f"a bare Python loop costs {inproc['fixed_window']['loop_us']:.3f} us)")
        print(f"   {'algorithm':<16}{'store':>10}{'+hash':>10}{'Checker':>10}")
        for algorithm, r in inproc.items():
            print(f"   {algorithm:<16}{r['store_us']:>8.3f}us{r['hashed_us']:>8.3f}us"
                  f"{r['checker_us']:>8.3f}us")
            rows.append((f"CounterStore.check {algorithm}", f"{r['store_us']:.3f} us",
                         f"<= {TARGETS['store_us']} us",
                         verdict(r["store_us"], TARGETS["store_us"], higher_is_better=False)))
            rows.append((f"  + hashing {algorithm}", f"{r['hashed_us']:.3f} us",
                         f"<= {TARGETS['hashed_us']} us",
                         verdict(r["hashed_us"], TARGETS["hashed_us"],
                                 higher_is_better=False)))
            rows.append((f"  Checker.check {algorithm}", f"{r['checker_us']:.3f} us", "-",
                         "-"))

    if only & {"http", "batch"}:
        http = bench_http(tool, seconds, rounds, pin, only)
        if "raw" in http:
            raw, node = http["raw"], http["node"]
            ratio = node["rps"] / raw["rps"]
            print(f"\n2. HTTP single checks, {SINGLE_CONNECTIONS} connections, best of "
                  f"{rounds} alternating {seconds}s rounds (median in brackets)")
            for name, r in (("raw ASGI", raw), ("node", node)):
                print(f"   {name:<10}{r['rps']:>8.0f} req/s ({r['median_rps']:.0f})   "
                      f"p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms   "
                      f"non-2xx {r['non_2xx']:.0f}")
            print(f"   node/raw = {ratio:.2f}")
            rows.append(("HTTP raw ASGI req/s", f"{raw['rps']:.0f}", "-", "-"))
            rows.append(("HTTP node req/s", f"{node['rps']:.0f}", "-", "-"))
            rows.append(("HTTP node/raw", f"{ratio:.2f}", f">= {TARGETS['ratio']}",
                         verdict(ratio, TARGETS["ratio"], higher_is_better=True)))
            rows.append(("HTTP node p50 / p99", f"{node['p50_ms']:.2f} / "
                         f"{node['p99_ms']:.2f} ms", "-", "-"))
        if "batch" in http:
            batch = http["batch"]
            print(f"\n3. HTTP batches of {BATCH_SIZE} ({batch['request_bytes']} bytes), "
                  f"{BATCH_CONNECTIONS} connections, best of {rounds} {seconds}s rounds")
            print(f"   {batch['rps']:.1f} req/s = {batch['checks_per_s']:,.0f} checks/s "
                  f"(median {batch['median_rps'] * BATCH_SIZE:,.0f})   "
                  f"p50 {batch['p50_ms']:.1f} ms   p99 {batch['p99_ms']:.1f} ms   "
                  f"non-2xx {batch['non_2xx']:.0f}")
            rows.append(("HTTP batch checks/s", f"{batch['checks_per_s']:,.0f}",
                         f">= {TARGETS['batch_cps']:,}",
                         verdict(batch["checks_per_s"], TARGETS["batch_cps"],
                                 higher_is_better=True)))

    if args.profile and only & {"http", "batch"}:
        profile_http(tool, seconds)

    if "memory" in only:
        keys = 100_000 if args.quick else args.memory_keys
        memory = bench_memory(keys)
        print(f"\n4. memory per active key, {keys:,} keys (sliding_window, each dirty)")
        print(f"   tracemalloc {memory['tracemalloc_bytes']:.0f} B/key   "
              f"RSS delta {memory['rss_bytes']:.0f} B/key   "
              f"(of which the dirty set {memory['dirty_set_bytes']:.0f} B/key)")
        rows.append(("memory per key (tracemalloc)", f"{memory['tracemalloc_bytes']:.0f} B",
                     f"<= {TARGETS['bytes_per_key']} B",
                     verdict(memory["tracemalloc_bytes"], TARGETS["bytes_per_key"],
                             higher_is_better=False)))
        rows.append(("memory per key (RSS delta)", f"{memory['rss_bytes']:.0f} B",
                     f"<= {TARGETS['bytes_per_key']} B",
                     verdict(memory["rss_bytes"], TARGETS["bytes_per_key"],
                             higher_is_better=False)))

    width = max(len(row[0]) for row in rows) if rows else 10
    print("\nsummary")
    print(f"   {'measure':<{width}}  {'value':>16}  {'target':>14}  verdict")
    for name, value, target, result in rows:
        print(f"   {name:<{width}}  {value:>16}  {target:>14}  {result}")
    if os.getloadavg()[0] > 1.0:
        print(f"\nnote: load average {os.getloadavg()[0]:.2f} at the end: other work shared "
              "the machine, figures are pessimistic")


if __name__ == "__main__":
    main()
