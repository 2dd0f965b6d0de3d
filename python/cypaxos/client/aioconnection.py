"""A client's connection to one replica, for asyncio: dial, handshake, frames.

The asyncio twin of `cypaxos.client.connection`, over a plain `asyncio.Protocol`
(no streams: one `transport.write` per flush, and each read goes straight from
`data_received` to the frame decoder).  `dial(address, credentials=...)` opens a TCP
connection, then, if the credentials hold an `ssl.SSLContext`, TLS on it
(`loop.start_tls`, the same context and server_hostname as the Trio client), then
runs the same sans-I/O `cypaxos.client.dialing.Handshake` and returns an
`AioConnection` that gives out first whatever followed the welcome; every way it
can fail is a `DialError`, with the reasons the Trio client gives.  `request_once`
is the one-request connection of `status` and `snapshot`.
"""
from __future__ import annotations

import asyncio
import math
import socket
import ssl
from typing import Any, Callable, Optional

from .. import wire
from ..addresses import split_address
from ..errors import ConfigError
from ..groups import BaseExceptionGroup
from ..security.tls import peer_identity
from .connection import (
    PLAIN, REPLY_FRAME_BYTES_MAX, Credentials, _closed_after_tls,
)
from .dialing import DialError, Handshake, connect_failure, describe_os_error, tls_failure

__all__ = ["AioConnection", "dial", "request_once", "describe"]


class AioConnection(asyncio.Protocol):
    """An asyncio connection to a replica (the protocol object of its transport).

    Until `attach`, what arrives is buffered for `receive()` (the handshake, or
    `request_once`).  After `attach(on_data, on_lost)`, every read is given to
    `on_data(data)` (which feeds `decoder`); `on_lost(reason)` is called once when the
    connection ends.  `cluster_id` and `replica_id` are what the replica said in the welcome.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: Optional[asyncio.Transport] = None
        self.address = ""
        self.cluster_id: Optional[str] = None
        self.replica_id: Optional[int] = None
        self.decoder = wire.FrameDecoder(REPLY_FRAME_BYTES_MAX)
        self._buffer: list[bytes] = []
        self._eof = False
        self._error: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None
        self._on_data: Optional[Callable[[bytes], None]] = None
        self._on_lost: Optional[Callable[[str], None]] = None
        self.paused = False
        """The transport's write buffer is over its high-water mark."""
        self.on_resume: Optional[Callable[[], None]] = None
        self.closed: asyncio.Future[None] = loop.create_future()
        """Done once the connection has ended."""

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        on_data = self._on_data
        if on_data is not None:
            on_data(data)
        else:
            self._buffer.append(data)
            self._wake()

    def eof_received(self) -> Optional[bool]:
        self._eof = True
        self._wake()
        return False   # close the transport

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)
        on_lost = self._on_lost
        if on_lost is not None:
            self._on_lost = None
            self._on_data = None
            on_lost("connection closed by the replica" if exc is None else describe(exc))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()

    # -- use --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> bytes:
        """What arrived since the last call (waiting for something); b"" at end of file;
        raises what broke the connection."""
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        data = b"".join(self._buffer)
        self._buffer.clear()
        return data

    def attach(self, on_data: Callable[[bytes], None],
               on_lost: Callable[[str], None]) -> bytes:
        """From now on call `on_data(data)` with each read (the caller feeds `decoder`)
        and `on_lost(reason)` when the connection ends (at once if it has already).
        Returns what arrived before and was not taken by `receive()`."""
        data = b"".join(self._buffer)
        self._buffer.clear()
        if self.closed.done():
            error = self._error
            on_lost("connection closed by the replica" if error is None else describe(error))
            return data
        self._on_data = on_data
        self._on_lost = on_lost
        return data

    def write(self, data: bytes) -> None:
        """Queue `data` for sending (the transport sends what it can at once)."""
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """Close at once (nothing is flushed); `on_lost` is not called for this."""
        self._on_lost = None
        self._on_data = None
        if self.transport is not None:
            self.transport.abort()


def describe(exc: BaseException) -> str:
    """A short reason for a failed connection (as `cypaxos.client.connection.describe`)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, DialError):
        return exc.reason
    if isinstance(exc, ssl.SSLError):
        if _is_eof(exc):
            return "connection closed by the replica"
        return f"TLS error: {(exc.reason or str(exc)).lower().replace('_', ' ')}"
    return describe_os_error(exc)


def _is_eof(exc: BaseException) -> bool:
    return isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                            BrokenPipeError)) or (
        isinstance(exc, ssl.SSLError) and "EOF" in str(exc))


async def _handshake(conn: AioConnection, handshake: Handshake) -> None:
    conn.write(handshake.start())
    try:
        while not handshake.done:
            out = handshake.receive_data(await conn.receive())
            if out:
                conn.write(out)
    except DialError as exc:
        if exc.farewell and conn.transport is not None and not conn.transport.is_closing():
            conn.write(exc.farewell)
        raise


async def _connect(host: str, port: int, loop: asyncio.AbstractEventLoop
                   ) -> tuple[asyncio.BaseTransport, AioConnection]:
    """TCP to each address `host` resolves to in turn, until one takes the connection.

    If every one fails, the OSError raised has the per-address errors as its cause
    (an exception group), as Trio's has, so that `connect_failure` can tell "refused
    by every address" (definitive) from the rest; `loop.create_connection` would
    merge them into one message instead.
    """
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return await loop.create_connection(lambda: AioConnection(loop), sock=sock)
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    if len(errors) == 1:
        raise errors[0]
    failure = OSError(f"all attempts to connect to {host}:{port} failed")
    failure.__cause__ = BaseExceptionGroup("connect failed", errors)
    raise failure


async def _dial(address: str, host: str, port: int, credentials: Credentials,
                loop: asyncio.AbstractEventLoop) -> AioConnection:
    context = credentials.ssl_context
    conn: Optional[AioConnection] = None
    handshake = None
    try:
        try:
            transport, conn = await _connect(host, port, loop)
        except OSError as exc:
            raise connect_failure(exc) from None
        if context is None:
            handshake = Handshake(credentials.dialer())
        else:
            try:
                tls_transport = await loop.start_tls(transport, conn, context,
                                                     server_hostname=host)
            except (OSError, EOFError) as exc:   # ssl.SSLError is an OSError
                raise tls_failure(exc, host) from None
            assert tls_transport is not None
            conn.transport = tls_transport
            ssl_object = tls_transport.get_extra_info("ssl_object")
            handshake = Handshake(credentials.dialer(peer_identity(ssl_object)), tls=True)
        await _handshake(conn, handshake)
    except BaseException as exc:
        if conn is not None:
            conn.close()
        if handshake is not None and handshake.tls and handshake.bytes_received == 0 and (
                (isinstance(exc, OSError) and _is_eof(exc))
                or (isinstance(exc, DialError) and exc.eof)):
            raise _closed_after_tls(credentials) from None
        if handshake is not None and handshake.tls and isinstance(exc, ssl.SSLError):
            # After the TLS handshake: an alert about the client's certificate.
            raise tls_failure(exc, host) from None
        if isinstance(exc, OSError):
            raise DialError(describe(exc)) from None
        raise
    conn.address = address
    conn.cluster_id = handshake.cluster_id
    conn.replica_id = handshake.replica_id
    if handshake.trailing_data:
        # Frames after the welcome: given out first, by `receive()` or `attach`.
        conn._buffer.insert(0, handshake.trailing_data)
    return conn


async def dial(address: str, *, timeout_s: float,
               credentials: Credentials = PLAIN) -> AioConnection:
    """Connect to `address` (TCP, TLS if `credentials` say so, the handshake) within
    `timeout_s`; DialError if not."""
    try:
        host, port = split_address(address)   # maybe a redirect's: the cluster's word
    except ConfigError:
        raise DialError("bad address", definitive=True, reachable=True) from None
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(_dial(address, host, port, credentials, loop),
                                      None if math.isinf(timeout_s) else timeout_s)
    except asyncio.TimeoutError:
        raise DialError("timed out") from None


async def request_once(address: str, make_request: Callable[[int], list[Any]],
                       deadline: float,
                       credentials: Credentials = PLAIN) -> tuple[int, tuple[Any, ...]]:
    """Dial `address`, send `make_request(1)`, return (replica id, its parsed reply).

    Raises DialError (also for what went wrong after the welcome), or
    asyncio.TimeoutError at `deadline` (of the loop's clock).
    """
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(_request_once(address, make_request, credentials),
                                  max(0.0, deadline - loop.time()))


async def _request_once(address: str, make_request: Callable[[int], list[Any]],
                        credentials: Credentials) -> tuple[int, tuple[Any, ...]]:
    conn = await dial(address, timeout_s=math.inf, credentials=credentials)
    try:
        conn.write(wire.encode_frame(make_request(1)))
        decoder = conn.decoder
        while True:
            obj = decoder.next_frame()
            if obj is None:
                data = await conn.receive()
                if not data:
                    raise DialError("connection closed by the replica")
                decoder.feed(data)
                continue
            reply = wire.parse_reply(obj)
            if reply[1] == 1:
                assert conn.replica_id is not None
                return conn.replica_id, reply
    except (OSError, wire.ProtocolError) as exc:
        raise DialError(describe(exc)) from None
    finally:
        conn.close()
