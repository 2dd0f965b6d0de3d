"""A frame-aware user-space TCP proxy for the peer-to-peer path.

The kernel here has no netem, so message delay, loss and duplication are made in
user space.  Each replica gets a ``--cluster`` map in which every *peer* address is
a proxy port; the proxy forwards to the real replica.  Since a replica sends to a peer
only on the connection it dialled, the proxy for the directed link i->j carries
exactly i's messages to j (plus j's one "welcome" frame back), so faults are
per-direction.

Peer frames are ``u32 big-endian length | CBOR body``: the proxy reassembles whole
frames and then delays, drops or duplicates *whole frames*, which keeps the byte stream
well framed (a lost or duplicated message, never a corrupt one).  The ``cut`` fault is
the byte-level one: it forwards part of a frame and then closes both connections, as
a real network failure mid-message would.  ``block`` drops every frame (hello
included) of the link: a silent one-way partition.  A connection whose first frame is
a client hello (``["client"]``, a client following a redirect to a proxy address) is
passed through untouched.

Run as a process (one per namespace, so its sockets live there)::

    python proxy.py '<json: {"links": [{"name": "1->2", "listen": [host, port],
                                        "target": [host, port]}, ...], "seed": 1}>'

It prints ``{"ready": true}`` once listening, then reads one JSON command per line on
stdin and answers each with one JSON line on stdout:

* ``{"cmd": "set", "links": ["1->2"] | "*", "delay_ms": 0, "jitter_ms": 0,
  "drop": 0.0, "dup": 0.0, "cut": 0.0, "block": false}`` - replace the links' faults;
* ``{"cmd": "clear"}`` - no faults anywhere;
* ``{"cmd": "stats"}`` - counters per link;
* ``{"cmd": "quit"}``.

It exits when stdin closes (its controller died), so it can never outlive a test.
"""
from __future__ import annotations

import heapq
import json
import random
import struct
import sys

import cbor2
import trio

_LEN = struct.Struct(">I")
FRAME_MAX = 64 << 20


class Link:
    def __init__(self, name, listen, target):
        self.name = name
        self.listen = tuple(listen)
        self.target = tuple(target)
        self.faults = {}
        self.conns: set = set()
        self.stats = {"connections": 0, "client_connections": 0, "frames": 0, "dropped": 0,
                      "duplicated": 0, "delayed": 0, "cut": 0, "blocked": 0}

    def get(self, name, default=0):
        return self.faults.get(name, default)


class Proxy:
    def __init__(self, links, seed=0):
        self.links = {link["name"]: Link(link["name"], link["listen"], link["target"])
                      for link in links}
        self.rng = random.Random(seed)

    async def serve_link(self, link: Link, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(link.listen[1], host=link.listen[0])
        task_status.started()
        await trio.serve_listeners(lambda s: self.handle(link, s), listeners)

    async def handle(self, link: Link, down: trio.SocketStream):
        link.stats["connections"] += 1
        conn = {"scope": None}
        link.conns.add(id(conn))
        try:
            with trio.CancelScope() as scope:
                conn["scope"] = scope
                try:
                    up = await trio.open_tcp_stream(*link.target)
                except OSError:
                    return
                async with up:
                    buf = bytearray()
                    first = await self._read_frame(down, buf)
                    if first is None:
                        return
                    if self._is_client_hello(first):
                        link.stats["client_connections"] += 1
                        await up.send_all(first + bytes(buf))
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pipe, down, up, nursery.cancel_scope)
                            nursery.start_soon(self._pipe, up, down, nursery.cancel_scope)
                        return
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, up, down, nursery.cancel_scope)
                        nursery.start_soon(self._forward_peer, link, down, up, first, buf,
                                           nursery.cancel_scope)
        except Exception:  # noqa: BLE001 - one connection (or a group of its errors)
            pass           # must never take the proxy down
        finally:
            link.conns.discard(id(conn))
            await trio.aclose_forcefully(down)

    @staticmethod
    def _is_client_hello(frame: bytes) -> bool:
        try:
            body = cbor2.loads(frame[4:])
        except Exception:
            return False
        return body == ["client"]

    @staticmethod
    async def _read_frame(stream, buf: bytearray):
        """One whole frame (header included) from `stream`, leftovers stay in `buf`."""
        while True:
            if len(buf) >= 4:
                n = _LEN.unpack_from(buf)[0]
                if n > FRAME_MAX:
                    raise trio.BrokenResourceError("oversized frame")
                if len(buf) >= 4 + n:
                    frame = bytes(buf[:4 + n])
                    del buf[:4 + n]
                    return frame
            data = await stream.receive_some(1 << 16)
            if not data:
                return None
            buf += data

    @staticmethod
    async def _pipe(src, dst, scope):
        try:
            while True:
                data = await src.receive_some(1 << 16)
                if not data:
                    break
                await dst.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _forward_peer(self, link: Link, down, up, first: bytes, buf: bytearray, scope):
        """Frames down->up with the link's faults; a heap orders them by release time."""
        heap: list = []
        order = 0
        wake = trio.Event()
        rng = self.rng
        last_due = 0.0

        async def sender():
            nonlocal wake
            while True:
                if not heap:
                    await wake.wait()
                    wake = trio.Event()
                    continue
                due, _, frame, cut = heap[0]
                now = trio.current_time()
                if due > now:
                    with trio.move_on_at(due):
                        await wake.wait()
                    wake = trio.Event()
                    continue
                heapq.heappop(heap)
                if cut:
                    link.stats["cut"] += 1
                    await up.send_all(frame[:rng.randint(1, len(frame) - 1)])
                    scope.cancel()
                    return
                await up.send_all(frame)

        async def reader(nursery):
            nonlocal order, last_due
            frame = first
            while frame is not None:
                link.stats["frames"] += 1
                f = link.faults
                if f.get("block"):
                    link.stats["blocked"] += 1
                elif rng.random() < f.get("drop", 0):
                    link.stats["dropped"] += 1
                else:
                    copies = 2 if rng.random() < f.get("dup", 0) else 1
                    if copies == 2:
                        link.stats["duplicated"] += 1
                    cut = len(frame) > 1 and rng.random() < f.get("cut", 0)
                    for _ in range(copies):
                        delay = (f.get("delay_ms", 0) + rng.uniform(0, f.get("jitter_ms", 0))) / 1000
                        due = trio.current_time() + delay
                        if delay > 0:
                            link.stats["delayed"] += 1
                        if not f.get("reorder", True):
                            due = max(due, last_due)
                        last_due = max(last_due, due)
                        order += 1
                        heapq.heappush(heap, (due, order, frame, cut))
                        wake.set()
                frame = await self._read_frame(down, buf)
            # Downstream closed: deliver what is queued (unless blocked), then close.
            while heap:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(reader, nursery)
        finally:
            scope.cancel()

    def command(self, cmd: dict) -> dict:
        kind = cmd.get("cmd")
        if kind == "set":
            names = self.links if cmd.get("links", "*") == "*" else cmd["links"]
            faults = {k: v for k, v in cmd.items() if k not in ("cmd", "links")}
            for name in names:
                self.links[name].faults = dict(faults)
            return {"ok": True}
        if kind == "clear":
            for link in self.links.values():
                link.faults = {}
            return {"ok": True}
        if kind == "stats":
            return {"ok": True, "stats": {n: l.stats for n, l in self.links.items()}}
        if kind == "quit":
            raise SystemExit(0)
        return {"ok": False, "error": f"unknown command {kind!r}"}


async def main(config: dict) -> None:
    proxy = Proxy(config["links"], config.get("seed", 0))
    async with trio.open_nursery() as nursery:
        for link in proxy.links.values():
            await nursery.start(proxy.serve_link, link)
        out = trio.wrap_file(sys.stdout)
        await out.write(json.dumps({"ready": True}) + "\n")
        await out.flush()
        stdin = trio.lowlevel.FdStream(0)
        buf = b""
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    reply = proxy.command(json.loads(line))
                except SystemExit:
                    nursery.cancel_scope.cancel()
                    return
                except Exception as exc:  # a bad command must not kill the proxy
                    reply = {"ok": False, "error": repr(exc)}
                await out.write(json.dumps(reply) + "\n")
                await out.flush()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
