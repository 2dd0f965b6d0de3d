"""A client's connection to one replica, for Trio: dial, handshake, frames.

`dial(address)` opens a TCP connection, runs the client's side of the handshake
(`cypaxos.client.dialing.Handshake`) and returns a `Connection` whose frame decoder
holds whatever followed the welcome; every way it can fail is a
`cypaxos.client.dialing.DialError`.  The steps of a connection, in order, are where
later ones go: TCP, then TLS (a `trio.SSLStream` around the stream), then the
handshake (given the `Dialer` that proves a token or checks the replica's
certificate), then frames.  `request_once` is the one-request connection of `status`
and `snapshot`.
"""
from __future__ import annotations

import math
from typing import Callable

import trio

from .. import wire
from ..addresses import split_address
from ..errors import ConfigError
from .dialing import DialError, Handshake, connect_failure, describe_os_error

__all__ = ["DialError", "Connection", "dial", "request_once", "describe",
           "REPLY_FRAME_BYTES_MAX", "RECEIVE_BYTES"]

REPLY_FRAME_BYTES_MAX = 4 * wire.FRAME_BYTES_MAX
"""Replies are the cluster's, so they are trusted more than requests are: a read batch
of several large values may legitimately come back bigger than one request frame."""
RECEIVE_BYTES = 1 << 16
"""Bytes asked of the socket per read."""


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


def describe(exc: BaseException) -> str:
    """A short reason for a failed connection: "connection refused", "timed out"..."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, DialError):
        return exc.reason
    return describe_os_error(exc)


async def _handshake(stream) -> Handshake:
    """Run the client's side of the handshake on `stream` until it is done."""
    handshake = Handshake()
    await stream.send_all(handshake.start())
    try:
        while not handshake.done:
            out = handshake.receive_data(await stream.receive_some(RECEIVE_BYTES))
            if out:
                await stream.send_all(out)
    except DialError as exc:
        if exc.farewell:
            try:
                await stream.send_all(exc.farewell)
            except (OSError, trio.BrokenResourceError):
                pass
        raise
    return handshake


async def dial(address: str, *, timeout_s: float) -> Connection:
    """Connect to `address` and do the handshake within `timeout_s`; DialError if not."""
    try:
        host, port = split_address(address)   # maybe a redirect's: the cluster's word
    except ConfigError:
        raise DialError("bad address", definitive=True, reachable=True) from None
    stream = None
    try:
        with trio.fail_after(timeout_s):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise connect_failure(exc) from None
            handshake = await _handshake(stream)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.TooSlowError)):
            raise DialError(describe(exc)) from None
        raise
    return Connection(address, stream, handshake.cluster_id, handshake.replica_id,
                      handshake.trailing_data)


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
