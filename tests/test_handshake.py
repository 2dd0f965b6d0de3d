"""The connection handshake (cypaxos.security.handshake), both machines paired in memory.

Every mode succeeds (insecure, cluster secret, TLS identities, both; anonymous, token
and certificate clients; rotated keys), and every kind of failure ends in `Refused` on
the side that detects it and, while the other side still listens, a refused frame that
gives it the same reason.  Hypothesis feeds garbage into every state.
"""
from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cypaxos import wire
from cypaxos.errors import ConfigError
from cypaxos.security import handshake
from cypaxos.security.handshake import (
    CLIENT, HANDSHAKE_FRAME_BYTES_MAX, Acceptor, Authenticated, Dialer, Method, Refused,
    ReplicaAuth, State, parse_frame,
)

pytestmark = pytest.mark.fast

CLUSTER = "c-test"
MEMBERS = frozenset({1, 2, 3})
SECRET = b"7f3c0e9a51d24b68a0c4e2f1d9b7a6c5e4f3a2b1c0d9e8f7"
OLD_SECRET = b"0123456789abcdefABCDEF0123456789abcdef0123"
TOKEN = b"tok-5d1e4c3b2a19f8e7d6c5b4a39281706f5e4d"
OTHER_TOKEN = b"tok-a1b2c3d4e5f60718293a4b5c6d7e8f9012"


def auth(replica_id, **kw):
    return ReplicaAuth(cluster_id=kw.pop("cluster_id", CLUSTER), replica_id=replica_id, **kw)


def counter_random():
    """random_bytes whose output differs on every call (and is reproducible)."""
    state = {"n": 0}

    def random_bytes(n):
        state["n"] += 1
        return state["n"].to_bytes(4, "big").rjust(n, b"\x5a")
    return random_bytes


def run(dialer: Dialer, acceptor: Acceptor) -> list[tuple[str, bytes]]:
    """Connect the two machines until neither has anything to send; the bytes each sent."""
    sent = []
    data, towards = dialer.start(), "acceptor"
    while data:
        sent.append((towards, data))
        machine = acceptor if towards == "acceptor" else dialer
        if machine.outcome is not None:
            break   # the socket would be closed by now
        data = machine.receive_data(data)
        towards = "dialer" if towards == "acceptor" else "acceptor"
    return sent


def frames(data: bytes) -> list[tuple]:
    """The handshake frames in `data`, parsed."""
    decoder = wire.FrameDecoder(HANDSHAKE_FRAME_BYTES_MAX)
    decoder.feed(data)
    out = []
    while (obj := decoder.next_frame()) is not None:
        out.append(parse_frame(obj))
    assert decoder.buffered == 0
    return out


def assert_ok(dialer, acceptor, peer, method, dialer_method=None):
    assert acceptor.outcome == Authenticated(peer, CLUSTER, method), acceptor.outcome
    assert dialer.outcome == Authenticated(acceptor.auth.replica_id, CLUSTER,
                                           dialer_method or method), dialer.outcome
    assert acceptor.state is dialer.state is State.AUTHENTICATED
    assert acceptor.trailing_data == dialer.trailing_data == b""


def assert_refused(dialer, acceptor, reason, *, by="acceptor"):
    """`by` refused with `reason` (a substring) and the other side heard it (or not)."""
    refuser, other = (acceptor, dialer) if by == "acceptor" else (dialer, acceptor)
    assert isinstance(refuser.outcome, Refused), refuser.outcome
    assert reason in refuser.outcome.reason, refuser.outcome
    assert not refuser.outcome.remote
    assert refuser.state is State.REFUSED
    return other


# ---------------------------------------------------------------- success, every mode

def test_insecure_peers():
    dialer, acceptor = Dialer.peer(auth(2), 1), Acceptor(auth(1), MEMBERS)
    sent = run(dialer, acceptor)
    assert_ok(dialer, acceptor, 2, Method.INSECURE)
    # The key-less form is the hello/welcome pair the replica has always spoken.
    assert [frames(data) for _, data in sent] == [[("peer", CLUSTER, 2, None)],
                                                 [("welcome", CLUSTER, 1, None)]]


def test_cluster_secret_peers():
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    sent = run(dialer, acceptor)
    assert_ok(dialer, acceptor, 2, Method.SECRET)
    kinds = [frames(data)[0][0] for _, data in sent]
    assert kinds == ["peer", "challenge", "proof", "welcome"]
    # Nothing secret on the wire.
    assert all(SECRET not in data for _, data in sent)
    assert all(len(data) - 4 <= HANDSHAKE_FRAME_BYTES_MAX for _, data in sent)


def test_tls_peers_certificate_decides():
    dialer = Dialer.peer(auth(2, tls=True), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=2)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, 2, Method.CERTIFICATE)


def test_tls_and_secret_peers_need_both():
    settings_ = dict(tls=True, cluster_secrets=(SECRET,))
    dialer = Dialer.peer(auth(3, **settings_), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, **settings_), MEMBERS, peer_certificate=3)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, 3, Method.SECRET)
    # The right secret does not make up for the wrong certificate.
    dialer = Dialer.peer(auth(3, **settings_), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, **settings_), MEMBERS, peer_certificate=2)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "certificate names replica 2")


@pytest.mark.parametrize("dialer_keys", [(SECRET,), (OLD_SECRET,), (SECRET, OLD_SECRET)])
def test_secret_rotation_any_key_of_the_acceptor(dialer_keys):
    dialer = Dialer.peer(auth(2, cluster_secrets=dialer_keys), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET, OLD_SECRET)), MEMBERS)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, 2, Method.SECRET)


def test_anonymous_client():
    dialer, acceptor = Dialer.client(), Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    sent = run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.ANONYMOUS, Method.INSECURE)
    assert [frames(data) for _, data in sent] == [[("client", None)],
                                                 [("welcome", CLUSTER, 1, None)]]


@pytest.mark.parametrize("tokens", [(TOKEN,), (OTHER_TOKEN, TOKEN)])
def test_token_client(tokens):
    dialer = Dialer.client(token=TOKEN)
    acceptor = Acceptor(auth(1, client_tokens=tokens), MEMBERS)
    sent = run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.TOKEN)
    assert [frames(data)[0][0] for _, data in sent] == ["client", "challenge", "proof", "welcome"]
    assert all(TOKEN not in data for _, data in sent)


def test_token_client_with_anonymous_allowed_still_proves():
    # During a move to tokens: clients with one prove it, the others still get in.
    acceptor_auth = auth(1, client_tokens=(TOKEN,), allow_anonymous_clients=True)
    dialer, acceptor = Dialer.client(token=TOKEN), Acceptor(acceptor_auth, MEMBERS)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.TOKEN)
    dialer, acceptor = Dialer.client(), Acceptor(acceptor_auth, MEMBERS)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.ANONYMOUS, Method.INSECURE)


@pytest.mark.parametrize("certificate", [CLIENT, 2])
def test_certificate_client(certificate):
    # A replica's certificate may serve a tool as a client too.
    dialer = Dialer.client(tls=True, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=certificate)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.CERTIFICATE)


def test_tls_client_with_token_and_certificate():
    dialer = Dialer.client(token=TOKEN, tls=True, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True, client_tokens=(TOKEN,)), MEMBERS,
                        peer_certificate=CLIENT)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.CERTIFICATE)


def test_tls_client_without_certificate_uses_its_token():
    dialer = Dialer.client(token=TOKEN, tls=True, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True, client_tokens=(TOKEN,)), MEMBERS)
    run(dialer, acceptor)
    assert_ok(dialer, acceptor, CLIENT, Method.TOKEN)


# ---------------------------------------------------------------- framing

def test_byte_by_byte_delivery_and_trailing_data():
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    first_message = wire.encode_frame([wire.HEARTBEAT, 2, 0, 0, 0])
    hello = dialer.start()
    challenge = b"".join(acceptor.receive_data(hello[i:i + 1]) for i in range(len(hello)))
    proof = b"".join(dialer.receive_data(challenge[i:i + 1]) for i in range(len(challenge)))
    assert acceptor.state is State.AWAIT_PROOF and dialer.state is State.AWAIT_WELCOME
    # The proof and the first peer message in one read: the message is left alone.
    welcome = acceptor.receive_data(proof + first_message)
    assert acceptor.outcome == Authenticated(2, CLUSTER, Method.SECRET)
    for i in range(len(welcome)):
        assert dialer.receive_data(welcome[i:i + 1]) == b""
    assert dialer.outcome == Authenticated(1, CLUSTER, Method.SECRET)
    assert acceptor.trailing_data == first_message


def test_frames_after_the_hello_are_not_decoded():
    # A client's first requests may follow its hello; even a frame far over the
    # handshake bound (or one that is not CBOR) waits, undecoded, for the connection.
    acceptor = Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    after = struct.pack(">I", 1 << 20) + b"\xff" * 100
    out = acceptor.receive_data(wire.encode_frame(["client"]) + after)
    assert frames(out) == [("welcome", CLUSTER, 1, None)]
    assert acceptor.outcome == Authenticated(CLIENT, CLUSTER, Method.ANONYMOUS)
    assert acceptor.trailing_data == after


def test_oversized_hello_refused_from_its_length():
    acceptor = Acceptor(auth(1), MEMBERS)
    out = acceptor.receive_data(struct.pack(">I", HANDSHAKE_FRAME_BYTES_MAX + 1) + b"\x84")
    assert acceptor.outcome == Refused(f"handshake frame of {HANDSHAKE_FRAME_BYTES_MAX + 1} "
                                       f"bytes, more than {HANDSHAKE_FRAME_BYTES_MAX}")
    assert frames(out) == [("refused", acceptor.outcome.reason)]


def test_largest_hello_fits():
    cluster_id = "\U0001F600" * wire.CLUSTER_ID_CHARS_MAX  # 4 bytes each in UTF-8
    a = ReplicaAuth(cluster_id=cluster_id, replica_id=0xFFFF, cluster_secrets=(SECRET,))
    b = ReplicaAuth(cluster_id=cluster_id, replica_id=0xFFFE, cluster_secrets=(SECRET,))
    dialer, acceptor = Dialer.peer(a, 0xFFFE), Acceptor(b, {0xFFFF, 0xFFFE})
    sent = run(dialer, acceptor)
    assert isinstance(acceptor.outcome, Authenticated)
    assert max(len(data) for _, data in sent) - 4 <= HANDSHAKE_FRAME_BYTES_MAX


@pytest.mark.parametrize("body", [
    ["peer", CLUSTER],                       # too short
    ["peer", CLUSTER, 2, b"short nonce"],
    ["peer", CLUSTER, 0],                    # replica ids are 1..65535
    ["peer", CLUSTER, 70000],
    ["peer", CLUSTER, True],                 # bool is not an int here
    ["peer", "", 2],
    ["peer", "x" * 129, 2],
    ["peer", b"c-test", 2],
    ["client", "nonce"],
    ["client", b"\x00" * 32, "extra"],
    ["hello"],
    [],
    "peer",
    {"peer": 1},
    None,
])
def test_malformed_hello_refused(body):
    acceptor = Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    out = acceptor.receive_data(struct.pack(">I", len(cbor2.dumps(body))) + cbor2.dumps(body))
    assert isinstance(acceptor.outcome, Refused), acceptor.outcome
    assert frames(out) == [("refused", acceptor.outcome.reason)]


@pytest.mark.parametrize("body", [b"\xff\xff", b"\xd8\x1e\x82\x01\x02", b"\x9f\x01"])
def test_invalid_cbor_refused(body):
    acceptor = Acceptor(auth(1), MEMBERS)
    acceptor.receive_data(struct.pack(">I", len(body)) + body)
    assert isinstance(acceptor.outcome, Refused)


def test_closed_during_handshake():
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    challenge = acceptor.receive_data(dialer.start())
    assert acceptor.receive_data(b"") == b""
    assert acceptor.outcome == Refused("the connection closed during the handshake")
    assert dialer.receive_data(challenge)   # the proof, to a closed connection
    assert dialer.receive_data(b"") == b""
    assert isinstance(dialer.outcome, Refused)


def test_misuse_raises():
    acceptor = Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    acceptor.receive_data(wire.encode_frame(["client"]))
    with pytest.raises(RuntimeError):
        acceptor.receive_data(b"more")
    dialer = Dialer.client()
    with pytest.raises(RuntimeError):
        dialer.receive_data(b"x")
    dialer.start()
    with pytest.raises(RuntimeError):
        dialer.start()
    with pytest.raises(ValueError):
        Acceptor(auth(1), MEMBERS, peer_certificate=2)   # a certificate without TLS
    with pytest.raises(ValueError):
        Dialer.peer(auth(1), 1)


def test_settings_checked():
    with pytest.raises(ConfigError, match="must not also be a cluster secret"):
        auth(1, cluster_secrets=(SECRET,), client_tokens=(SECRET,))
    with pytest.raises(ConfigError, match="too weak"):
        auth(1, cluster_secrets=(b"ab" * 20,))
    with pytest.raises(ConfigError):
        auth(1, client_tokens=("a text token, not bytes, of enough length",))
    with pytest.raises(ConfigError):
        auth(0)
    with pytest.raises(ConfigError):
        auth(1, cluster_id="")
    assert auth(1).peer_mode == "insecure"
    assert auth(1, tls=True, cluster_secrets=[SECRET]).peer_mode == "tls+secret"
    assert auth(1, cluster_secrets=[SECRET]).cluster_secrets == (SECRET,)


# ---------------------------------------------------------------- failures

def test_wrong_secret():
    dialer = Dialer.peer(auth(2, cluster_secrets=(OLD_SECRET,)), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "wrong cluster secret")
    assert dialer.outcome == Refused("wrong cluster secret", remote=True)


def test_acceptor_with_the_wrong_secret_cannot_welcome():
    # A replica whose secret differs never gets to welcome: it refuses the proof.  A
    # fake acceptor that welcomes any proof cannot make one the dialer accepts.
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    fake = Acceptor(auth(1, cluster_secrets=(OLD_SECRET,)), MEMBERS)
    challenge = fake.receive_data(dialer.start())
    dialer.receive_data(challenge)
    forged = wire.encode_frame(["welcome", CLUSTER, 1, b"\x00" * 32])
    assert dialer.receive_data(forged) == b""
    assert dialer.outcome == Refused("replica 1 did not prove it knows the cluster secret")


def test_replayed_transcript_refused_on_both_sides():
    good = dict(cluster_secrets=(SECRET,))
    dialer = Dialer.peer(auth(2, **good), 1, random_bytes=counter_random())
    acceptor = Acceptor(auth(1, **good), MEMBERS, random_bytes=counter_random())
    recorded = run(dialer, acceptor)
    assert_ok(dialer, acceptor, 2, Method.SECRET)
    from_dialer = [data for towards, data in recorded if towards == "acceptor"]
    from_acceptor = [data for towards, data in recorded if towards == "dialer"]

    # The dialer's half replayed to the same acceptor, which now draws another nonce.
    replay_target = Acceptor(auth(1, **good), MEMBERS)
    for data in from_dialer:
        replay_target.receive_data(data)
        if replay_target.outcome:
            break
    assert replay_target.outcome == Refused("wrong cluster secret")

    # The acceptor's half replayed to a dialer with a fresh nonce.
    victim = Dialer.peer(auth(2, **good), 1)
    victim.start()
    for data in from_acceptor:
        victim.receive_data(data)
        if victim.outcome:
            break
    assert victim.outcome == Refused("replica 1 did not prove it knows the cluster secret")


@pytest.mark.parametrize("same_nonce", [False, True])
def test_reflected_proof_refused(same_nonce):
    # A fake replica 1 without the secret challenges the dialer, then hands the
    # dialer's own proof back as its welcome proof (even with the dialer's nonce as
    # its challenge, so that both nonces are equal).
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    (_, _, _, dialer_nonce), = frames(dialer.start())
    nonce = dialer_nonce if same_nonce else b"\x11" * 32
    proof = frames(dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, nonce])))
    assert proof[0][0] == "proof"
    dialer.receive_data(wire.encode_frame(["welcome", CLUSTER, 1, proof[0][1]]))
    assert dialer.outcome == Refused("replica 1 did not prove it knows the cluster secret")


def test_reflected_proof_refused_by_the_acceptor():
    # The acceptor's welcome proof sent back to it as a dialer's proof.
    a1 = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS, random_bytes=lambda n: b"\x22" * n)
    hello = wire.encode_frame(["peer", CLUSTER, 2, b"\x33" * 32])
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1, random_bytes=lambda n: b"\x33" * n)
    assert dialer.start() == hello
    welcome = a1.receive_data(dialer.receive_data(a1.receive_data(hello)))
    acceptor_proof = frames(welcome)[0][3]
    a2 = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS, random_bytes=lambda n: b"\x22" * n)
    a2.receive_data(hello)
    a2.receive_data(wire.encode_frame(["proof", acceptor_proof]))
    assert a2.outcome == Refused("wrong cluster secret")


def test_wrong_cluster_id():
    dialer = Dialer.peer(auth(2, cluster_id="c-other"), 1)
    acceptor = Acceptor(auth(1), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "wrong cluster id 'c-other'")
    assert dialer.outcome.remote and "wrong cluster id" in dialer.outcome.reason


def test_proof_bound_to_the_cluster_id():
    # Same secret, two clusters: the dialer of the other cluster learns the acceptor's
    # cluster id from the refusal, but a proof for its own cluster is worthless here.
    secret = dict(cluster_secrets=(SECRET,))
    acceptor = Acceptor(auth(1, **secret), MEMBERS)
    hello = wire.encode_frame(["peer", CLUSTER, 2, b"\x44" * 32])
    other = Dialer.peer(auth(2, cluster_id="c-other", **secret), 1,
                        random_bytes=lambda n: b"\x44" * n)
    other.start()
    (_, _, _, nonce), = frames(acceptor.receive_data(hello))
    proof = other.receive_data(wire.encode_frame(["challenge", "c-other", 1, nonce]))
    acceptor.receive_data(proof)
    assert acceptor.outcome == Refused("wrong cluster secret")


@pytest.mark.parametrize("claimed, reason", [
    (1, "replica 1 is this replica"),
    (4, "replica 4 is not a member of cluster 'c-test'"),
])
def test_claimed_id_checked(claimed, reason):
    acceptor = Acceptor(auth(1), MEMBERS)
    acceptor.receive_data(wire.encode_frame(["peer", CLUSTER, claimed]))
    assert acceptor.outcome == Refused(reason)


def test_hello_id_must_match_certificate():
    dialer = Dialer.peer(auth(2, tls=True), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=3)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "the hello names replica 2 but the certificate names replica 3")


def test_peer_without_certificate_under_tls():
    dialer = Dialer.peer(auth(2, tls=True), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=None)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "certificate names nobody")


def test_dialed_replica_presents_another_id():
    # Replica 2 dials replica 3's address but the certificate there is replica 1's.
    dialer = Dialer.peer(auth(2, tls=True), 3, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=2)
    sent = run(dialer, acceptor)
    assert_refused(dialer, acceptor, "dialed replica 3 but its certificate names replica 1",
                   by="dialer")
    assert acceptor.outcome.remote   # the refusal reached the acceptor
    assert len(sent) == 1


def test_dialed_address_answers_as_another_replica():
    # No TLS: the welcome itself names replica 1, not the replica 3 that was dialed.
    dialer, acceptor = Dialer.peer(auth(2), 3), Acceptor(auth(1), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "answers as cluster 'c-test' replica 1", by="dialer")
    # With a secret the challenge already says so, and the acceptor hears why.
    secret = dict(cluster_secrets=(SECRET,))
    dialer, acceptor = Dialer.peer(auth(2, **secret), 3), Acceptor(auth(1, **secret), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "answers as cluster 'c-test' replica 1", by="dialer")
    assert acceptor.outcome.remote


def test_client_certificate_cannot_be_a_peer():
    dialer = Dialer.peer(auth(2, tls=True), 1, peer_certificate=1)
    acceptor = Acceptor(auth(1, tls=True), MEMBERS, peer_certificate=CLIENT)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "a client certificate cannot act as a peer")
    assert dialer.outcome == Refused("a client certificate cannot act as a peer", remote=True)


def test_client_token_cannot_prove_the_cluster_secret():
    # A client that holds a valid token tries to pass as replica 2 with it.
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,), client_tokens=(TOKEN,)), MEMBERS)
    impostor = Dialer.peer(auth(2, cluster_secrets=(TOKEN,)), 1)
    run(impostor, acceptor)
    assert acceptor.outcome == Refused("wrong cluster secret")
    # ... nor does the cluster secret pass as a client token.
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,), client_tokens=(TOKEN,)), MEMBERS)
    client = Dialer.client(token=SECRET)
    run(client, acceptor)
    assert acceptor.outcome == Refused("client token not accepted")


def test_token_not_in_file():
    dialer = Dialer.client(token=OTHER_TOKEN)
    acceptor = Acceptor(auth(1, client_tokens=(TOKEN,)), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "client token not accepted")
    assert dialer.outcome == Refused("client token not accepted", remote=True)


@pytest.mark.parametrize("settings_, reason", [
    (dict(), "this replica accepts no clients"),
    (dict(client_tokens=(TOKEN,)), "this cluster requires a client token (--token-file)"),
    (dict(tls=True), "this cluster requires a client certificate"),
    (dict(tls=True, client_tokens=(TOKEN,)),
     "requires a client certificate or a client token (--token-file)"),
])
def test_anonymous_refused(settings_, reason):
    dialer = Dialer.client(tls=settings_.get("tls", False),
                           peer_certificate=1 if settings_.get("tls") else None)
    acceptor = Acceptor(auth(1, **settings_), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, reason)
    assert dialer.outcome == Refused(acceptor.outcome.reason, remote=True)


def test_client_without_token_is_told_to_get_one():
    # The acceptor challenges a token-less client only if the client offered a token;
    # a client that did not gets the refusal above.  A challenge to a token-less
    # client (an acceptor that challenges everyone) is refused by the client.
    dialer = Dialer.client()
    dialer.start()
    out = dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x01" * 32]))
    assert dialer.outcome == Refused("the cluster requires a client token (--token-file)")
    assert frames(out) == [("refused", dialer.outcome.reason)]


def test_token_offered_to_a_replica_without_tokens():
    dialer = Dialer.client(token=TOKEN)
    acceptor = Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "this replica accepts no client tokens")


def test_token_client_refuses_a_welcome_without_challenge():
    # A fake replica that welcomes at once cannot prove it knows the token.
    dialer = Dialer.client(token=TOKEN)
    dialer.start()
    dialer.receive_data(wire.encode_frame(["welcome", CLUSTER, 1]))
    assert isinstance(dialer.outcome, Refused) and "cannot prove" in dialer.outcome.reason


def test_secret_mismatch_of_configuration():
    # A dialer with a secret, an acceptor without, and the other way round.
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    acceptor = Acceptor(auth(1), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "this replica has no cluster secret")
    dialer = Dialer.peer(auth(2), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    run(dialer, acceptor)
    assert_refused(dialer, acceptor, "this cluster requires the cluster secret")
    # A fake acceptor that skips the challenge does not fool a dialer with a secret.
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    dialer.start()
    dialer.receive_data(wire.encode_frame(["welcome", CLUSTER, 1]))
    assert dialer.outcome == Refused("replica 1 did not ask for the cluster secret (it has none)")
    # ... and a challenge to a dialer without one is refused with the fix.
    dialer = Dialer.peer(auth(2), 1)
    dialer.start()
    dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x01" * 32]))
    assert dialer.outcome == Refused("replica 1 requires the cluster secret (--cluster-secret-file)")


def test_client_refuses_a_client_certificate_as_replica():
    dialer = Dialer.client(tls=True, peer_certificate=CLIENT)
    out = dialer.start()
    assert dialer.outcome == Refused("the replica's certificate names a client, not a replica")
    assert frames(out) == [("refused", dialer.outcome.reason)]


def test_refusal_reason_is_sanitized_and_bounded():
    dialer = Dialer.client()
    dialer.start()
    dialer.receive_data(wire.encode_frame(["refused", "bad\x1b[31m\n" + "x" * 400]))
    assert dialer.outcome.remote
    assert dialer.outcome.reason.startswith("bad?[31m?")
    assert len(dialer.outcome.reason) <= handshake.REASON_BYTES_MAX
    # What we send is cut to the bound too, on a character boundary.
    out = handshake._refused_frame("\u00e9" * 200)
    assert frames(out)[0][1] == "\u00e9" * (handshake.REASON_BYTES_MAX // 2)


def test_unexpected_frames_refused():
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    acceptor.receive_data(wire.encode_frame(["welcome", CLUSTER, 2]))
    assert acceptor.outcome == Refused("unexpected welcome frame (await hello)")
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    acceptor.receive_data(wire.encode_frame(["peer", CLUSTER, 2, b"\x01" * 32]))
    acceptor.receive_data(wire.encode_frame(["peer", CLUSTER, 2, b"\x01" * 32]))
    assert acceptor.outcome == Refused("unexpected peer frame (await proof)")
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    dialer.start()
    dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x01" * 32]))
    dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x01" * 32]))
    assert dialer.outcome == Refused("a second challenge")


# ---------------------------------------------------------------- garbage in every state

def _acceptor_secret():
    return Acceptor(auth(1, cluster_secrets=(SECRET,), client_tokens=(TOKEN,)), MEMBERS)


def _acceptor_awaiting_proof():
    acceptor = _acceptor_secret()
    acceptor.receive_data(wire.encode_frame(["peer", CLUSTER, 2, b"\x01" * 32]))
    assert acceptor.state is State.AWAIT_PROOF
    return acceptor


def _acceptor_awaiting_token_proof():
    acceptor = _acceptor_secret()
    acceptor.receive_data(wire.encode_frame(["client", b"\x01" * 32]))
    assert acceptor.state is State.AWAIT_PROOF
    return acceptor


def _dialer_awaiting_challenge():
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    dialer.start()
    assert dialer.state is State.AWAIT_CHALLENGE
    return dialer


def _dialer_awaiting_welcome():
    dialer = _dialer_awaiting_challenge()
    dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x02" * 32]))
    assert dialer.state is State.AWAIT_WELCOME
    return dialer


def _token_client_awaiting_welcome():
    dialer = Dialer.client(token=TOKEN)
    dialer.start()
    dialer.receive_data(wire.encode_frame(["challenge", CLUSTER, 1, b"\x02" * 32]))
    assert dialer.state is State.AWAIT_WELCOME
    return dialer


KEYED_STATES = [_acceptor_secret, _acceptor_awaiting_proof, _acceptor_awaiting_token_proof,
                _dialer_awaiting_challenge, _dialer_awaiting_welcome,
                _token_client_awaiting_welcome]

_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.binary(max_size=40)
    | st.text(max_size=20) | st.sampled_from(["peer", "client", "challenge", "proof",
                                              "welcome", "refused", CLUSTER])
    | st.sampled_from([b"\x01" * 32, b"\x02" * 32, 1, 2, 3]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=12)


def _as_frames(values):
    return b"".join(struct.pack(">I", len(body)) + body
                    for body in (cbor2.dumps(v) for v in values))


def _check_garbage(make, chunks):
    machine = make()
    sent = b""
    for chunk in chunks:
        if machine.outcome is not None:
            break
        sent += machine.receive_data(chunk)
    # Without the key nothing authenticates, and what went out is well-formed
    # handshake frames only (a challenge at most, or the refusal).
    assert machine.state is not State.AUTHENTICATED
    assert machine.state in (State.REFUSED, State.AWAIT_HELLO, State.AWAIT_PROOF,
                             State.AWAIT_CHALLENGE, State.AWAIT_WELCOME)
    for frame in frames(sent):
        assert frame[0] in ("challenge", "refused", "proof")
    if machine.outcome is None:
        assert len(machine._buffer) < 4 + HANDSHAKE_FRAME_BYTES_MAX + sum(map(len, chunks))


_GARBAGE_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("make", KEYED_STATES)
@_GARBAGE_SETTINGS
@given(chunks=st.lists(st.binary(max_size=700), min_size=1, max_size=4))
def test_random_bytes_in_every_state(make, chunks):
    _check_garbage(make, chunks)


@pytest.mark.parametrize("make", KEYED_STATES)
@_GARBAGE_SETTINGS
@given(values=st.lists(_cbor_values, min_size=1, max_size=4))
def test_random_frames_in_every_state(make, values):
    _check_garbage(make, [_as_frames(values)])


@pytest.mark.parametrize("make", KEYED_STATES)
@_GARBAGE_SETTINGS
@given(data=st.data())
def test_mutated_valid_frames_in_every_state(make, data):
    # Real frames of a real handshake with one byte changed, or cut short.
    dialer = Dialer.peer(auth(2, cluster_secrets=(SECRET,)), 1)
    acceptor = Acceptor(auth(1, cluster_secrets=(SECRET,)), MEMBERS)
    real = [payload for _, payload in run(dialer, acceptor)]
    payload = bytearray(data.draw(st.sampled_from(real)))
    if data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(payload) - 1))
        payload[index] ^= data.draw(st.integers(1, 255))
    else:
        del payload[data.draw(st.integers(0, len(payload) - 1)):]
    _check_garbage(make, [bytes(payload), b""])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_cbor_values, min_size=1, max_size=3))
def test_random_frames_never_raise_in_open_modes(values):
    # Where a hello alone may authenticate (insecure, anonymous) garbage may too only
    # if it is a valid hello; it never raises and never authenticates anything else.
    acceptor = Acceptor(auth(1, allow_anonymous_clients=True), MEMBERS)
    acceptor.receive_data(_as_frames(values))
    if isinstance(acceptor.outcome, Authenticated):
        assert parse_frame(values[0])[0] in ("peer", "client")
    dialer = Dialer.client()
    dialer.start()
    dialer.receive_data(_as_frames(values))
    if isinstance(dialer.outcome, Authenticated):
        assert parse_frame(values[0])[0] == "welcome"
