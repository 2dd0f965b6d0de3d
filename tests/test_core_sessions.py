"""Sessions in the core: registered explicitly, evicted LRU, never silently recreated.

A session that was evicted from the table, or never registered, answers every command
SESSION_EXPIRED: were it recreated by the batch, an evicted session's retry would apply
its commands a second time (DESIGN section 8).
"""
from __future__ import annotations

import pytest

from cypaxos.commands import encode_put, pack_client_batch, unpack_results
from cypaxos.core import PROPOSED, REGISTER_SESSION_ID, BatchError, Config, Replica
from cypaxos.protocol import ACCEPT, RESULT_ERROR, RESULT_OK, RESULT_SESSION_EXPIRED, make_ballot
from cypaxos.statemachine import KVStore


class Single:
    """A one-replica cluster: proposals are chosen as soon as they are durable."""

    def __init__(self, max_sessions: int = 100, snapshot=None) -> None:
        self.core = Replica(1, [1], KVStore(), Config(max_sessions=max_sessions,
                                                      check_invariants=True))
        self.core.recover([], snapshot)
        for _ in range(40):
            self.core.tick()
        self.run()
        assert self.core.role == "leader"

    def run(self) -> dict:
        """Drive the core until it is idle; the results, by (session, first_seq)."""
        results = {}
        while (rd := self.core.ready()) is not None:
            for sid, first, packed in rd.results:
                results[sid, first] = unpack_results(packed)
            self.core.persisted(rd.persist_id)
        return results

    def submit(self, batch: bytes):
        """Propose one batch and return its results."""
        assert self.core.propose(batch) == PROPOSED
        results = self.run()
        sid, first = int.from_bytes(batch[:8], "little"), int.from_bytes(batch[8:16], "little")
        return results[sid, first]

    def register(self, nonce: int) -> int:
        (status, data), = self.submit(registration(nonce))
        assert status == RESULT_OK and len(data) == 8
        return int.from_bytes(data, "little")

    @property
    def applied(self) -> int:
        return self.core.state_machine.applied_commands


def registration(nonce: int) -> bytes:
    return pack_client_batch(REGISTER_SESSION_ID, nonce, 0, [b""])


def put(session: int, seq: int, key: bytes = b"k", acked: int = 0) -> bytes:
    return pack_client_batch(session, seq, acked, [encode_put(key, b"v%d" % seq)])


def test_registration_answers_a_new_id():
    c = Single()
    first, second = c.register(77), c.register(78)
    assert first != second and REGISTER_SESSION_ID not in (first, second)
    assert c.submit(put(first, 1)) == [(RESULT_OK, b"")]
    assert c.submit(put(second, 1)) == [(RESULT_OK, b"")]
    assert c.core.statistics()["sessions_registered"] == 2


def test_a_retried_registration_creates_an_unused_session():
    c = Single()
    a, b = c.register(5), c.register(5)     # the same nonce, sent twice
    assert a != b
    assert c.core.statistics()["sessions"] == 2


def test_a_batch_for_a_session_never_registered_is_expired_and_creates_nothing():
    c = Single()
    applied = c.applied
    assert c.submit(put(12345, 1)) == [(RESULT_SESSION_EXPIRED, b"")]
    assert c.core.statistics()["sessions"] == 0
    assert c.core.statistics()["sessions_expired"] == 1
    assert c.applied == applied


def test_an_evicted_session_is_never_applied_twice():
    """A flood of registrations evicts an honest client's session; its retry of a batch
    that was applied gets SESSION_EXPIRED instead of being applied again."""
    c = Single(max_sessions=3)
    honest = c.register(1)
    batch = put(honest, 1)
    assert c.submit(batch) == [(RESULT_OK, b"")]
    applied = c.applied
    for nonce in range(100, 103):           # the flood
        c.register(nonce)
    assert c.core.statistics()["sessions_evicted"] == 1
    # The client did not get its answer (say, the leader crashed) and retries.
    assert c.submit(batch) == [(RESULT_SESSION_EXPIRED, b"")]
    assert c.applied == applied, "the retried command was applied again"
    # So does a later command of that session: nothing recreates it.
    assert c.submit(put(honest, 2, acked=1)) == [(RESULT_SESSION_EXPIRED, b"")]
    assert c.applied == applied
    # The client registers again and carries on.
    again = c.register(2)
    assert c.submit(put(again, 1)) == [(RESULT_OK, b"")]


def test_eviction_takes_the_least_recently_used():
    c = Single(max_sessions=2)
    old, used = c.register(1), c.register(2)
    c.submit(put(old, 1))                    # `old` is now the most recently used
    c.register(3)
    assert c.submit(put(old, 2, acked=1)) == [(RESULT_OK, b"")]
    assert c.submit(put(used, 1)) == [(RESULT_SESSION_EXPIRED, b"")]


def test_session_ids_are_not_reused_after_a_snapshot():
    c = Single()
    ids = {c.register(n) for n in range(1, 4)}
    c.submit(put(min(ids), 1))
    snapshot = c.core.snapshot()
    c.run()
    restored = Single(snapshot=snapshot)
    fresh = restored.register(9)
    assert fresh not in ids
    # The sessions came along: a retry is answered from the cache, not applied again.
    applied = restored.applied
    assert restored.submit(put(min(ids), 1)) == [(RESULT_OK, b"")]
    assert restored.applied == applied


def test_malformed_registrations():
    c = Single()
    for bad in (pack_client_batch(REGISTER_SESSION_ID, 1, 0, [b"x"]),
                pack_client_batch(REGISTER_SESSION_ID, 1, 0, [b"", b""])):
        with pytest.raises(BatchError, match="registration"):
            c.core.propose(bad)
    # From a peer (a forged slot value), one is answered with an error, deterministically.
    follower = Replica(2, [1, 2, 3], KVStore(), Config(check_invariants=True))
    ballot = make_ballot(1, 1)
    follower.step((ACCEPT, 1, ballot, 1, [pack_client_batch(0, 7, 0, [b"x"])], 0))
    follower.persisted(follower.ready().persist_id)
    follower.step((ACCEPT, 1, ballot, 2, [b""], 1))
    (sid, first, packed), = follower.ready().results
    assert (sid, first) == (0, 7) and unpack_results(packed)[0][0] == RESULT_ERROR
    assert follower.statistics()["sessions"] == 0
