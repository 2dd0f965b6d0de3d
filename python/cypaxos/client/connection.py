"""A client's connection to one replica, for Trio: dial, handshake, frames.

`dial(address)` opens a TCP connection and runs the client's side of the handshake
(`cypaxos.security.handshake.Dialer`: the hello and the welcome, bounded to
`HANDSHAKE_FRAME_BYTES_MAX` per frame until it is over) and returns a `Connection`
whose frame decoder holds whatever followed the welcome.  Every way a dial can fail
is one `DialError` with a short reason and whether it is *definitive* (the address
certainly has no replica of ours for us now: refused, an unknown host, something
that is not a cypaxos replica, a refused handshake) and *reachable* (something
answered there), which is what the session's routing needs
(`cypaxos.client.routing`).

The steps of a connection, in order, are where later ones go: TCP, then TLS (a
`trio.SSLStream` around the stream), then the handshake (the Dialer given a token,
or told that TLS is on and whom the replica's certificate names), then frames.
`request_once` is the one-request connection of `status` and `snapshot`.
"""
from __future__ import annotations

import math
import socket
from typing import Callable, Optional

import trio

from .. import wire
from ..addresses import split_address
from ..errors import ConfigError
from ..groups import leaves
from ..security.handshake import HANDSHAKE_FRAME_BYTES_MAX, Authenticated, Dialer

__all__ = ["DialError", "Connection", "dial", "request_once", "describe",
           "REPLY_FRAME_BYTES_MAX", "RECEIVE_BYTES"]

REPLY_FRAME_BYTES_MAX = 4 * wire.FRAME_BYTES_MAX
"""Replies are the cluster's, so they are trusted more than requests are: a read batch
of several large values may legitimately come back bigger than one request frame."""
RECEIVE_BYTES = 1 << 16
"""Bytes asked of the socket per read."""

_FIRST_BYTES = 40   # kept of what the other side sent first, to say what it is


class DialError(Exception):
    """A dial failed: `reason` in a few words ("connection refused", "timed out", "not
    a cypaxos replica (...)"), `definitive` and `reachable` as in the module doc."""

    def __init__(self, reason: str, *, definitive: bool = False,
                 reachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definitive = definitive
        self.reachable = reachable


class Connection:
    """An open connection to a replica, after its welcome.

    `cluster_id` and `replica_id` are what the replica said in the welcome; `decoder`
    holds the bytes received after it (feed it, then take frames).
    """

    __slots__ = ("address", "stream", "cluster_id", "replica_id", "decoder")

    def __init__(self, address: str, stream, cluster_id: str, replica_id: int,
                 trailing: bytes = b"") -> None:
        self.address = address
        self.stream = stream
        self.cluster_id = cluster_id
        self.replica_id = replica_id
        self.decoder = wire.FrameDecoder(REPLY_FRAME_BYTES_MAX)
        if trailing:
            self.decoder.feed(trailing)

    async def aclose(self) -> None:
        """Close at once (nothing is flushed)."""
        await trio.aclose_forcefully(self.stream)


def _printable(data: bytes) -> str:
    text = data.decode("latin-1").split("\r", 1)[0].split("\n", 1)[0]
    return "".join(c if c.isprintable() else "?" for c in text)


def _not_a_replica(first: bytes) -> Optional[str]:
    """Why the first bytes from a server cannot start a handshake frame, or None (they
    can, or there are too few to tell).

    Every handshake frame is a length of at most HANDSHAKE_FRAME_BYTES_MAX and a CBOR
    array of one to four items.
    """
    if len(first) < 4:
        return None
    if int.from_bytes(first[:4], "big") <= HANDSHAKE_FRAME_BYTES_MAX:
        if len(first) < 5 or 0x81 <= first[4] <= 0x84:
            return None
    if first[0] in (0x15, 0x16) and first[1] == 0x03:
        return "not a cypaxos replica without TLS (it answered in TLS)"
    return f"not a cypaxos replica (it answered {_printable(first)!r})"


def _definitive(exc: BaseException) -> bool:
    """Whether a failed TCP connect says that nothing of ours is there: refused (by
    every address the name resolved to), or a host name that does not exist."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_NONAME
    causes = leaves(exc.__cause__) if exc.__cause__ is not None else [exc]
    return all(isinstance(cause, ConnectionRefusedError) for cause in causes)


def describe(exc: BaseException) -> str:
    """A short reason for a failed connection: "connection refused", "timed out"..."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, DialError):
        return exc.reason
    # trio.open_tcp_stream raises OSError("all attempts ... failed") from a group of
    # the per-address errors: the first of those says more.
    cause = exc.__cause__
    if cause is not None:
        cause = leaves(cause)[0]
    if isinstance(exc, OSError) and exc.errno is None and isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


async def _handshake(stream) -> tuple[str, int, bytes]:
    """The client's side of the handshake: (cluster id, replica id, bytes after it)."""
    dialer = Dialer.client()
    await stream.send_all(dialer.start())
    first = b""
    data = b""
    while dialer.outcome is None:
        data = await stream.receive_some(RECEIVE_BYTES)
        if len(first) < _FIRST_BYTES:
            first += data[:_FIRST_BYTES - len(first)]
            foreign = _not_a_replica(first)
            if foreign is not None:
                raise DialError(foreign, definitive=True, reachable=True)
        out = dialer.receive_data(data)
        if out:
            try:
                await stream.send_all(out)   # a refusal of ours, say
            except (OSError, trio.BrokenResourceError):
                pass
    outcome = dialer.outcome
    if isinstance(outcome, Authenticated):
        return outcome.cluster_id, outcome.peer, dialer.trailing_data
    if outcome.remote:
        raise DialError(f"authentication failed: {outcome.reason}", definitive=True,
                        reachable=True)
    if not data:
        raise DialError("connection closed by the replica")
    raise DialError(f"handshake failed: {outcome.reason}", definitive=True, reachable=True)


async def dial(address: str, *, timeout_s: float) -> Connection:
    """Connect to `address` and do the handshake within `timeout_s`; DialError if not."""
    try:
        host, port = split_address(address)   # maybe a redirect's: the cluster's word
    except ConfigError:
        raise DialError("bad address", definitive=True, reachable=True) from None
    stream = None
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            cluster_id, replica_id, trailing = await _handshake(stream)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, DialError):
            raise
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.TooSlowError)):
            definitive = isinstance(exc, OSError) and stream is None and _definitive(exc)
            raise DialError(describe(exc), definitive=definitive) from None
        raise
    return Connection(address, stream, cluster_id, replica_id, trailing)


async def request_once(address: str, make_request: Callable[[int], list],
                       deadline: float) -> tuple[int, tuple]:
    """Dial `address`, send `make_request(1)`, return (replica id, its parsed reply).

    Raises DialError (also for what went wrong after the welcome), or
    trio.TooSlowError at `deadline`.
    """
    with trio.move_on_at(deadline):
        conn = await dial(address, timeout_s=math.inf)
        try:
            await conn.stream.send_all(wire.encode_frame(make_request(1)))
            decoder = conn.decoder
            while True:
                obj = decoder.next_frame()
                if obj is None:
                    data = await conn.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        raise DialError("connection closed by the replica")
                    decoder.feed(data)
                    continue
                reply = wire.parse_reply(obj)
                if reply[1] == 1:
                    return conn.replica_id, reply
        except (OSError, trio.BrokenResourceError, wire.ProtocolError) as exc:
            raise DialError(describe(exc)) from None
        finally:
            await conn.aclose()
    raise trio.TooSlowError("no answer before the deadline")
