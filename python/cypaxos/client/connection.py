"""A client's connection to one replica, for Trio: dial, handshake, frames.

`dial(address, credentials=...)` opens a TCP connection, then, if the credentials
hold an `ssl.SSLContext`, TLS (a `cypaxos.security.tlsstream.TlsStream` around the
stream, its handshake within the same timeout), then runs the client's side of the cypaxos handshake
(`cypaxos.client.dialing.Handshake` over `Dialer.client(token=..., tls=...,
peer_certificate=...)`) and returns a `Connection` whose frame decoder holds whatever
followed the welcome; every way it can fail is a `cypaxos.client.dialing.DialError`.
`request_once` is the one-request connection of `status` and `snapshot`.

`Credentials` is what a client dials with: the SSLContext (built once per client by
`credentials(tls=..., token=...)`, not per dial) and the token.  Without TLS the
connection is the bare `trio.SocketStream`: nothing is layered over it, so the
plaintext path copies no more than before.
"""
from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from typing import Callable, Optional, Union

import trio

from .. import wire
from ..addresses import split_address
from ..errors import ConfigError
from ..security.handshake import Dialer
from ..security.identity import Identity
from ..security.secrets import check_key
from ..security.tls import TLSSettings, client_context, peer_identity
from ..security.tlsstream import TlsStream
from .dialing import DialError, Handshake, connect_failure, describe_os_error, tls_failure

__all__ = ["DialError", "Connection", "Credentials", "credentials", "dial", "request_once",
           "describe", "REPLY_FRAME_BYTES_MAX", "RECEIVE_BYTES"]

REPLY_FRAME_BYTES_MAX = 4 * wire.FRAME_BYTES_MAX
"""Replies are the cluster's, so they are trusted more than requests are: a read batch
of several large values may legitimately come back bigger than one request frame."""
RECEIVE_BYTES = 1 << 16
"""Bytes asked of the socket per read."""


@dataclass(frozen=True)
class Credentials:
    """What a client dials with: `ssl_context` (None: plain TCP) and `token` (None:
    no token); see `credentials()`."""

    ssl_context: Optional[ssl.SSLContext] = None
    token: Optional[bytes] = None
    client_certificate: Optional[bool] = None
    """Whether the context sends a certificate of the client's (None: a context the
    caller built, which may or may not)."""

    def dialer(self, peer_certificate: Identity = None) -> Dialer:
        """The handshake machine of one dial (`peer_certificate`: under TLS, who the
        replica's verified certificate names)."""
        return Dialer.client(token=self.token, tls=self.ssl_context is not None,
                             peer_certificate=peer_certificate)


PLAIN = Credentials()
"""No TLS, no token."""


def credentials(*, tls: Optional[TLSSettings] = None,
                token: Union[bytes, str, None] = None) -> Credentials:
    """Check the client's `tls` and `token` and build its SSLContext, once.

    `tls`: a `cypaxos.TLS` (the files are read now) or an `ssl.SSLContext` made with
    `ssl.PROTOCOL_TLS_CLIENT` (used as given).  `token`: bytes or str, a key as
    ``--token-file`` holds (`cypaxos.security.secrets.check_key`).  ConfigError at
    once for a bad file, context or token.
    """
    if tls is None and token is None:
        return PLAIN
    if isinstance(token, str):
        try:
            token = token.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError("client token: a key is printable ASCII without spaces") from None
    if token is not None:
        check_key(token, "client token")
    context = None
    own = None
    if tls is not None:
        from ..security.tls import TLS

        if not isinstance(tls, (TLS, ssl.SSLContext)):
            raise ConfigError(f"tls must be a cypaxos.TLS or an ssl.SSLContext, not "
                              f"{type(tls).__name__}")
        context = client_context(tls)
        own = tls.cert is not None if isinstance(tls, TLS) else None
    return Credentials(context, token, own)


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
    cause = _tls_cause(exc)
    if cause is not None:
        # A TLS connection that worked, then broke.
        if _is_eof(exc):
            return "connection closed by the replica"
        return f"TLS error: {(cause.reason or str(cause)).lower().replace('_', ' ')}"
    return describe_os_error(exc)


def _tls_cause(exc: BaseException) -> Optional[BaseException]:
    """The ssl.SSLError behind a broken TLS stream, if that is what `exc` is."""
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        return exc.__cause__
    return None


async def _handshake(stream, handshake: Handshake) -> None:
    """Run the client's side of the handshake on `stream` until it is done."""
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


def _closed_after_tls(credentials: Credentials) -> DialError:
    """A replica that closes a connection right after the client's side of TLS 1.3 is
    done, before any handshake frame, refused the client's certificate (or its lack
    of one): TLS 1.3 verifies it after the client has finished.  A replica sends the
    alert that says why first, but a server that sends none ends here."""
    if credentials.client_certificate is False:
        why = ("the replica requires a client certificate signed by its CA "
               "(give the client one: --tls-cert, --tls-key)")
    elif credentials.client_certificate:
        why = ("the replica did not accept the client's certificate (is it signed by "
               "the replica's CA, for clients, and valid now?)")
    else:
        why = "the replica did not accept the client's certificate, or its lack of one"
    return DialError(f"authentication failed: {why}", definitive=True, reachable=True)


async def dial(address: str, *, timeout_s: float,
               credentials: Credentials = PLAIN) -> Connection:
    """Connect to `address` (TCP, TLS if `credentials` say so, the handshake) within
    `timeout_s`; DialError if not."""
    try:
        host, port = split_address(address)   # maybe a redirect's: the cluster's word
    except ConfigError:
        raise DialError("bad address", definitive=True, reachable=True) from None
    stream = None
    handshake = None
    context = credentials.ssl_context
    try:
        with trio.fail_after(timeout_s):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise connect_failure(exc) from None
            if context is None:
                handshake = Handshake(credentials.dialer())
            else:
                stream = TlsStream(stream, context, server_side=False, server_hostname=host)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise tls_failure(exc.__cause__ or exc, host) from None
                handshake = Handshake(credentials.dialer(peer_identity(stream)),
                                      tls=True)
            await _handshake(stream, handshake)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if handshake is not None and handshake.tls and handshake.bytes_received == 0 and (
                _is_eof(exc) or (isinstance(exc, DialError) and exc.eof)):
            raise _closed_after_tls(credentials) from None
        cause = _tls_cause(exc)
        if cause is not None:
            # After the TLS handshake: an alert about the client's certificate from a
            # replica behind a TLS stack that sends one.
            raise tls_failure(cause, host) from None
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.TooSlowError)):
            raise DialError(describe(exc)) from None
        raise
    return Connection(address, stream, handshake.cluster_id, handshake.replica_id,
                      handshake.trailing_data)


def _is_eof(exc: BaseException) -> bool:
    """A TLS stream that ended without a close_notify (or a reset under it)."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    return isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                              BrokenPipeError)) or (
        isinstance(cause, ssl.SSLError) and "EOF" in str(cause))


async def request_once(address: str, make_request: Callable[[int], list],
                       deadline: float, credentials: Credentials = PLAIN) -> tuple[int, tuple]:
    """Dial `address`, send `make_request(1)`, return (replica id, its parsed reply).

    Raises DialError (also for what went wrong after the welcome), or
    trio.TooSlowError at `deadline`.
    """
    with trio.move_on_at(deadline):
        conn = await dial(address, timeout_s=math.inf, credentials=credentials)
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
