"""What a round trip costs the client side, per event-loop transport: asyncio Protocol,
anyio streams over asyncio, Trio streams.

Why the asyncio client is a native Protocol rather than anyio streams: an echo
server in a child process answers 64-byte frames; each transport does `--count`
round trips, one at a time, then a window of `--window` frames per write (the shape
of a pipelined client's traffic), alternating for `--rounds` rounds.  Reported: the
median microseconds per round trip (one at a time) and per frame (windowed).

    python perf/echo_transports.py --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import anyio
import trio

FRAME = b"x" * 64
SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (data := c.recv(1 << 16)):
        c.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.want = 0
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.want and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def asyncio_protocol(port: int, count: int, window: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_Echo, "127.0.0.1", port)

    async def exchange(data: bytes) -> None:
        proto.want, proto.got = len(data), 0
        proto.waiter = loop.create_future()
        transport.write(data)
        await proto.waiter
    t = time.perf_counter()
    for _ in range(count):
        await exchange(FRAME)
    one = (time.perf_counter() - t) / count
    t = time.perf_counter()
    for _ in range(count // window):
        await exchange(FRAME * window)
    many = (time.perf_counter() - t) / (count // window * window)
    transport.close()
    return one, many


async def stream_echo(stream, count: int, window: int) -> tuple[float, float]:
    async def exchange(data: bytes) -> None:
        await stream.send(data)
        got = 0
        while got < len(data):
            got += len(await stream.receive(1 << 16))
    t = time.perf_counter()
    for _ in range(count):
        await exchange(FRAME)
    one = (time.perf_counter() - t) / count
    t = time.perf_counter()
    for _ in range(count // window):
        await exchange(FRAME * window)
    many = (time.perf_counter() - t) / (count // window * window)
    await stream.aclose()
    return one, many


async def anyio_stream(port: int, count: int, window: int) -> tuple[float, float]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    return await stream_echo(stream, count, window)


async def trio_stream(port: int, count: int, window: int) -> tuple[float, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)

    class Adapter:   # trio's send_all/receive_some under anyio's names
        send = stream.send_all
        receive = stream.receive_some
        aclose = stream.aclose
    return await stream_echo(Adapter, count, window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        runs: dict[str, list[tuple[float, float]]] = {}
        kinds = {
            "asyncio Protocol": lambda: asyncio.run(asyncio_protocol(port, args.count,
                                                                     args.window)),
            "anyio stream (asyncio)": lambda: anyio.run(anyio_stream, port, args.count,
                                                        args.window, backend="asyncio"),
            "trio stream": lambda: trio.run(trio_stream, port, args.count, args.window),
        }
        for r in range(args.rounds):
            names = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for name in names:
                runs.setdefault(name, []).append(kinds[name]())
        for name, figures in runs.items():
            one = statistics.median(f[0] for f in figures) * 1e6
            many = statistics.median(f[1] for f in figures) * 1e6
            print(f"{name:24s} one at a time {one:6.1f} us/round trip   "
                  f"window of {args.window}: {many:5.2f} us/frame")
    finally:
        server.kill()


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
