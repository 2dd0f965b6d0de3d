"""Who is calling: the handshake at the start of every connection (sans-I/O).

Theory of operation
-------------------
A connection starts with a few small frames (docs/internals.md, "Wire"), in the
usual framing (``u32 length | CBOR body``) but bounded to HANDSHAKE_FRAME_BYTES_MAX:
the length is checked before a body is read, so nothing a caller sends is decoded
beyond those few hundred bytes until it is authenticated.

    dialer                                   acceptor
    ["peer", cluster_id, id, nonce_d]   ->                 (or ["client", nonce_d])
                                        <-   ["challenge", cluster_id, id, nonce_a]
    ["proof", dialer_mac]               ->
                                        <-   ["welcome", cluster_id, id, acceptor_mac]

That is the keyed form: a replica with a cluster secret, or a client with a token.
Each side proves that it knows the key with an HMAC-SHA256 over the transcript: the
protocol label, its role ("dialer" or "acceptor"), the kind ("peer" or "client"), the
cluster id, both replica ids (0 for a client) and both nonces.  So nothing secret
crosses the wire, every proof is bound to a fresh random nonce from each side (a
recorded transcript replayed to either side fails), a proof cannot be sent back as
the other side's (the roles differ), and a proof made for one cluster, one pair of
replicas or one kind of key is worth nothing for another.  The acceptor proves only
after the dialer has: it never computes a MAC for a caller who does not know the key.
Proofs are compared with `hmac.compare_digest`.

Without a key the hello has no nonce, and the acceptor answers with a welcome without
a MAC (or refuses):

    ["peer", cluster_id, id]   or   ["client"]    ->
                                                  <-   ["welcome", cluster_id, id]

which is right under TLS, where the certificates decide (`peer_certificate`: the
identity `cypaxos.security.tls.peer_identity` read from the other side's verified
certificate; a peer hello must name the replica its certificate names, a client
certificate is never a peer), and with ``--insecure`` or anonymous clients.  A
cluster secret can be used under TLS too; then both must pass.

Either side that refuses sends ``["refused", reason]`` (while the other side is still
in the handshake) and the connection is closed, so the user reads "authentication
failed: <reason>" instead of a reset.

The machines
------------
`Acceptor` (the replica a connection arrived at) and `Dialer` (a replica dialing a
peer, or a client) are state machines in the manner of h11: the owner feeds whatever
the socket returned to `receive_data(bytes)` (b"" at end of file), sends the bytes it
returns, and looks at `outcome`: None while the handshake goes on, `Authenticated` or
`Refused` at its end.  A `Dialer` first sends what `start()` returns.  After
`Authenticated`, `trailing_data` holds the bytes that came after the last handshake
frame (a client's first requests, say): they belong to the connection's frame decoder.
The machines do no I/O and keep no clock (the owner times the handshake out), and
take their randomness from an injected `random_bytes`.  Every transition is in this
file, in the `_on_*` handlers; `State` names where each machine may be.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Callable, Container, Optional, Union

from cypaxos import wire
from cypaxos.errors import ConfigError
from cypaxos.security.identity import CLIENT, Identity, describe
from cypaxos.security.secrets import check_key
from cypaxos.wire import CLUSTER_ID_CHARS_MAX, REPLICA_ID_MAX, ProtocolError

__all__ = [
    "HANDSHAKE_FRAME_BYTES_MAX", "NONCE_BYTES", "MAC_BYTES", "REASON_BYTES_MAX",
    "PROTOCOL_LABEL", "State", "Method", "Authenticated", "Refused", "ReplicaAuth",
    "Acceptor", "Dialer", "parse_frame", "CLIENT",
]

HANDSHAKE_FRAME_BYTES_MAX = 640
"""Largest handshake frame body: a peer hello with a 128-character cluster id of
4-byte UTF-8 characters and a nonce is 558 bytes."""
NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
REASON_BYTES_MAX = 160
"""A refusal's reason is cut to this many UTF-8 bytes when sent."""
PROTOCOL_LABEL = b"cypaxos-auth-1"
"""The first field of every MAC'd transcript: a proof of another protocol (or of a
later version of this one) never passes for this one."""

_NEED_DATA = object()  # no whole frame buffered yet (None is a frame: CBOR null)
_DIALER = b"dialer"
_ACCEPTOR = b"acceptor"
_PEER = b"peer"
_CLIENT_KIND = b"client"


class State(enum.Enum):
    """Where a handshake machine is.

    Acceptor: AWAIT_HELLO -> [AWAIT_PROOF ->] AUTHENTICATED.
    Dialer: SEND_HELLO -> AWAIT_CHALLENGE (keyed) -> AWAIT_WELCOME -> AUTHENTICATED,
    or SEND_HELLO -> AWAIT_WELCOME (no key) -> AUTHENTICATED.
    Any state but AUTHENTICATED may go to REFUSED.  Both are final.
    """

    SEND_HELLO = "send hello"
    AWAIT_HELLO = "await hello"
    AWAIT_CHALLENGE = "await challenge"
    AWAIT_PROOF = "await proof"
    AWAIT_WELCOME = "await welcome"
    AUTHENTICATED = "authenticated"
    REFUSED = "refused"


class Method(enum.Enum):
    """What authenticated the other side."""

    CERTIFICATE = "certificate"  # a TLS certificate signed by the cluster's CA
    SECRET = "secret"            # the cluster secret (peers)
    TOKEN = "token"              # a client token
    ANONYMOUS = "anonymous"      # nothing: the replica accepts anonymous clients
    INSECURE = "insecure"        # nothing: neither TLS nor a key on this connection


@dataclass(frozen=True)
class Authenticated:
    """The handshake succeeded.

    `peer`: on the acceptor, the dialing replica's id or CLIENT; on a dialer, the
    acceptor's replica id.  `cluster_id`: the cluster the acceptor belongs to.
    `method`: what authenticated the other side.
    """

    peer: Union[int, str]
    cluster_id: str
    method: Method


@dataclass(frozen=True)
class Refused:
    """The handshake failed: close the connection (after sending what was returned).

    `remote` is True when the other side refused and `reason` is what it said
    (printable characters only, at most REASON_BYTES_MAX long); False when this side
    refused, or the connection ended first.
    """

    reason: str
    remote: bool = False


Outcome = Union[Authenticated, Refused]


@dataclass(frozen=True)
class ReplicaAuth:
    """How one replica authenticates: the same settings for accepting and dialing.

    `cluster_secrets`: the keys of ``--cluster-secret-file`` (the first is proved
    with when dialing, any is accepted: rotation); empty means peers are not asked
    for one.  `client_tokens`: the keys of ``--token-file``, any accepted.  `tls`:
    whether connections are under TLS (then `peer_certificate` tells the machines
    who the other side is).
    """

    cluster_id: str
    replica_id: int
    cluster_secrets: tuple = ()
    client_tokens: tuple = ()
    allow_anonymous_clients: bool = False
    tls: bool = False

    def __post_init__(self) -> None:
        if not _is_cluster_id(self.cluster_id):
            raise ConfigError(f"cluster id {self.cluster_id!r} is not 1 to "
                              f"{CLUSTER_ID_CHARS_MAX} characters")
        if not _is_replica_id(self.replica_id):
            raise ConfigError(f"replica id {self.replica_id!r} is not in 1..{REPLICA_ID_MAX}")
        secrets = tuple(self.cluster_secrets)
        tokens = tuple(self.client_tokens)
        for key in secrets:
            check_key(key, "cluster secret")
        for key in tokens:
            check_key(key, "client token")
        if set(secrets) & set(tokens):
            # A client holding it could then prove the cluster secret.
            raise ConfigError("a client token must not also be a cluster secret")
        object.__setattr__(self, "cluster_secrets", secrets)
        object.__setattr__(self, "client_tokens", tokens)

    @property
    def peer_mode(self) -> str:
        """How peers authenticate: "tls", "secret", "tls+secret" or "insecure"."""
        parts = [name for name, on in (("tls", self.tls), ("secret", self.cluster_secrets)) if on]
        return "+".join(parts) or "insecure"


# ---------------------------------------------------------------------------
# Frames

def _is_cluster_id(value) -> bool:
    return type(value) is str and 0 < len(value) <= CLUSTER_ID_CHARS_MAX


def _is_replica_id(value) -> bool:
    return type(value) is int and 1 <= value <= REPLICA_ID_MAX


def _is_blob(value, size: int) -> bool:
    return type(value) is bytes and len(value) == size


def _printable(text: str) -> str:
    # A reason comes from an unauthenticated party and ends up in logs and terminals.
    return "".join(c if c.isprintable() else "?" for c in text[:REASON_BYTES_MAX])


def parse_frame(obj) -> tuple:
    """Check a decoded handshake frame; return it as a tuple with None for absent parts.

    ("peer", cluster_id, replica_id, nonce|None), ("client", nonce|None),
    ("challenge", cluster_id, replica_id, nonce), ("proof", mac),
    ("welcome", cluster_id, replica_id, mac|None), ("refused", reason).
    ProtocolError for anything else.
    """
    if type(obj) is not list or not obj or type(obj[0]) is not str:
        raise ProtocolError("handshake frame is not [kind, ...]")
    kind = obj[0]
    n = len(obj)
    if kind == "peer" or kind == "welcome":
        blob = NONCE_BYTES if kind == "peer" else MAC_BYTES
        if (n in (3, 4) and _is_cluster_id(obj[1]) and _is_replica_id(obj[2])
                and (n == 3 or _is_blob(obj[3], blob))):
            return (kind, obj[1], obj[2], obj[3] if n == 4 else None)
    elif kind == "client":
        if n == 1 or (n == 2 and _is_blob(obj[1], NONCE_BYTES)):
            return ("client", obj[1] if n == 2 else None)
    elif kind == "challenge":
        if (n == 4 and _is_cluster_id(obj[1]) and _is_replica_id(obj[2])
                and _is_blob(obj[3], NONCE_BYTES)):
            return ("challenge", obj[1], obj[2], obj[3])
    elif kind == "proof":
        if n == 2 and _is_blob(obj[1], MAC_BYTES):
            return ("proof", obj[1])
    elif kind == "refused":
        if n == 2 and type(obj[1]) is str:
            return ("refused", _printable(obj[1]))
    else:
        raise ProtocolError(f"unknown handshake frame {_printable(kind[:20])!r}")
    raise ProtocolError(f"malformed {kind} frame")


def _frame(*items) -> bytes:
    return wire.encode_frame(list(items))


def _refused_frame(reason: str) -> bytes:
    data = reason.encode("utf-8")[:REASON_BYTES_MAX]
    return _frame("refused", data.decode("utf-8", "ignore"))


def _mac(key: bytes, role: bytes, kind: bytes, cluster_id: str, dialer_id: int,
         acceptor_id: int, dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    # Every field length-prefixed: no two transcripts share an encoding.
    fields = (PROTOCOL_LABEL, role, kind, cluster_id.encode("utf-8"),
              dialer_id.to_bytes(2, "big"), acceptor_id.to_bytes(2, "big"),
              dialer_nonce, acceptor_nonce)
    message = b"".join(len(field).to_bytes(2, "big") + field for field in fields)
    return hmac.new(key, message, hashlib.sha256).digest()


def _brief(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


# ---------------------------------------------------------------------------
# The machines

class _Handshake:
    """What both machines share: framing, the final states, refusals."""

    def __init__(self, state: State, random_bytes: Callable[[int], bytes]) -> None:
        self.state = state
        self.outcome: Optional[Outcome] = None
        self.trailing_data = b""  #: bytes after the last handshake frame (once authenticated)
        #: The other side closed the connection before the handshake ended.
        self.closed_early = False
        self._buffer = bytearray()
        self._random_bytes = random_bytes

    def receive_data(self, data: bytes) -> bytes:
        """Take received bytes (b"": the other side closed); return the bytes to send.

        Afterwards `outcome` says whether the handshake is over.  Hostile input never
        raises: it ends in `Refused`.  Calling this after the end is a bug
        (RuntimeError): bytes after the handshake belong to the connection.
        """
        if self.outcome is not None:
            raise RuntimeError(f"the handshake is over ({self.state.value})")
        if self.state is State.SEND_HELLO:
            raise RuntimeError("start() first")
        if not data:
            self.closed_early = True
            self._refuse("the connection closed during the handshake", send=False)
            return b""
        self._buffer += data
        out = []
        while self.outcome is None:
            try:
                obj = self._next_body()
                if obj is _NEED_DATA:
                    break
                frame = parse_frame(obj)
            except ProtocolError as exc:
                out.append(self._refuse(str(exc)))
                break
            if frame[0] == "refused":
                self._finish(Refused(frame[1], remote=True))
                break
            out.append(self._on_frame(frame))
        if self.state is State.AUTHENTICATED:
            self.trailing_data = bytes(self._buffer)
        if self.outcome is not None:
            self._buffer = bytearray()
        return b"".join(out)

    def _next_body(self):
        buffer = self._buffer
        if len(buffer) < 4:
            return _NEED_DATA
        length = int.from_bytes(buffer[:4], "big")
        if length > HANDSHAKE_FRAME_BYTES_MAX:
            raise ProtocolError(f"handshake frame of {length} bytes, more than "
                                f"{HANDSHAKE_FRAME_BYTES_MAX}")
        if len(buffer) < 4 + length:
            return _NEED_DATA
        body = bytes(buffer[4:4 + length])
        del buffer[:4 + length]
        return wire.decode_body(body)

    def _on_frame(self, frame: tuple) -> bytes:
        raise NotImplementedError

    def _finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.state = State.AUTHENTICATED if isinstance(outcome, Authenticated) else State.REFUSED

    def _refuse(self, reason: str, *, send: bool = True) -> bytes:
        """End in Refused(reason); the refused frame to send, if `send`."""
        self._finish(Refused(reason))
        return _refused_frame(reason) if send else b""

    def _unexpected(self, frame: tuple) -> bytes:
        return self._refuse(f"unexpected {frame[0]} frame ({self.state.value})")


class Acceptor(_Handshake):
    """The handshake of a replica on a connection it accepted.

    `member_ids`: the replica ids a peer may claim (this replica's own is refused).
    `peer_certificate`: under TLS, who the other side's verified certificate names
    (`tls.peer_identity`); None without TLS or without a certificate.
    """

    def __init__(self, auth: ReplicaAuth, member_ids: Container[int], *,
                 peer_certificate: Identity = None,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if peer_certificate is not None and not auth.tls:
            raise ValueError("peer_certificate without TLS")
        super().__init__(State.AWAIT_HELLO, random_bytes)
        self.auth = auth
        self.member_ids = member_ids
        self.peer_certificate = peer_certificate
        #: What the caller's hello said it is ("peer" or "client"; "" before a hello).
        self.hello_kind = ""
        # What the proof must be over; invariant: set (kind non-empty, both nonces
        # NONCE_BYTES long) exactly when a challenge was sent (AWAIT_PROOF and after).
        self._kind = b""
        self._dialer_id = 0
        self._dialer_nonce = b""
        self._acceptor_nonce = b""

    def _on_frame(self, frame: tuple) -> bytes:
        if self.state is State.AWAIT_HELLO:
            if frame[0] in ("peer", "client"):
                self.hello_kind = frame[0]
            if frame[0] == "peer":
                return self._on_peer_hello(*frame[1:])
            if frame[0] == "client":
                return self._on_client_hello(frame[1])
        elif frame[0] == "proof":  # AWAIT_PROOF
            return self._on_proof(frame[1])
        return self._unexpected(frame)

    def _on_peer_hello(self, cluster_id: str, peer_id: int, nonce: Optional[bytes]) -> bytes:
        auth = self.auth
        if cluster_id != auth.cluster_id:
            return self._refuse(f"wrong cluster id {_brief(cluster_id)}: this replica "
                                f"belongs to cluster {auth.cluster_id!r}")
        if peer_id == auth.replica_id:
            return self._refuse(f"replica {peer_id} is this replica")
        if peer_id not in self.member_ids:
            return self._refuse(f"replica {peer_id} is not a member of cluster {auth.cluster_id!r}")
        if auth.tls:
            certificate = self.peer_certificate
            if certificate == CLIENT:
                return self._refuse("a client certificate cannot act as a peer")
            if certificate != peer_id:
                return self._refuse(f"the hello names replica {peer_id} but the "
                                    f"certificate names {describe(certificate)}")
        if auth.cluster_secrets:
            if nonce is None:
                return self._refuse("this cluster requires the cluster secret "
                                    "(--cluster-secret-file)")
            return self._challenge(_PEER, peer_id, nonce)
        if nonce is not None:
            return self._refuse("this replica has no cluster secret (--cluster-secret-file)")
        method = Method.CERTIFICATE if auth.tls else Method.INSECURE
        return self._welcome(peer_id, method)

    def _on_client_hello(self, nonce: Optional[bytes]) -> bytes:
        auth = self.auth
        if self.peer_certificate is not None:
            # A verified certificate: a client's, or a replica's used by a tool.
            return self._welcome(CLIENT, Method.CERTIFICATE)
        if nonce is not None:
            if auth.client_tokens:
                return self._challenge(_CLIENT_KIND, 0, nonce)
            return self._refuse("this replica accepts no client tokens (--token-file)")
        if auth.allow_anonymous_clients:
            return self._welcome(CLIENT, Method.ANONYMOUS)
        wanted = [what for what, on in (("a client certificate", auth.tls),
                                        ("a client token (--token-file)", auth.client_tokens))
                  if on]
        if not wanted:
            return self._refuse("this replica accepts no clients")
        return self._refuse(f"this cluster requires {' or '.join(wanted)}")

    def _challenge(self, kind: bytes, dialer_id: int, dialer_nonce: bytes) -> bytes:
        self._kind = kind
        self._dialer_id = dialer_id
        self._dialer_nonce = dialer_nonce
        self._acceptor_nonce = self._random_bytes(NONCE_BYTES)
        if len(self._acceptor_nonce) != NONCE_BYTES:
            raise ValueError("random_bytes returned the wrong length")
        self.state = State.AWAIT_PROOF
        return _frame("challenge", self.auth.cluster_id, self.auth.replica_id, self._acceptor_nonce)

    def _on_proof(self, proof: bytes) -> bytes:
        auth = self.auth
        peer = self._kind == _PEER
        keys = auth.cluster_secrets if peer else auth.client_tokens
        transcript = (self._kind, auth.cluster_id, self._dialer_id, auth.replica_id,
                      self._dialer_nonce, self._acceptor_nonce)
        matched = None
        for key in keys:  # every key, no early exit: the time says nothing about which
            if hmac.compare_digest(_mac(key, _DIALER, *transcript), proof) and matched is None:
                matched = key
        if matched is None:
            return self._refuse("wrong cluster secret" if peer else "client token not accepted")
        mac = _mac(matched, _ACCEPTOR, *transcript)
        if peer:
            return self._welcome(self._dialer_id, Method.SECRET, mac)
        return self._welcome(CLIENT, Method.TOKEN, mac)

    def _welcome(self, peer: Union[int, str], method: Method, mac: Optional[bytes] = None) -> bytes:
        auth = self.auth
        self._finish(Authenticated(peer, auth.cluster_id, method))
        if mac is None:
            return _frame("welcome", auth.cluster_id, auth.replica_id)
        return _frame("welcome", auth.cluster_id, auth.replica_id, mac)


class Dialer(_Handshake):
    """The handshake of the side that dialed: a replica reaching a peer, or a client.

    Made with `Dialer.peer(...)` or `Dialer.client(...)`; `start()` gives the first
    bytes to send.
    """

    def __init__(self, *, kind: bytes, key: Optional[bytes], tls: bool,
                 peer_certificate: Identity, cluster_id: Optional[str] = None,
                 replica_id: int = 0, peer_id: Optional[int] = None,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if peer_certificate is not None and not tls:
            raise ValueError("peer_certificate without TLS")
        super().__init__(State.SEND_HELLO, random_bytes)
        self._kind = kind
        self._key = key
        self.tls = tls
        self.peer_certificate = peer_certificate
        self.cluster_id = cluster_id   # ours (a peer); a client learns it from the acceptor
        self.replica_id = replica_id   # ours; 0 for a client
        self.peer_id = peer_id         # the replica dialed (a peer); a client learns it
        self._nonce = b""
        self._acceptor_nonce: Optional[bytes] = None  # set by a challenge

    @classmethod
    def peer(cls, auth: ReplicaAuth, peer_id: int, *, peer_certificate: Identity = None,
             random_bytes: Callable[[int], bytes] = os.urandom) -> "Dialer":
        """A replica dialing replica `peer_id` of its cluster."""
        if not _is_replica_id(peer_id) or peer_id == auth.replica_id:
            raise ValueError(f"cannot dial replica {peer_id!r}")
        key = auth.cluster_secrets[0] if auth.cluster_secrets else None
        return cls(kind=_PEER, key=key, tls=auth.tls, peer_certificate=peer_certificate,
                   cluster_id=auth.cluster_id, replica_id=auth.replica_id, peer_id=peer_id,
                   random_bytes=random_bytes)

    @classmethod
    def client(cls, *, token: Optional[bytes] = None, tls: bool = False,
               peer_certificate: Identity = None,
               random_bytes: Callable[[int], bytes] = os.urandom) -> "Dialer":
        """A client: with a token (the first key of ``--token-file``) or without."""
        if token is not None:
            check_key(token, "client token")
        return cls(kind=_CLIENT_KIND, key=token, tls=tls, peer_certificate=peer_certificate,
                   random_bytes=random_bytes)

    @property
    def _what(self) -> str:
        return f"replica {self.peer_id}" if self.peer_id is not None else "the replica"

    def start(self) -> bytes:
        """The first bytes to send: the hello (or, if the acceptor's certificate is
        not the one expected, a refusal: outcome is then Refused)."""
        if self.state is not State.SEND_HELLO:
            raise RuntimeError("start() twice")
        peer = self._kind == _PEER
        if self.tls:
            certificate = self.peer_certificate
            if peer and certificate != self.peer_id:
                return self._refuse(f"dialed replica {self.peer_id} but its certificate "
                                    f"names {describe(certificate)}")
            if not peer and type(certificate) is not int:
                return self._refuse(f"the replica's certificate names {describe(certificate)}, "
                                    f"not a replica")
        if self._key is not None:
            self._nonce = self._random_bytes(NONCE_BYTES)
            if len(self._nonce) != NONCE_BYTES:
                raise ValueError("random_bytes returned the wrong length")
            self.state = State.AWAIT_CHALLENGE
            nonce = (self._nonce,)
        else:
            self.state = State.AWAIT_WELCOME
            nonce = ()
        if peer:
            return _frame("peer", self.cluster_id, self.replica_id, *nonce)
        return _frame("client", *nonce)

    def _on_frame(self, frame: tuple) -> bytes:
        kind = frame[0]
        if kind == "challenge":
            return self._on_challenge(*frame[1:])
        if kind == "welcome":
            return self._on_welcome(*frame[1:])
        return self._unexpected(frame)

    def _check_acceptor(self, cluster_id: str, replica_id: int) -> Optional[str]:
        """Why the acceptor is not the one expected, or None."""
        if self._kind == _PEER:
            if cluster_id != self.cluster_id or replica_id != self.peer_id:
                return (f"replica {self.peer_id}'s address answers as cluster "
                        f"{_brief(cluster_id)} replica {replica_id}, not cluster "
                        f"{self.cluster_id!r} replica {self.peer_id}")
        elif self._acceptor_nonce is not None:
            if cluster_id != self.cluster_id or replica_id != self.peer_id:
                return "the welcome names another replica than the challenge"
        return None

    def _on_challenge(self, cluster_id: str, replica_id: int, nonce: bytes) -> bytes:
        if self.state is not State.AWAIT_CHALLENGE:
            if self._key is None:
                return self._refuse(
                    f"{self._what} requires the cluster secret (--cluster-secret-file)"
                    if self._kind == _PEER else
                    "the cluster requires a client token (--token-file)")
            return self._refuse("a second challenge")
        problem = self._check_acceptor(cluster_id, replica_id)
        if problem is not None:
            return self._refuse(problem)
        if self._kind == _CLIENT_KIND:
            self.cluster_id = cluster_id
            self.peer_id = replica_id
        self._acceptor_nonce = nonce
        self.state = State.AWAIT_WELCOME
        return _frame("proof", self._mac(_DIALER))

    def _mac(self, role: bytes) -> bytes:
        return _mac(self._key, role, self._kind, self.cluster_id, self.replica_id,
                    self.peer_id, self._nonce, self._acceptor_nonce)

    def _on_welcome(self, cluster_id: str, replica_id: int, mac: Optional[bytes]) -> bytes:
        peer = self._kind == _PEER
        if self.state is State.AWAIT_CHALLENGE:
            # The acceptor took us without asking for the key.
            if peer:
                return self._refuse(f"{self._what} did not ask for the cluster secret "
                                    f"(it has none)", send=False)
            if not self.tls:
                return self._refuse("the replica did not ask for the client token, so "
                                    "it cannot prove it is one of the cluster", send=False)
            if mac is not None:
                return self._refuse("unexpected proof in the welcome", send=False)
            return self._welcomed(cluster_id, replica_id, Method.CERTIFICATE)
        problem = self._check_acceptor(cluster_id, replica_id)
        if problem is not None:
            return self._refuse(problem, send=False)
        if self._acceptor_nonce is None:  # no key: no proof either way
            if mac is not None:
                return self._refuse("unexpected proof in the welcome", send=False)
            return self._welcomed(cluster_id, replica_id,
                                  Method.CERTIFICATE if self.tls else Method.INSECURE)
        if mac is None or not hmac.compare_digest(self._mac(_ACCEPTOR), mac):
            return self._refuse(f"{self._what} did not prove it knows the "
                                f"{'cluster secret' if peer else 'client token'}", send=False)
        return self._welcomed(cluster_id, replica_id, Method.SECRET if peer else Method.TOKEN)

    def _welcomed(self, cluster_id: str, replica_id: int, method: Method) -> bytes:
        self._finish(Authenticated(replica_id, cluster_id, method))
        return b""
