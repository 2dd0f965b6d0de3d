"""Forged peer traffic from a process that cannot authenticate as a member.

Every peer message type `cypaxos.wire` knows, forged so that a replica believing it
would change state (depose the leader, accept or commit a forged value, install a
forged snapshot), is sent after each way an outsider can start a connection in the
cluster's mode: a hello claiming a member id with no proof, a wrong proof, the
messages in place of the proof; under TLS, no TLS, no certificate, another CA's
replica certificate, the cluster's client certificate.  Every replica must refuse
before it decodes a message (the refusal is the handshake's), and afterwards the
cluster holds exactly what it held: no forged key, no ballot near the forged ones,
the values written before, equal digests.
"""
from __future__ import annotations

import os
import socket

import pytest

from cypaxos import wire
from cypaxos.protocol import BALLOT_ROUND_MAX, CHOSEN_BALLOT, make_ballot

from attacks.forgery import (FORGED_KEY, WAYS_IN, Aim, claimed_id, deliver, forged_ballot,
                             forged_messages, forged_snapshot)
from attacks.tooling import (RawConnection, assert_intact, attacker_tls_context, frame,
                             peer_proof)
from test_core_defense import BAD, OVERFLOWING

pytestmark = pytest.mark.timeout(300)


def aims(target, request) -> list[Aim]:
    """One aim per replica of the target cluster."""
    cluster = target.cluster
    foreign = request.getfixturevalue("foreign_certs") if target.mode == "tls" else None
    return [Aim(cluster, target.cluster_id, i, cluster.address(i), claimed_id(i), foreign)
            for i in cluster.ids]


def test_every_peer_message_type_is_refused_before_it_is_decoded(target, request):
    cluster = target.cluster
    limit = None
    for aim in aims(target, request):
        status = cluster.status(aim.target_id, timeout=10)
        messages = forged_messages(target.cluster_id, status, aim.claimed)
        # Every type the wire knows, each one a replica without the handshake would
        # take: it passes the message checks as coming from the claimed member.
        assert set(messages) == set(wire.MESSAGE_NAMES.values())
        for message in messages.values():
            wire.parse_peer_message(message, set(cluster.ids), aim.target_id, aim.claimed)
        ballot = forged_ballot(status, aim.claimed)
        limit = ballot if limit is None else min(limit, ballot)
    # A frame decoded after the handshake and refused would count as a bad frame.
    bad_frames = _bad_frames(cluster)
    for aim in aims(target, request):
        status = cluster.status(aim.target_id, timeout=10)
        messages = forged_messages(target.cluster_id, status, aim.claimed)
        for way_name, (way, expected) in WAYS_IN[target.mode].items():
            for name, message in messages.items():
                try:
                    deliver(way, aim, frame(message), expected)
                except AssertionError as exc:
                    raise AssertionError(f"replica {aim.target_id}, {way_name}, {name}: "
                                         f"{exc}") from None
            # All of them at once on one connection too.
            deliver(way, aim, b"".join(frame(m) for m in messages.values()), expected)
    assert _bad_frames(cluster) == bad_frames, "a forged message was decoded"
    assert_intact(cluster, target.canaries, forbidden=[FORGED_KEY], ballot_below=limit)


def _bad_frames(cluster) -> dict[int, int]:
    return {i: cluster.status(i, timeout=10)["statistics"]["bad_frames"] for i in cluster.ids}


def test_peer_messages_on_a_client_connection_are_refused(target):
    """A client (in the local default, anyone) sends peer messages on its client
    connection: they are not client requests, so the replica drops the connection,
    and none of them reaches the protocol."""
    cluster = target.cluster
    limit = None
    for i in cluster.ids:
        status = cluster.status(i, timeout=10)
        messages = forged_messages(target.cluster_id, status, claimed_id(i))
        ballot = forged_ballot(status, claimed_id(i))
        limit = ballot if limit is None else min(limit, ballot)
        for name, message in messages.items():
            with cluster.connect(cluster.address(i)) as conn:
                conn.send(message)
                try:
                    reply = conn.receive(timeout=15)
                except socket.timeout:
                    raise AssertionError(f"{name} on a client connection: kept open") from None
                except OSError:   # closed or reset: dropped
                    continue
                raise AssertionError(f"{name} on a client connection got {reply}")
    assert_intact(cluster, target.canaries, forbidden=[FORGED_KEY], ballot_below=limit)


def test_a_forged_snapshot_transfer_is_refused(target, request):
    """A whole transfer (chunks of a valid snapshot file of this cluster, far ahead,
    holding a forged key): nothing of it is written, installed or applied."""
    cluster = target.cluster
    far = max(s["commit_index"] for s in cluster.statuses(timeout=10).values()) + 1_000_000
    snapshot = forged_snapshot(target.cluster_id, far, make_ballot(1 << 40, 2))
    half = len(snapshot) // 2
    for aim in aims(target, request):
        chunks = [[wire.SNAPSHOT_CHUNK, aim.claimed, far, 0, len(snapshot), snapshot[:half]],
                  [wire.SNAPSHOT_CHUNK, aim.claimed, far, half, len(snapshot), snapshot[half:]]]
        body = b"".join(frame(c) for c in chunks)
        for way_name, (way, expected) in WAYS_IN[target.mode].items():
            deliver(way, aim, body, expected)
    assert_intact(cluster, target.canaries, forbidden=[FORGED_KEY])
    for i in cluster.ids:
        status = cluster.status(i, timeout=10)
        assert status["snapshot_index"] < far and status["commit_index"] < far, status
        names = os.listdir(os.path.join(cluster.replica_data_dir(i), "snapshots"))
        assert f"snapshot-{far:020d}.snap" not in names, names


@pytest.mark.parametrize("ballot", [CHOSEN_BALLOT, CHOSEN_BALLOT - 1, OVERFLOWING,
                                    make_ballot(BALLOT_ROUND_MAX, 2)],
                         ids=["2**63-1", "2**63-2", "round-2**47-1", "round-max"])
def test_ballots_at_the_int64_edge_from_an_outsider(target, request, ballot):
    cluster = target.cluster
    slot = cluster.status(1, timeout=10)["commit_index"] + 1

    def bodies(src: int) -> dict[str, bytes]:
        return {wire.MESSAGE_NAMES[kind]: frame([kind, src, ballot, *rest])
                for kind, rest in ((wire.PREPARE, [slot]), (wire.ACCEPT, [slot, [b""], slot]),
                                   (wire.HEARTBEAT, [slot, 1]), (wire.PREVOTE, []),
                                   (wire.NACK, []))}
    for aim in aims(target, request):
        for way_name, (way, expected) in WAYS_IN[target.mode].items():
            for name, body in bodies(aim.claimed).items():
                deliver(way, aim, body, expected)
    assert_intact(cluster, target.canaries, ballot_below=1 << 48)


def _submit_to_leader(target, batch: bytes) -> tuple:
    """Submit `batch` as an honest client, on the leader (following redirects)."""
    cluster = target.cluster
    address = cluster.address(cluster.wait_ready(timeout=60))
    for _ in range(10):
        with cluster.connect(address) as conn:
            reply = conn.call(wire.submit_request(7, batch))
        if reply[0] != "redirect" or not reply[2]:
            return reply
        address = reply[2]
    raise AssertionError(f"no leader took the batch: {reply}")


def test_malformed_batches(target, request):
    """Batches whose count disagrees with their bytes (and the other header lies of
    test_core_defense): from an outsider, as a forged ACCEPT, refused at the
    handshake; from a client, refused by the core (bad_request); from an anonymous
    client, refused at the handshake unless the cluster takes anonymous clients."""
    cluster = target.cluster
    status = cluster.status(1, timeout=10)
    slot = status["commit_index"] + 1
    ballot = forged_ballot(status, 3)
    for aim in aims(target, request):
        for way_name, (way, expected) in WAYS_IN[target.mode].items():
            for name, bad in BAD.items():
                deliver(way, aim, frame([wire.ACCEPT, aim.claimed, ballot, slot, [bad], slot + 1]),
                        expected)
    for name, bad in BAD.items():
        reply = _submit_to_leader(target, bad)
        assert reply[0] == "error" and reply[2] == "bad_request", (name, reply)
    # The same from an anonymous client.
    leader = cluster.address(cluster.wait_ready(timeout=60))
    requests = b"".join(frame(wire.submit_request(n, bad)) for n, bad in enumerate(BAD.values()))
    with RawConnection(leader) as conn:
        conn.send(frame(["client"]) + requests)
        if target.mode == "local":
            first = conn.next_frame()
            assert first[0] == "welcome", first
            replies = [wire.parse_reply(conn.next_frame()) for _ in BAD]
            assert all(r[0] == "error" and r[2] == "bad_request" for r in replies), replies
        elif target.mode == "secret":
            frames = conn.frames_until_closed()
            assert frames and frames[-1][0] == "refused", frames
            assert "client token" in frames[-1][1], frames
        else:
            assert b"welcome" not in conn.wait_closed()
    assert_intact(cluster, target.canaries, forbidden=[FORGED_KEY])


@pytest.mark.parametrize("target", ["tls"], indirect=True)
def test_a_client_certificate_cannot_act_as_a_peer(target):
    """The cluster's own client certificate passes TLS, and may be a client, but a
    peer hello with it is refused with the reason, by every replica."""
    cluster = target.cluster
    certs = cluster.certs
    context = attacker_tls_context(certs / "client.pem", certs / "client.key")
    for i in cluster.ids:
        with RawConnection(cluster.address(i), tls_context=context) as conn:
            conn.send_frames(["peer", target.cluster_id, claimed_id(i)],
                             [wire.PREPARE, claimed_id(i), make_ballot(1 << 40, claimed_id(i)), 1])
            frames = conn.frames_until_closed()
        assert frames == [["refused", "a client certificate cannot act as a peer"]], frames
        # ...while as a client the same certificate is welcome.
        with RawConnection(cluster.address(i), tls_context=context) as conn:
            conn.send_frames(["client"], wire.status_request(1))
            assert conn.next_frame()[0] == "welcome"
    assert_intact(cluster, target.canaries, ballot_below=1 << 48)


@pytest.mark.parametrize("target", ["secret", "local"], indirect=True)
def test_a_replayed_handshake_proof_is_refused(target):
    """A valid proof (computed here with the cluster secret, as a member would) gets
    a peer welcomed once; the same hello and proof replayed on a new connection,
    where the replica's nonce is new, is refused."""
    cluster = target.cluster
    secret = cluster.cluster_secret()
    address = cluster.address(1)
    dialer_nonce = os.urandom(32)
    hello = frame(["peer", target.cluster_id, 2, dialer_nonce])
    with RawConnection(address) as conn:
        conn.send(hello)
        challenge = conn.next_frame()
        assert challenge[:3] == ["challenge", target.cluster_id, 1], challenge
        proof = peer_proof(secret, target.cluster_id, 2, 1, dialer_nonce, challenge[3])
        conn.send_frames(["proof", proof])
        welcome = conn.next_frame()
        assert welcome[:3] == ["welcome", target.cluster_id, 1] and len(welcome) == 4, welcome
    recorded = hello + frame(["proof", proof])
    # Step by step, as the recording went...
    with RawConnection(address) as conn:
        conn.send(hello)
        again = conn.next_frame()
        assert again[0] == "challenge" and again[3] != challenge[3], again
        conn.send_frames(["proof", proof])
        frames = conn.frames_until_closed()
    assert frames == [["refused", "wrong cluster secret"]], frames
    # ...and the whole recorded transcript in one write.
    with RawConnection(address) as conn:
        conn.send(recorded)
        frames = conn.frames_until_closed()
    assert [f[0] for f in frames] == ["challenge", "refused"], frames
    assert frames[1][1] == "wrong cluster secret", frames
    assert_intact(cluster, target.canaries)

