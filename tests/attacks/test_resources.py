"""Attacks on a replica's memory and descriptors, from outside the cluster.

A huge first frame, hundreds of connections each holding half a frame, a read that
asks for one big value many times over, and connections opened until the replica
refuses more (on clusters of its own, under a small descriptor limit): the
replica's resident memory (its peak, /proc/PID/status VmHWM, reset
before each attack) stays small, it keeps serving the clients it has and new ones
once the attack ends, and its WAL keeps taking writes.
"""
from __future__ import annotations

import os
import socket
import ssl
import struct

import pytest

from cypaxos import commands, wire

from attacks.tooling import (MODES, READY_TIMEOUT_S, Client, ModeCluster, PeakGrowth,
                             RawConnection, assert_intact, attacker_tls_context, frame, mib,
                             tls_client_hello)

pytestmark = pytest.mark.timeout(300)

UNAUTHENTICATED_GROWTH_KIB = 64 << 10
"""What a few hundred unauthenticated connections may add to a replica's peak RSS:
their sockets and tasks, not what they send."""


def _leader(target) -> int:
    return target.cluster.wait_ready(timeout=60)


def _pour(conn: RawConnection, total: int = 64 << 20) -> int:
    """Send zeros until the replica cuts the connection (or `total` bytes); the bytes
    that went out.  A replica that stops reading without closing times this out."""
    chunk = bytes(1 << 16)
    conn.sock.settimeout(20)
    sent = 0
    while sent < total:
        try:
            sent += conn.sock.send(chunk)
        except socket.timeout:
            raise AssertionError(f"the replica stopped reading after {sent} bytes "
                                 f"but kept the connection") from None
        except (OSError, ssl.SSLError):
            break
    return sent


def _client_context(target):
    certs = target.cluster.certs
    return attacker_tls_context(certs / "client.pem", certs / "client.key")


def test_a_huge_first_frame_is_closed_at_once(target):
    """A length of 2**31 before any hello: refused from the length alone (no body is
    waited for or buffered), the connection closed while the sender is still
    pouring, memory not grown."""
    cluster = target.cluster
    leader = _leader(target)
    address = cluster.address(leader)
    # A few bytes of body too: a TLS record header is five bytes long.
    header = struct.pack(">I", 2**31) + bytes(8)
    contexts = [None] if target.mode != "tls" else [None, _client_context(target)]
    with PeakGrowth(target.cluster.pid(leader)) as measure:
        for context in contexts:
            with RawConnection(address, tls_context=context) as conn:
                conn.send(header)
                if target.mode == "tls" and context is None:
                    assert b"welcome" not in conn.wait_closed()
                else:
                    frames = conn.frames_until_closed()
                    assert conn.closed and len(frames) == 1 and frames[0][0] == "refused", frames
                    assert "2147483648" in frames[0][1], frames
            with RawConnection(address, tls_context=context) as conn:
                conn.send(header)
                sent = _pour(conn)
            # Cut off within what the sockets' buffers hold, not 2 GiB later.
            assert sent < wire.FRAME_BYTES_MAX, f"the replica took {mib(sent >> 10)}"
    assert measure.kib < 32 << 10, f"peak RSS grew by {mib(measure.kib)}"
    assert_intact(cluster, target.canaries)


HALF_OPEN = 300


def _half_frames(target, address: str) -> tuple[list[RawConnection], int]:
    """HALF_OPEN connections to `address`, each holding half a frame in the mode's
    unauthenticated way; (them, bytes sent in all)."""
    conns = []
    sent = 0
    if target.mode == "tls":
        data = tls_client_hello()
        data = data[:len(data) // 2]
    else:
        data = frame(["peer", target.cluster_id, 2, os.urandom(32)])[:30]
    try:
        for _ in range(HALF_OPEN):
            conn = RawConnection(address)
            conns.append(conn)
            assert conn.send(data), "refused at once"
            sent += len(data)
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return conns, sent


def test_half_sent_frames_on_hundreds_of_connections(target):
    """Hundreds of connections each stalled in the middle of its first frame: the
    replica serves an honest client meanwhile, its memory stays small, and it closes
    each of them (the hello timeout), not waiting forever."""
    cluster = target.cluster
    leader = _leader(target)
    with PeakGrowth(target.cluster.pid(leader)) as measure:
        conns, sent = _half_frames(target, cluster.address(leader))
        try:
            with Client(cluster) as client:
                client.put(b"during-half-frames", b"served")
                assert client.get(b"during-half-frames") == b"served"
            for conn in conns:
                conn.wait_closed(timeout=60)
        finally:
            for conn in conns:
                conn.close()
    assert measure.kib < UNAUTHENTICATED_GROWTH_KIB, (
        f"peak RSS grew by {mib(measure.kib)} for {HALF_OPEN} connections "
        f"that sent {sent} bytes")
    assert_intact(cluster, target.canaries)


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_half_sent_requests_from_anonymous_clients(target):
    """In the local default anyone is a client: hundreds of anonymous clients each
    stalled in the middle of a request that claims 8 MiB.  The replica buffers what
    arrived, no more (not what the lengths claim), and keeps serving."""
    cluster = target.cluster
    leader = _leader(target)
    body = bytes(64 << 10)
    data = frame(["client"]) + struct.pack(">I", 8 << 20) + body
    conns = []
    with PeakGrowth(target.cluster.pid(leader)) as measure:
        try:
            for _ in range(HALF_OPEN):
                conn = RawConnection(cluster.address(leader))
                conns.append(conn)
                assert conn.send(data)
            with Client(cluster) as client:
                client.put(b"during-half-requests", b"served")
                assert client.get(b"during-half-requests") == b"served"
        finally:
            for conn in conns:
                conn.close()
    claimed_kib = HALF_OPEN * (8 << 10)
    sent_kib = HALF_OPEN * len(data) >> 10
    assert measure.kib < 64 * 1024 + 2 * sent_kib, (
        f"peak RSS grew by {mib(measure.kib)}: {mib(sent_kib)} sent, "
        f"{mib(claimed_kib)} claimed")
    assert_intact(cluster, target.canaries)


# A value the size of a batch (the core's batch_bytes_max is 1 MiB), asked for this
# many times in one read: about a gibibyte of reply from a request of a few KiB.
AMPLIFIED_VALUE_BYTES = 900 << 10
AMPLIFIED_COPIES = 1200
REPLY_GROWTH_KIB = 256 << 10


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_read_reply_amplification(target):
    """An anonymous client stores one big value, then sends one small read asking for
    it AMPLIFIED_COPIES times and does not read the answer: the replica must split or
    refuse the reply, not build a gibibyte for it."""
    cluster = target.cluster
    leader = _leader(target)
    key = b"amplified"
    with Client(cluster) as client:
        client.put(key, os.urandom(AMPLIFIED_VALUE_BYTES))
    request = wire.read_request(1, [commands.encode_get(key)] * AMPLIFIED_COPIES, True)
    assert len(frame(request)) < 32 << 10
    with PeakGrowth(target.cluster.pid(leader)) as measure:
        with RawConnection(cluster.address(leader)) as conn:
            conn.send(frame(["client"]) + frame(request))
            assert conn.next_frame()[0] == "welcome"
            # Its first reply bytes (or a close) mean the reply was made.
            assert conn.readable(timeout=120), "no answer to the read"
    assert measure.kib < REPLY_GROWTH_KIB, (
        f"peak RSS grew by {mib(measure.kib)} for a "
        f"{mib(AMPLIFIED_VALUE_BYTES * AMPLIFIED_COPIES >> 10)} reply")
    assert_intact(cluster, target.canaries)


DESCRIPTOR_LIMIT = 256
"""The replicas' ``ulimit -n`` in the exhaustion test: the cap must leave room in it."""
CONNECTIONS_TRIED_MAX = 3 * DESCRIPTOR_LIMIT


def _refused_count(client: Client) -> int:
    return client.status()["statistics"].get("connections_refused", 0)


@pytest.mark.parametrize("mode", MODES)
def test_descriptor_exhaustion(mode, tmp_path):
    """Replicas under ``ulimit -n 256``; unauthenticated connections opened to the
    leader until it refuses more (its connection cap, which must fit the limit): a
    client connected before keeps being served, the leader keeps writing its WAL and
    a snapshot file (descriptors were kept for them), and new clients are served once
    the connections close."""
    cluster = ModeCluster(mode, tmp_path, nofile=DESCRIPTOR_LIMIT)
    conns = []
    with cluster:
        leader = cluster.wait_ready(timeout=READY_TIMEOUT_S)
        canaries = {b"before-exhaustion": os.urandom(100)}
        with Client(cluster) as client:
            client.put(b"before-exhaustion", canaries[b"before-exhaustion"])
            leader = client.conn.replica_id
            refused_before = _refused_count(client)
            try:
                while _refused_count(client) == refused_before:
                    assert len(conns) < CONNECTIONS_TRIED_MAX, (
                        f"{len(conns)} connections and none refused")
                    for _ in range(25):
                        conns.append(RawConnection(cluster.address(leader)))
                # The cap is reached and held: the client already connected is served,
                # its writes are logged and replicated, and a snapshot is written.
                before = client.status()["wal_last_seq"]
                for n in range(20):
                    client.put(b"during-exhaustion-%d" % n, b"2")
                assert client.get(b"during-exhaustion-19") == b"2"
                after = client.status()
                assert after["wal_last_seq"] > before, after
                snapshot_index = client.call(wire.snapshot_request, leader=False)
                assert type(snapshot_index) is int and snapshot_index > 0, snapshot_index
                assert client.conn.replica_id == leader, "the client had to move"
            finally:
                for conn in conns:
                    conn.close()
        assert cluster.is_running(leader)
        assert_intact(cluster, canaries)
