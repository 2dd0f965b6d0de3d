"""Floods: of sessions (so that an honest client's is evicted), and of failed
handshakes (so that the log would drown).

A session flood must never make an ordinary retry apply twice: the retry is
answered from the session's cache, or, once the session is gone, SESSION_EXPIRED
(which says it may have been applied), and the key's version shows one apply.  Only
a client can register sessions, so outside the local default the flood is refused
at the handshake.  A few hundred failed handshakes from one source are each counted
(cypaxos_auth_failures_total) and logged once.
"""
from __future__ import annotations

import os
import time

import pytest

import cypaxos
from cypaxos import commands, wire

from attacks.tooling import (MAX_SESSIONS, Client, RawConnection, assert_intact, attacker_tls_context,
                             auth_failures, frame, source_address)

pytestmark = pytest.mark.timeout(300)


def _flood_sessions(target) -> None:
    """Register twice the session table's size, as an outsider can in this mode."""
    cluster = target.cluster
    if target.mode == "local":
        # Anyone is a client: register from an anonymous connection.
        with Client(cluster) as flooder:
            for _ in range(2 * MAX_SESSIONS):
                flooder.register()
        return
    leader = cluster.address(cluster.wait_ready(timeout=60))
    registration = commands.pack_client_batch(0, 12345, 0, [b""])
    for n in range(2 * MAX_SESSIONS):
        with RawConnection(leader) as conn:
            conn.send(frame(["client"]) + frame(wire.submit_request(n + 1, registration)))
            if target.mode == "tls":
                received = conn.wait_closed()
                assert b"welcome" not in received and b"ok" not in received
            else:
                frames = conn.frames_until_closed()
                assert conn.closed and [f[0] for f in frames] == ["refused"], frames


def test_a_session_flood_and_an_ordinary_retry_never_apply_twice(target):
    cluster = target.cluster
    key = b"flooded-" + os.urandom(4).hex().encode()
    with Client(cluster) as victim:
        victim.register()
        batch = victim.batch([commands.encode_put_rev(key, b"once")])
        first = victim.resubmit(batch)
        assert first[0][0] == commands.RESULT_OK, first
        _flood_sessions(target)
        # The reply was lost, say: the client sends the same batch again.
        retry = victim.resubmit(batch)
        status = retry[0][0]
        if target.mode == "local":
            # The flood evicted the session: the retry may have been applied, and
            # says so, rather than being applied again.
            assert status == commands.RESULT_SESSION_EXPIRED, retry
        else:
            assert retry == first, "the retry was not answered from the session's cache"
        meta = victim.get_rev(key).kv
        assert meta is not None and (meta.value, meta.version) == (b"once", 1), meta
        # The session's next batch: expired too once evicted, never recreated.
        after = victim.submit([commands.encode_put_rev(key, b"next")])
        expected = (commands.RESULT_SESSION_EXPIRED if target.mode == "local"
                    else commands.RESULT_OK)
        assert [r[0] for r in after] == [expected], after
        meta = victim.get_rev(key).kv
        assert meta.version == (1 if target.mode == "local" else 2), meta
    assert_intact(cluster, target.canaries)


FAILED_HANDSHAKES = 200


def _fail_once(target, address: str, source: str) -> None:
    """One handshake that the replica refuses: a peer hello without proof (under TLS,
    with the client certificate)."""
    context = None
    if target.mode == "tls":
        certs = target.cluster.certs
        context = attacker_tls_context(certs / "client.pem", certs / "client.key")
    with RawConnection(address, source=source, tls_context=context) as conn:
        conn.send_frames(["peer", target.cluster_id, 2])
        frames = conn.frames_until_closed()
    assert conn.closed and [f[0] for f in frames] == ["refused"], frames


def test_failed_handshakes_are_counted_and_logged_once_per_source(target):
    cluster = target.cluster
    source = source_address()
    address = cluster.address(1)
    counted = sum(auth_failures(cluster, 1).values())
    log_offset = len(cluster.log_text(1))
    started = time.monotonic()
    for _ in range(FAILED_HANDSHAKES):
        _fail_once(target, address, source)
    # The count is taken before the replica closes each connection.
    assert sum(auth_failures(cluster, 1).values()) - counted == FAILED_HANDSHAKES
    new_lines = [line for line in cluster.log_text(1)[log_offset:].splitlines() if line.strip()]
    mine = [line for line in new_lines if source in line]
    # Once per source per minute: one line unless this took more than a minute.
    allowed = 1 + int((time.monotonic() - started) // 60)
    assert 1 <= len(mine) <= allowed, mine
    assert "refused a peer connection from" in mine[0], mine[0]
    reason = ("a client certificate cannot act as a peer" if target.mode == "tls"
              else "requires the cluster secret")
    assert reason in mine[0], mine[0]
    assert len(new_lines) <= allowed + 5, new_lines[:20]
    assert_intact(cluster, target.canaries)


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_the_client_library_reports_an_evicted_session_as_maybe_applied(target):
    """The library's view of the same flood (the local default, where anyone may
    register): the call after the eviction fails with SessionExpiredError, which says
    it may have been applied; the next call goes in a new session and is applied once."""
    cluster = target.cluster
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"library-before-flood", b"1")
        _flood_sessions(target)
        with pytest.raises(cypaxos.SessionExpiredError) as info:
            kv.put(b"library-after-flood", b"2")
        assert info.value.maybe_applied is True
        kv.put(b"library-after-flood", b"3")
        assert kv.get(b"library-after-flood") == b"3"
        assert kv.get(b"library-before-flood") == b"1"
    assert_intact(cluster, target.canaries)
