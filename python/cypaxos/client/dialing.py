"""What a client's dial came to, without I/O: the opening handshake and its failures.

Any wiring's connection layer (the Trio one is `cypaxos.client.connection`) does the
I/O of a dial: TCP, then TLS if the cluster uses it, then the frames of `Handshake`
(`start()` to send, `receive_data()` for what arrives) until it is `done`.  Every
way a dial can fail is one `DialError` with a short reason and whether it is

* *definitive*: the address certainly has no replica of ours for us now (refused, an
  unknown host, something that is not a cypaxos replica, a refused handshake), which
  is what lets the session fail calls fast when every address is so;
* *reachable*: something answered there, so the failure is no sign that a leader
  named there is gone.

`Handshake` wraps the client's side of `cypaxos.security.handshake` (a `Dialer`: the
hello, the welcome, and with a token or TLS the challenge and proofs, every frame
bounded to `HANDSHAKE_FRAME_BYTES_MAX`), and recognizes a server that is not a
cypaxos replica by its first bytes.  `tls_failure` says what an `ssl.SSLError` of a
dial means: a replica certificate the client cannot verify (``TLS: ...``), the
replica refusing the client's certificate (``authentication failed: ...``), a server
that does not answer in TLS.
"""
from __future__ import annotations

import socket
import ssl
from typing import Optional

from ..groups import leaves
from ..security.handshake import HANDSHAKE_FRAME_BYTES_MAX, Authenticated, Dialer

__all__ = ["DialError", "Handshake", "connect_failure", "tls_failure"]

_FIRST_BYTES = 40   # kept of what the other side sent first, to say what it is


class DialError(Exception):
    """A dial failed: `reason` in a few words ("connection refused", "timed out", "not
    a cypaxos replica (...)"), `definitive` and `reachable` as in the module doc;
    `farewell`: bytes to send before closing, if the connection still takes them (a
    refusal that tells the replica why)."""

    def __init__(self, reason: str, *, definitive: bool = False, reachable: bool = False,
                 farewell: bytes = b"", eof: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definitive = definitive
        self.reachable = reachable
        self.farewell = farewell
        self.eof = eof   # the other side closed the connection, saying nothing


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


class Handshake:
    """The client's side of a connection's first frames (sans-I/O).

    `dialer`: the handshake machine to run (default: a key-less client's; with a
    token or under TLS, the `Dialer.client(...)` that says so); `tls`: whether it runs
    over TLS.  `bytes_received` counts what came from the replica.  Send `start()`, then
    feed every read to `receive_data` (b"" at end of file) and send what it returns,
    until `done`; it raises DialError if the dial failed.  Then `cluster_id` and
    `replica_id` say whom the client reached, and `trailing_data` holds what came
    after the welcome (the connection's frames).
    """

    def __init__(self, dialer: Optional[Dialer] = None, *, tls: bool = False) -> None:
        self._dialer = dialer if dialer is not None else Dialer.client()
        self.tls = tls
        self.bytes_received = 0
        self._first = b""
        self.done = False
        self.cluster_id: Optional[str] = None
        self.replica_id: Optional[int] = None
        self.trailing_data = b""

    def start(self) -> bytes:
        """The first bytes to send (the hello)."""
        out = self._dialer.start()
        self._check(out)
        return out

    def receive_data(self, data: bytes) -> bytes:
        """Bytes received (b"": the other side closed); the bytes to send back."""
        self.bytes_received += len(data)
        if len(self._first) < _FIRST_BYTES:
            self._first += data[:_FIRST_BYTES - len(self._first)]
            foreign = _not_a_replica(self._first)
            if foreign is not None:
                raise DialError(foreign, definitive=True, reachable=True)
        out = self._dialer.receive_data(data)
        self._check(out, eof=not data)
        return out

    def _check(self, out: bytes, eof: bool = False) -> None:
        outcome = self._dialer.outcome
        if outcome is None:
            return
        if isinstance(outcome, Authenticated):
            self.done = True
            self.cluster_id = outcome.cluster_id
            self.replica_id = outcome.peer
            self.trailing_data = self._dialer.trailing_data
            return
        if outcome.remote:
            raise DialError(f"authentication failed: {outcome.reason}", definitive=True,
                            reachable=True)
        if eof:
            if self.bytes_received == 0 and not self.tls:
                # What a replica under TLS does to a client without it (its TLS
                # handshake fails on the hello, and it closes).
                raise DialError("connection closed by the replica before its welcome "
                                "(if the cluster uses TLS, give the client its CA: "
                                "--tls-ca)", eof=True)
            raise DialError("connection closed by the replica", eof=True)
        raise DialError(f"handshake failed: {outcome.reason}", definitive=True,
                        reachable=True, farewell=out)


def connect_failure(exc: OSError) -> DialError:
    """The DialError of a failed TCP connect: definitive if refused (by every address
    the name resolved to) or if the host name does not exist."""
    if isinstance(exc, socket.gaierror):
        definitive = exc.errno == socket.EAI_NONAME
    else:
        causes = leaves(exc.__cause__) if exc.__cause__ is not None else [exc]
        definitive = all(isinstance(cause, ConnectionRefusedError) for cause in causes)
    return DialError(describe_os_error(exc), definitive=definitive)


# What a TLS alert from the replica means to the client (ssl.SSLError.reason of an
# alert the other side sent): the replica refused the client's certificate, or its
# lack of one.
_REFUSED_BY_ALERT = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the replica requires a client certificate "
                                         "signed by its CA (give the client one: "
                                         "--tls-cert, --tls-key)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the replica did not accept the client's certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the replica did not accept the client's certificate "
                              "(signed by a CA it does not trust)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the replica did not accept the client's certificate "
                                       "(expired)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the replica did not accept the client's "
                                           "certificate (not for client authentication)",
    "TLSV1_ALERT_ACCESS_DENIED": "the replica refused the client's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the replica did not accept the client's certificate",
}
# Reasons OpenSSL gives when what came back is not TLS at all.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE",
            "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_TOO_LARGE")


def tls_failure(exc: BaseException, host: str) -> DialError:
    """The DialError of a TLS failure `exc` (an ssl.SSLError, or what else broke the
    TLS handshake) on a dial of `host`.

    A certificate the client cannot verify, a refusal of the client's certificate and
    a server that does not answer in TLS are definitive: trying that address again
    will not help.  A TLS connection cut short is not (the replica may have been
    restarting, or shedding load).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or exc.reason or "").rstrip(".")
        if exc.verify_code == 62 or message.startswith(("Hostname mismatch", "IP address mismatch")):
            # X509_V_ERR_HOSTNAME_MISMATCH / _IP_ADDRESS_MISMATCH
            message = (f"the replica's certificate does not name {host} (dial a host name "
                       f"or address its certificate names)")
        elif exc.verify_code in (18, 19, 20, 21):
            # self-signed, self-signed in chain, unable to get (local) issuer
            message = f"the replica's certificate is not signed by the CA given ({message})"
        else:
            message = f"the replica's certificate failed verification: {message}"
        return DialError(f"TLS: {message}", definitive=True, reachable=True)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        refused = _REFUSED_BY_ALERT.get(reason)
        if refused is not None:
            return DialError(f"authentication failed: {refused} (TLS alert "
                             f"{reason.rsplit('_ALERT_', 1)[-1].lower().replace('_', ' ')})",
                             definitive=True, reachable=True)
        if reason in _NOT_TLS:
            return DialError("not a cypaxos replica with TLS (it did not answer in TLS: "
                             "a replica without TLS?)", definitive=True, reachable=True)
        if isinstance(exc, ssl.SSLEOFError) or "EOF" in str(exc):
            return DialError("TLS handshake failed: connection closed by the replica")
        if "_ALERT_" in reason:
            return DialError(f"TLS handshake failed: the replica sent the alert "
                             f"{reason.rsplit('_ALERT_', 1)[-1].lower().replace('_', ' ')}",
                             definitive=True, reachable=True)
        return DialError(f"TLS handshake failed: {reason.lower().replace('_', ' ') or exc}",
                         definitive=True, reachable=True)
    if isinstance(exc, OSError):
        return DialError(f"TLS handshake failed: {describe_os_error(exc)}")
    return DialError("TLS handshake failed: connection closed by the replica")


def describe_os_error(exc: BaseException) -> str:
    """A short reason for a failed connection: "connection refused", "no route to host"..."""
    # A connect to several resolved addresses fails with OSError("all attempts ...
    # failed") from a group of the per-address errors: the first of those says more.
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
