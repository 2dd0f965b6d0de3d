"""Forged protocol messages and the ways an unauthenticated process tries to get
them past a replica's handshake, in each trust mode.

`forged_messages` builds one well-formed message of every peer message type
`cypaxos.wire` knows, each of a kind that would change a replica's state if it were
believed (a ballot far ahead, a value for the next slot, a snapshot of a forged
state); `WAYS_IN[mode]` are the attempts to deliver them, each ending in what the
replica must answer.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Callable, Optional

from cypaxos import commands, wire
from cypaxos.protocol import make_ballot
from cypaxos.statemachine import KVStore
from cypaxos.storage import snapshots

from attacks.tooling import RawConnection, attacker_tls_context, frame

__all__ = ["FORGED_KEY", "claimed_id", "forged_ballot", "forged_messages",
           "forged_snapshot", "Aim", "Attempt", "WAYS_IN", "deliver"]

FORGED_KEY = b"forged-by-an-outsider"
"""A key only a forged message could create."""
CLAIMED_ID = 2
"""The member id the attacker claims (to replicas other than 2; replica 2 is told 3)."""


def claimed_id(target_id: int) -> int:
    """The member id an attacker claims to replica `target_id`: another member."""
    return CLAIMED_ID if target_id != CLAIMED_ID else 3


def forged_ballot(status: dict, src: int) -> int:
    """A ballot far above the cluster's (2**31 rounds up) yet within what a replica
    would take from a real peer: believed, it would depose the leader."""
    return make_ballot((status["ballot"] >> 16) + (1 << 31), src)


def forged_batch() -> bytes:
    """A slot value that would put FORGED_KEY if it were chosen (session 1, the
    cluster's first, at a sequence number far ahead)."""
    return commands.pack_client_batch(1, 1 << 20, 0, [commands.encode_put(FORGED_KEY, b"x")])


FORGED_SNAPSHOT_VALUE_BYTES = 64 << 10
"""What FORGED_KEY holds in a forged snapshot: enough that its chunks are far past a
handshake frame's size."""


def forged_snapshot(cluster_id: str, index: int, promised: int) -> bytes:
    """A well-formed snapshot file of this cluster (the attacker learns the cluster id
    from any challenge or welcome) at `index`, holding FORGED_KEY."""
    state = KVStore()
    state.apply(commands.encode_put(FORGED_KEY, os.urandom(FORGED_SNAPSHOT_VALUE_BYTES)))
    return snapshots.encode(cluster_id, (index, promised, [[0, 1 << 20, []]], state.snapshot()))


def forged_messages(cluster_id: str, status: dict, src: int) -> dict[str, list]:
    """One message of every peer message type, from `src`, against a replica whose
    status is `status`; keyed by the type's name (wire.MESSAGE_NAMES)."""
    ballot = forged_ballot(status, src)
    slot = status["commit_index"] + 1
    value = forged_batch()
    far = status["commit_index"] + 1_000_000
    snapshot = forged_snapshot(cluster_id, far, ballot)
    messages = {
        "PREPARE": [wire.PREPARE, src, ballot, slot],
        "PROMISE": [wire.PROMISE, src, ballot, slot - 1, [slot, ballot, value]],
        "NACK": [wire.NACK, src, ballot],
        "ACCEPT": [wire.ACCEPT, src, ballot, slot, [value], slot + 1],
        "ACCEPTED": [wire.ACCEPTED, src, ballot, slot, 1, slot + 1],
        "HEARTBEAT": [wire.HEARTBEAT, src, ballot, slot + 1, 1],
        "HEARTBEAT_ACK": [wire.HEARTBEAT_ACK, src, ballot, 1, slot + 1],
        "CATCHUP_REQ": [wire.CATCHUP_REQ, src, ballot, 0],
        "CHOSEN": [wire.CHOSEN, src, ballot, slot, [value]],
        "SNAPSHOT_CHUNK": [wire.SNAPSHOT_CHUNK, src, far, 0, len(snapshot), snapshot],
        "SNAPSHOT_ACK": [wire.SNAPSHOT_ACK, src, far, 0],
        "PREVOTE": [wire.PREVOTE, src, ballot],
        "PREVOTE_ACK": [wire.PREVOTE_ACK, src, ballot, 1],
    }
    return messages


@dataclass
class Aim:
    """Whom an attempt is aimed at: replica `target_id` of `cluster` at `address`,
    claiming to be member `claimed`; `foreign_certs`: another CA's certificates."""

    cluster: object
    cluster_id: str
    target_id: int
    address: str
    claimed: int
    foreign_certs: object = None


@dataclass
class Attempt:
    """What came of one delivery: the frames the replica sent (None: it closed
    without any it could send in the clear, e.g. a TLS failure), whether it closed,
    and the challenge it sent if any."""

    frames: Optional[list]
    closed: bool
    challenge: Optional[list] = None

    @property
    def refusal(self) -> Optional[str]:
        """The reason of the replica's refused frame, if it sent one (last)."""
        if self.frames and self.frames[-1][0] == "refused":
            return self.frames[-1][1]
        return None

    def welcomed(self) -> bool:
        """Whether the replica ever welcomed this connection."""
        return any(type(f) is list and f and f[0] == "welcome" for f in self.frames or ())


def _plain(aim: Aim, body: bytes, hello: list) -> Attempt:
    """Send `hello` and `body` in one write on plain TCP; collect until closed."""
    with RawConnection(aim.address) as conn:
        conn.send(frame(hello) + body)
        return Attempt(conn.frames_until_closed(), conn.closed)


def _no_proof(aim, body):
    """A peer hello that claims a member id and offers no proof (no nonce)."""
    return _plain(aim, body, ["peer", aim.cluster_id, aim.claimed])


def _challenged(aim: Aim, body: bytes, proof: Optional[bytes]) -> Attempt:
    """A keyed peer hello; after the challenge, `proof` (None: none at all) and `body`."""
    with RawConnection(aim.address) as conn:
        conn.send_frames(["peer", aim.cluster_id, aim.claimed, os.urandom(32)])
        challenge = conn.next_frame()
        assert challenge is not None and challenge[0] == "challenge", challenge
        conn.send((frame(["proof", proof]) if proof is not None else b"") + body)
        return Attempt(conn.frames_until_closed(), conn.closed, challenge)


def _wrong_proof(aim, body):
    """A keyed peer hello answered with a proof made without the secret."""
    return _challenged(aim, body, os.urandom(32))


def _skipped_proof(aim, body):
    """A keyed peer hello, then the messages where the proof should be."""
    return _challenged(aim, body, None)


def _tls(aim: Aim, body: bytes, context: ssl.SSLContext) -> Attempt:
    """Under TLS with `context`; a TLS failure (at once or at the first read: TLS
    1.3 checks the client's certificate after the client finished) is a close
    without frames."""
    hello = frame(["peer", aim.cluster_id, aim.claimed])
    try:
        conn = RawConnection(aim.address, tls_context=context)
    except (ssl.SSLError, OSError):
        return Attempt(None, True)
    with conn:
        conn.send(hello + body)
        try:
            frames = conn.frames_until_closed()
        except wire.ProtocolError:   # not frames: a TLS alert decoded as one
            return Attempt(None, True)
        return Attempt(frames, conn.closed)


def _tls_plain_tcp(aim, body):
    """The hello and messages in the clear, to a replica that speaks only TLS."""
    with RawConnection(aim.address) as conn:
        conn.send(frame(["peer", aim.cluster_id, aim.claimed]) + body)
        received = conn.wait_closed()
    assert b"welcome" not in received
    return Attempt(None, True)


def _tls_no_certificate(aim, body):
    """TLS without any certificate."""
    return _tls(aim, body, attacker_tls_context())


def _tls_foreign_ca(aim, body):
    """TLS with the claimed replica's certificate from another CA (another cluster's)."""
    foreign = aim.foreign_certs
    return _tls(aim, body, attacker_tls_context(
        foreign / f"replica-{aim.claimed}.pem", foreign / f"replica-{aim.claimed}.key"))


def _tls_client_certificate(aim, body):
    """TLS with the cluster's own client certificate, posing as a peer."""
    certs = aim.cluster.certs
    return _tls(aim, body,
                attacker_tls_context(certs / "client.pem", certs / "client.key"))


# (how, what the replica must answer: a substring of its refusal, or None for a
# close without a refusal frame: TLS refused the connection)
_SECRET_WAYS = {
    "no-proof": (_no_proof, "requires the cluster secret"),
    "wrong-proof": (_wrong_proof, "wrong cluster secret"),
    "skipped-proof": (_skipped_proof, "handshake frame"),
}
WAYS_IN: dict[str, dict[str, tuple[Callable, Optional[str]]]] = {
    "tls": {
        "plain-tcp": (_tls_plain_tcp, None),
        "no-certificate": (_tls_no_certificate, None),
        "foreign-ca": (_tls_foreign_ca, None),
        "client-certificate": (_tls_client_certificate, "a client certificate cannot act as a peer"),
    },
    "secret": _SECRET_WAYS,
    "local": _SECRET_WAYS,
}


def deliver(way: Callable, aim: Aim, body: bytes, expected: Optional[str]) -> Attempt:
    """Try `way` with `body` after the hello; check that the replica refused (with
    `expected` in its reason) or closed, never welcomed."""
    attempt = way(aim, body)
    assert not attempt.welcomed(), f"the replica welcomed a forger: {attempt.frames}"
    assert attempt.closed, f"the replica kept the connection open: {attempt.frames}"
    if expected is None:
        assert not attempt.frames, attempt.frames
    else:
        assert attempt.refusal is not None and expected in attempt.refusal, attempt.frames
    return attempt
