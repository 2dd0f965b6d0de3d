"""What leaves a replica: per-connection queues of encoded frames, written straight
to the socket.

An `Outbox` is one connection's send queue (a peer link's, or a client's as a
`Conn`).  Frames queued during a round are written with one non-blocking
`os.write` at its end (`flush()`); only what the kernel does not take goes through
the connection's writer task (`run_writer`).  `SocketTransport` is the node's
`Transport` over them.
"""
from __future__ import annotations

import os

import trio

from ..wire import encode_frame
from ..security.tlsstream import TlsStream

__all__ = ["Outbox", "Conn", "SocketTransport", "SEND_CHUNK_BYTES"]

SEND_CHUNK_BYTES = 1 << 20
"""The writer task sends a long backlog in slices of this (counted as they go)."""


class Outbox:
    """Encoded frames waiting for one connection, written straight to its socket.

    Whoever produced frames calls `flush()` once per round: one non-blocking write for
    everything queued, with no task switch.  Only when the kernel does not take it
    all (a slow or dead reader) does the connection's writer task (`run_writer`) take
    over the rest; until it has sent it, later frames queue behind it, so the byte
    order on the connection is the order of `put`.
    """

    __slots__ = ("frames", "frames_max", "queued_bytes", "bytes_max", "fd", "writing",
                 "wakeup", "closed", "tls", "unsent")

    def __init__(self, frames_max: int, bytes_max: int = 1 << 62) -> None:
        self.frames: list = []      # queued and not yet handed to the kernel, in order
        self.frames_max = frames_max
        # Invariant: queued_bytes is the length of every frame in `frames` plus what
        # the writer task took and has not finished sending.
        self.queued_bytes = 0
        self.bytes_max = bytes_max  # put() refuses once this many bytes wait
        self.fd = -1                # the connected socket's fd (-1: not connected)
        # The writer task owns the socket (a send_all is in progress or due): flush()
        # must not write around it.  Invariant: writing implies fd >= 0.
        self.writing = False
        self.wakeup = trio.Event()
        self.closed = False         # no more frames accepted; the writer drains and ends
        # Under TLS (`cypaxos.security.tlsstream.TlsStream`): `frames` hold plaintext, flushes encrypt
        # them, and `unsent` holds the wire bytes the kernel did not take (the writer
        # sends them first).  Without TLS, unsent stays empty: a remainder goes back
        # into `frames`, which are the wire bytes.
        self.tls = None
        self.unsent = b""

    def put(self, frame: bytes) -> bool:
        """Queue a frame; False if the outbox is closed or full (the caller decides):
        `frames_max` frames, or `bytes_max` bytes, are waiting."""
        if (self.closed or len(self.frames) >= self.frames_max
                or self.queued_bytes >= self.bytes_max):
            return False
        self.frames.append(frame)
        self.queued_bytes += len(frame)
        return True

    def flush(self) -> None:
        """Write what is queued now, without blocking; the writer task gets any rest."""
        frames = self.frames
        if not frames or self.writing or self.fd < 0:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        tls = self.tls
        if tls is not None:
            data = tls.encrypt(data)
        try:
            written = os.write(self.fd, data)
        except OSError:
            # Full (EAGAIN) or broken: the writer's send_all waits, or fails and ends
            # the connection.
            written = 0
        if written < len(data):
            if tls is None:
                self.frames = [data[written:]]
            else:
                frames.clear()
                self.unsent = data[written:]
            self.queued_bytes = len(data) - written
            self.writing = True
            self.wakeup.set()
        else:
            frames.clear()
            self.queued_bytes = 0

    def discard(self) -> None:
        """Drop everything queued (a link that broke: what is left may start mid-frame
        and must never reach the next connection)."""
        self.frames = []
        self.unsent = b""
        self.queued_bytes = 0

    def close(self) -> None:
        """Accept no more frames; the writer sends what is queued, then returns."""
        self.closed = True
        self.wakeup.set()

    async def run_writer(self, stream) -> None:
        """Send on `stream` whatever `flush` could not, until closed or the send fails.

        `stream` is a `trio.SocketStream` or a `cypaxos.security.tlsstream.TlsStream`; either way the
        bytes go to the socket underneath, encrypted here or by `flush` under TLS.
        """
        tls = stream if isinstance(stream, TlsStream) else None
        transport = stream.transport if tls is not None else stream
        self.tls = tls
        self.fd = transport.socket.fileno()
        # Frames queued before the connection existed.
        self.writing = bool(self.frames or self.unsent)
        try:
            while True:
                if not self.frames and not self.unsent:
                    self.writing = False
                    if self.closed:
                        return
                    self.wakeup = trio.Event()
                    await self.wakeup.wait()
                    continue
                self.writing = True
                data, self.unsent = self.unsent, b""
                if self.frames:
                    frames, self.frames = self.frames, []
                    plain = frames[0] if len(frames) == 1 else b"".join(frames)
                    del frames
                    plain = tls.encrypt(plain) if tls is not None else plain
                    data = data + plain if data else plain
                    del plain
                self.queued_bytes = len(data)   # frames is empty: only this waits
                if len(data) <= SEND_CHUNK_BYTES:
                    await transport.send_all(data)
                    self.queued_bytes -= len(data)
                    continue
                # In slices, so that queued_bytes shows a slow reader's progress (a
                # client's watchdog tells a slow connection from a dead one by it).
                view = memoryview(data)
                for start in range(0, len(data), SEND_CHUNK_BYTES):
                    part = view[start:start + SEND_CHUNK_BYTES]
                    await transport.send_all(part)
                    self.queued_bytes -= len(part)
        finally:
            self.writing = False
            self.fd = -1
            self.tls = None


class Conn(Outbox):
    """One client connection: its outbox of replies, and what its watchdog
    (`cypaxos.replica.clients`) counts: requests read, replies queued."""

    __slots__ = ("name", "requests", "replies", "cut_off")

    def __init__(self, name: str, frames_max: int, bytes_max: int = 1 << 62) -> None:
        super().__init__(frames_max, bytes_max)
        self.name = name
        self.requests = 0   # requests read from the connection
        self.replies = 0    # replies queued (requests - replies: in flight, roughly)
        self.cut_off = False   # closed because it did not read its replies


class SocketTransport:
    """`cypaxos.replica.node.Transport` over the peer links' outboxes and the clients'
    connections.

    `send` encodes a message once for all peers (the core gives each peer its own
    tuple of one ACCEPT, sharing the values list, so the comparison is cheap) and
    queues it on the peer's outbox (dropped, and counted, when the link's queue is
    full: the core resends what matters).  `reply` queues a reply on the client's
    `Conn`, cutting off a client that does not read its replies (its queue holds
    `frames_max` frames or `bytes_max` bytes); `backlog` says how many bytes wait.
    `flush` writes every outbox that got frames since the last flush, one `os.write`
    each.
    """

    __slots__ = ("peer_links", "dirty", "stats", "last_peer_msg", "last_peer_frame")

    def __init__(self, peer_links: dict, stats: dict) -> None:
        self.peer_links = peer_links   # peer id -> Outbox
        self.dirty: set = set()        # outboxes with frames put since the last flush
        self.stats = stats             # the node's counters (peer_drops, client_drops)
        self.last_peer_msg = None      # the last message send encoded, and its frame
        self.last_peer_frame = b""

    def send(self, peer: int, message: tuple) -> None:
        outbox = self.peer_links[peer]
        if message == self.last_peer_msg:
            frame = self.last_peer_frame
        else:
            frame = encode_frame(message)
            self.last_peer_msg = message
            self.last_peer_frame = frame
        if outbox.put(frame):
            self.dirty.add(outbox)
        else:
            self.stats["peer_drops"] += 1

    def reply(self, conn: Conn, reply: list) -> None:
        conn.replies += 1
        if conn.put(encode_frame(reply)):
            self.dirty.add(conn)
        elif not conn.closed:
            # A client that does not read its replies is cut off rather than let us
            # buffer without bound.
            self.stats["client_drops"] += 1
            conn.cut_off = True
            conn.close()

    def backlog(self, conn: Conn) -> int:
        """Bytes of replies queued for `conn` that its socket has not taken yet."""
        return conn.queued_bytes

    def flush(self) -> None:
        dirty = self.dirty
        if dirty:
            for outbox in dirty:
                outbox.flush()
            dirty.clear()
