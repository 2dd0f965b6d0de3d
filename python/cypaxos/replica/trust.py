"""Who may talk to this replica: its credentials, and the start of every connection.

`load_trust(options, cluster_id)` turns the serve flags (``--tls-ca/--tls-cert/
--tls-key``, ``--cluster-secret-file``, ``--token-file``,
``--allow-anonymous-clients``, ``--insecure``) into a `Trust`: the `ReplicaAuth` the
handshake machines decide with and the `ssl` contexts for accepting and for dialing
peers.  A replica with neither TLS nor a cluster secret refuses to start unless
``--insecure`` says the network is a test network (docs/security.md, "The three
modes").

`accept` and `dial_peer` are the Trio I/O around the sans-I/O machines of
`cypaxos.security.handshake`: TLS first when configured (`cypaxos.security.tlsstream.TlsStream`, whose
records the outboxes write in the round), then the handshake frames.  Nothing is read past what the machines need: reads during the
handshake are HANDSHAKE_READ_BYTES at most, and a machine refuses any frame longer
than `HANDSHAKE_FRAME_BYTES_MAX` before its body arrives, so an unauthenticated caller
costs a few kilobytes and the hello timeout.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Collection, Optional, Union

import trio

from ..errors import ConfigError
from ..security.handshake import Acceptor, Authenticated, Dialer, Refused, ReplicaAuth
from ..security.secrets import load_keys
from ..security.tls import (TLS, check_own_certificate, peer_context, peer_identity,
                            server_context)
from ..security.tlsstream import TlsStream

__all__ = ["Trust", "check_flags", "load_trust", "accept", "dial_peer", "HandshakeRefused", "HandshakeAbandoned", "linger",
           "HANDSHAKE_READ_BYTES", "NO_AUTH_MESSAGE", "INSECURE_WARNING"]

log = logging.getLogger("cypaxos.server")

HANDSHAKE_READ_BYTES = 4096
"""Bytes asked of the socket per read while a connection is not yet authenticated."""
REFUSAL_LINGER_S = 0.5
REFUSAL_LINGER_BYTES = 1 << 18
"""How long, and how many bytes, a refused connection is read (and dropped) before it
is closed (`linger`)."""
NO_AUTH_MESSAGE = (
    "this replica would accept anyone as a peer: give it --tls-ca, --tls-cert and "
    "--tls-key (cypaxos certs makes them) or --cluster-secret-file FILE (the same file "
    "on every replica), or pass --insecure on a network nothing else can reach")

INSECURE_WARNING = ("--insecure: any process that reaches this replica's port can act as a "
                    "peer or a client and change what the cluster holds")


class HandshakeAbandoned(Exception):
    """The other side closed the connection before its handshake ended; `received`:
    how many bytes it had sent (0: it sent nothing, a port probe)."""

    def __init__(self, received: int) -> None:
        super().__init__("the connection closed during the handshake")
        self.received = received


class HandshakeRefused(Exception):
    """A connection's handshake ended in a refusal: `reason` (one line); `remote`:
    the other side refused us; `kind`: what the caller said it was ("peer",
    "client", or "" when it never got that far)."""

    def __init__(self, reason: str, *, remote: bool = False, kind: str = "",
                 stream: Optional[trio.abc.Stream] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.remote = remote
        self.kind = kind
        self.stream = stream   # the connection, to `linger` on before closing it


@dataclass(frozen=True)
class Trust:
    """A replica's credentials: what the handshakes decide with, and its TLS contexts
    (both None without TLS)."""

    auth: ReplicaAuth
    server_ssl: Optional[ssl.SSLContext] = None
    peer_ssl: Optional[ssl.SSLContext] = None

    @property
    def mode(self) -> str:
        """How peers authenticate, for the start line: "tls", "secret", "tls+secret"
        or "insecure"."""
        return self.auth.peer_mode


def check_flags(options) -> bool:
    """ConfigError (one line) unless the options name a way to authenticate peers
    (all three TLS paths, or a cluster secret) or say ``insecure``; whether TLS is on.
    Reads no file."""
    paths = (options.tls_ca, options.tls_cert, options.tls_key)
    tls_on = any(path is not None for path in paths)
    if tls_on and not all(path is not None for path in paths):
        raise ConfigError("TLS needs all three of --tls-ca, --tls-cert and --tls-key")
    if not tls_on and not options.cluster_secret_file and not options.insecure:
        raise ConfigError(NO_AUTH_MESSAGE)
    return tls_on


def load_trust(options, cluster_id: str) -> Trust:
    """The `Trust` of a replica's `ServerOptions`; ConfigError (one line) for missing
    or bad files, a certificate that does not name this replica, or no way at all to
    authenticate peers without ``insecure``."""
    tls_on = check_flags(options)
    secrets = (load_keys(options.cluster_secret_file, "cluster secret file")
               if options.cluster_secret_file else ())
    tokens = load_keys(options.token_file, "token file") if options.token_file else ()
    auth = ReplicaAuth(cluster_id=cluster_id, replica_id=options.replica_id,
                       cluster_secrets=secrets, client_tokens=tokens,
                       # Insecure mode admits anyone (docs/security.md, "The three
                       # modes"), unless it asks clients for tokens.
                       allow_anonymous_clients=options.allow_anonymous_clients or (
                           not tls_on and not secrets and not tokens),
                       tls=tls_on)
    if not tls_on:
        return Trust(auth)
    tls = TLS(ca=options.tls_ca, cert=options.tls_cert, key=options.tls_key)
    check_own_certificate(tls, options.replica_id)
    # Clients may come without a certificate only when something else admits them.
    certificate_required = not (tokens or options.allow_anonymous_clients)
    return Trust(auth, server_context(tls, client_certificate_required=certificate_required),
                 peer_context(tls))


def _tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "verify_message", None) or cause.reason or str(cause)
        return f"TLS handshake failed: {str(reason).lower().replace('_', ' ')}"
    return f"TLS handshake failed: {cause or type(cause).__name__}"


async def _run(machine: Union[Acceptor, Dialer], stream) -> int:
    """Feed `machine` what `stream` gives until it ends; send what it says.  Returns
    the number of bytes received."""
    received = 0
    while machine.outcome is None:
        data = await stream.receive_some(HANDSHAKE_READ_BYTES)
        received += len(data)
        out = machine.receive_data(data)
        if out:
            try:
                await stream.send_all(out)
            except (trio.BrokenResourceError, OSError):
                if machine.outcome is None:
                    raise
                # A refusal the other side did not wait for: the outcome stands.
    return received


async def accept(trust: Trust, stream: trio.abc.Stream,
                 member_ids: Collection[int]) -> tuple[trio.abc.Stream, Authenticated, bytes]:
    """Run the start of a connection this replica accepted: TLS (if configured), then
    the handshake, whose answer (welcome or refusal) is sent here.

    Returns (the stream to use from now on, who the other side is, the bytes that
    followed its last handshake frame).  HandshakeRefused when it failed (the
    refusal was sent if the connection still took it); trio.BrokenResourceError or
    OSError when the connection broke.  The caller bounds the time.
    """
    certificate = None
    if trust.server_ssl is not None:
        stream = TlsStream(stream, trust.server_ssl, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise HandshakeRefused(_tls_reason(exc), stream=stream) from None
        certificate = peer_identity(stream)
    acceptor = Acceptor(trust.auth, member_ids, peer_certificate=certificate)
    received = await _run(acceptor, stream)
    outcome = acceptor.outcome
    if isinstance(outcome, Refused):
        if acceptor.closed_early:
            # Gone before the handshake ended: nothing was refused (a probe, a crash).
            raise HandshakeAbandoned(received)
        raise HandshakeRefused(outcome.reason, remote=outcome.remote, kind=acceptor.hello_kind,
                               stream=stream)
    assert isinstance(outcome, Authenticated)
    return stream, outcome, acceptor.trailing_data


async def linger(stream: trio.abc.Stream) -> None:
    """After a refusal: end our side and read (and drop) what the caller already sent,
    for at most REFUSAL_LINGER_S and REFUSAL_LINGER_BYTES, so that closing with unread
    bytes does not reset the connection before the refusal frame is read."""
    transport = getattr(stream, "transport", stream)
    received = 0
    with trio.move_on_after(REFUSAL_LINGER_S):
        try:
            await transport.send_eof()
            while received < REFUSAL_LINGER_BYTES:
                data = await transport.receive_some(HANDSHAKE_READ_BYTES)
                if not data:
                    return
                received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def dial_peer(trust: Trust, stream: trio.abc.Stream, peer_id: int) -> trio.abc.Stream:
    """Run the start of a connection this replica dialed to replica `peer_id`: TLS (if
    configured), then the handshake.  Returns the stream to send on;
    HandshakeRefused (with `remote` when the peer refused us) if it failed."""
    certificate = None
    if trust.peer_ssl is not None:
        stream = TlsStream(stream, trust.peer_ssl, server_side=False)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise HandshakeRefused(_tls_reason(exc), kind="peer") from None
        certificate = peer_identity(stream)
    dialer = Dialer.peer(trust.auth, peer_id, peer_certificate=certificate)
    first = dialer.start()
    await stream.send_all(first)
    if dialer.outcome is None:
        await _run(dialer, stream)
    outcome = dialer.outcome
    if isinstance(outcome, Refused):
        raise HandshakeRefused(outcome.reason, remote=outcome.remote, kind="peer")
    return stream
