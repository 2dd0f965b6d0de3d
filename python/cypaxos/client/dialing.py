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
cypaxos replica by its first bytes.
"""
from __future__ import annotations

import socket
from typing import Optional

from ..groups import leaves
from ..security.handshake import HANDSHAKE_FRAME_BYTES_MAX, Authenticated, Dialer

__all__ = ["DialError", "Handshake", "connect_failure"]

_FIRST_BYTES = 40   # kept of what the other side sent first, to say what it is


class DialError(Exception):
    """A dial failed: `reason` in a few words ("connection refused", "timed out", "not
    a cypaxos replica (...)"), `definitive` and `reachable` as in the module doc;
    `farewell`: bytes to send before closing, if the connection still takes them (a
    refusal that tells the replica why)."""

    def __init__(self, reason: str, *, definitive: bool = False, reachable: bool = False,
                 farewell: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.definitive = definitive
        self.reachable = reachable
        self.farewell = farewell


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
    token or under TLS, the `Dialer.client(...)` that says so).  Send `start()`, then
    feed every read to `receive_data` (b"" at end of file) and send what it returns,
    until `done`; it raises DialError if the dial failed.  Then `cluster_id` and
    `replica_id` say whom the client reached, and `trailing_data` holds what came
    after the welcome (the connection's frames).
    """

    def __init__(self, dialer: Optional[Dialer] = None) -> None:
        self._dialer = dialer if dialer is not None else Dialer.client()
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
            raise DialError("connection closed by the replica")
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
