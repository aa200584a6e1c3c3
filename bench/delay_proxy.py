"""A TCP proxy that delays every byte by a fixed one-way latency: a WAN link in a box.

    .venv/bin/python -m bench.delay_proxy --listen 7422 --target 127.0.0.1:7421 --delay-ms 40

Used by bench/lease.py between each region's NATS leaf node and the hub, so that a
request from a region to central takes 2 x delay more than on loopback. Each direction of
each connection keeps its byte order: chunks are stamped when read and written once their
delay has passed. Bandwidth is not limited. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

HOST = "127.0.0.1"
CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay_s, data))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await sender
        writer.close()


class DelayProxy:
    """Forwards 127.0.0.1:``listen_port`` to ``target`` with ``delay_ms`` each way."""

    def __init__(self, *, target: tuple[str, int], delay_ms: float, listen_port: int = 0
                 ) -> None:
        self.target = target
        self.delay_s = delay_ms / 1000
        self.listen_port = listen_port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, HOST, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def _connection(self, client_reader: asyncio.StreamReader,
                          client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer, self.delay_s),
                             _pipe(upstream_reader, client_writer, self.delay_s))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    proxy = DelayProxy(target=(host or HOST, int(port)), delay_ms=args.delay_ms,
                       listen_port=args.listen)
    bound = await proxy.start()
    print(f"127.0.0.1:{bound} -> {args.target}, {args.delay_ms} ms each way", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, default=0)
    parser.add_argument("--target", required=True, help="host:port of the real server")
    parser.add_argument("--delay-ms", type=float, required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
