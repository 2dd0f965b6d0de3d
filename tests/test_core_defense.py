"""The core checks what peers send, even authenticated ones (DESIGN section 8).

Each test forges a well-formed message that no honest peer could send (or that an
older core mishandled) and checks that the core refuses it with MessageError, or
ignores it, without recording or adopting anything of it, and keeps working.  The
clusters are the transcript driver's (tests/transcript.py): real cores, every output
routed, invariants checked after every input.
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from cypaxos.core import ROUND_JUMP_MAX, Config, MessageError, Replica
from cypaxos.errors import WalCorruptError
from cypaxos.protocol import (
    ACCEPT, ACCEPTED, BALLOT_ROUND_MAX, CATCHUP_REQ, CHOSEN, CHOSEN_BALLOT, HEARTBEAT,
    HEARTBEAT_ACK, NACK, PREPARE, PREVOTE, PROMISE, REC_ACCEPT, REC_COMMIT, REC_PROMISE,
    make_ballot,
)
from cypaxos.statemachine import KVStore

sys.path.insert(0, str(Path(__file__).parent))

from transcript import Transcript, encode_batch, encode_command  # noqa: E402

PUT = encode_command("put", ["k", "v"])
GOOD = encode_batch(101, 1, 0, [PUT])
OVERFLOWING = ((1 << 47) - 1) << 16 | 2   # round 2**47 - 1: its next round overflows


def elected(*options: str) -> Transcript:
    """A three-replica cluster (transcript driver) where replica 1 leads."""
    t = Transcript()
    t.run(" ".join(("cluster 3",) + options))
    t.run("campaign 1")
    t.run("stabilize")
    assert t.nodes[1].core.role == "leader"
    return t


def state(core: Replica) -> tuple:
    """Everything a message could change (statistics' counters aside)."""
    log = [core.entry(s) for s in range(core.log_start, core.last_slot + 1)]
    stats = core.statistics()
    return (core.role, core.ballot, core.leader_id, core.commit_index, core.applied_index,
            stats["known_commit"], stats["catchup_peer"], log,
            core.state_machine.state_digest())


def refused(core: Replica, msg: tuple) -> str:
    """Step `msg`: it must raise MessageError and leave no trace; returns the error."""
    assert core.ready() is None, "settle the replica before forging"
    before = state(core)
    with pytest.raises(MessageError) as info:
        core.step(msg)
    assert core.ready() is None, "a refused message produced output"
    assert state(core) == before
    return str(info.value)


def committed(t: Transcript, key: str) -> None:
    """A put through whoever leads now is applied on every live replica."""
    leader = next(n for n in t.live() if n.core.role == "leader")
    t.run(f"propose {leader.rid} put {key} v")
    t.run("stabilize")
    t.run(f"tick-heartbeat {leader.rid}")
    t.run("stabilize")
    digests = {n.core.state_machine.state_digest() for n in t.live()}
    applied = {n.core.applied_index for n in t.live()}
    assert len(digests) == 1 and len(applied) == 1, t.run("status")
    assert leader.core.state_machine.query(b"G" + key.encode()) == b"\x01v"


def elect_other(t: Transcript) -> None:
    """Replica 1 crashes; another one must be elected."""
    t.run("crash 1")
    for _ in range(200):
        t.run("tick 2,3")
        t.run("stabilize")
        if any(n.core.role == "leader" for n in t.live()):
            return
    pytest.fail("no leader after replica 1 crashed:\n" + t.run("status"))


def bad_batches():
    """Client batches whose header disagrees with their bytes, and what is wrong."""
    def header(count=1, payload=None, first=1, body=None):
        body = struct.pack("<I", len(PUT)) + PUT if body is None else body
        plen = len(body) if payload is None else payload
        return struct.pack("<QQQII", 101, first, 0, count, plen) + body
    return {
        "count-past-the-commands": header(count=5),
        "huge-count": header(count=2**32 - 1),
        "trailing-bytes": header(body=struct.pack("<I", len(PUT)) + PUT + b"xyz"),
        "payload-past-the-value": header(payload=10_000),
        "command-past-the-payload": header(body=struct.pack("<I", 10_000) + PUT),
        "short-header": GOOD[:20],
        "no-commands": header(count=0, body=b""),
        "sequence-0": header(first=0),
        "sequence-past-2**62": header(first=2**62),
        "garbage-after-a-good-batch": GOOD + b"\x01",
    }


BAD = bad_batches()


# ---------------------------------------------------------------- ballots

@pytest.mark.parametrize("ballot", [
    OVERFLOWING,
    make_ballot(BALLOT_ROUND_MAX, 2) + (1 << 16),   # one round past the space
    CHOSEN_BALLOT,
    -1,
], ids=["round-2**47-1", "round-max+1", "chosen-ballot", "negative"])
@pytest.mark.parametrize("kind", ["PREPARE", "ACCEPT", "HEARTBEAT", "NACK", "PREVOTE"])
def test_ballot_outside_the_space_is_refused(kind, ballot):
    t = elected()
    msg = {"PREPARE": (PREPARE, 2, ballot, 1), "ACCEPT": (ACCEPT, 2, ballot, 2, [b""], 1),
           "HEARTBEAT": (HEARTBEAT, 2, ballot, 1, 1), "NACK": (NACK, 2, ballot),
           "PREVOTE": (PREVOTE, 2, ballot)}[kind]
    assert "ballot space" in refused(t.nodes[3].core, msg)
    # Nothing was adopted: replica 3's next campaign uses the next ordinary round.
    t.run("campaign 3")
    assert t.nodes[3].core.ballot == make_ballot(2, 3)


def test_ballot_jumping_too_far_ahead_is_refused():
    t = elected()
    core = t.nodes[3].core
    too_far = make_ballot(1 + ROUND_JUMP_MAX + 1, 2)
    assert "rounds ahead" in refused(core, (PREPARE, 2, too_far, 1))
    # Just within the bound is an ordinary (if unusual) higher ballot.
    core.step((PREPARE, 2, make_ballot(1 + ROUND_JUMP_MAX, 2), 1))
    assert core.ballot == make_ballot(1 + ROUND_JUMP_MAX, 2)


def test_forged_prepare_at_the_edge_cannot_make_the_cluster_leaderless():
    """Once, a PREPARE with round 2**47 - 1 was promised (and persisted), then every
    next round overflowed: no leader ever again, not even after restarts."""
    t = elected()
    refused(t.nodes[3].core, (PREPARE, 2, OVERFLOWING, 1))
    refused(t.nodes[2].core, (PREPARE, 3, OVERFLOWING, 1))
    committed(t, "a")
    t.run("crash 3")
    t.run("restart 3")
    elect_other(t)
    committed(t, "b")


def test_campaign_never_overflows():
    """A replica whose WAL holds a promise at the last round stops campaigning."""
    for pre_vote in (False, True):
        core = Replica(1, [1, 2, 3], KVStore(), Config(pre_vote=pre_vote, check_invariants=True))
        core.recover([(REC_PROMISE, make_ballot(BALLOT_ROUND_MAX, 2))])
        for _ in range(200):
            core.tick()
        assert core.role == "follower" and core.ballot == make_ballot(BALLOT_ROUND_MAX, 2)
        assert core.statistics()["ballots_exhausted"] >= 1
        assert core.ready() is None


@pytest.mark.parametrize("records, snapshot", [
    ([(REC_PROMISE, OVERFLOWING)], None),
    ([(REC_PROMISE, -5)], None),
    ([(REC_ACCEPT, 1, OVERFLOWING, [b""])], None),
    ([], (0, OVERFLOWING, [], KVStore().snapshot())),
], ids=["promise", "negative", "accept", "snapshot"])
def test_recovery_refuses_a_ballot_outside_the_space(records, snapshot):
    """What an older core may have persisted after a forged PREPARE: refuse to start."""
    core = Replica(1, [1, 2, 3], KVStore())
    with pytest.raises(WalCorruptError, match="outside the ballot space.*replace it"):
        core.recover(records, snapshot)


# ---------------------------------------------------------------- batches

@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_accept_with_a_malformed_batch_is_refused(bad):
    """Once, such a value was accepted, chosen and applied: the store read past it."""
    t = elected()
    leader = t.nodes[1].core
    slot = leader.commit_index + 1
    # As the leader would send it, with the commit index that makes it applied at once.
    msg = (ACCEPT, 1, leader.ballot, slot, [b"", GOOD + bad], slot + 1)
    assert "client batch" in refused(t.nodes[2].core, msg)
    committed(t, "after")


def test_accept_with_a_value_that_is_not_bytes_is_refused():
    t = elected()
    leader = t.nodes[1].core
    assert "not bytes" in refused(t.nodes[2].core, (ACCEPT, 1, leader.ballot, 2, [b"", "x"], 1))


def catching_up(t: Transcript) -> Replica:
    """Replica 3 misses slots 2..4 and has asked replica 1 for them (CATCHUP_REQ)."""
    t.run("partition 1 2 | 3")
    for k in range(3):
        t.run(f"propose 1 put k{k} v")
    t.run("stabilize")
    t.run("heal")
    t.run("propose 1 put late v")
    t.run("process 1")
    t.run("deliver to=3 type=ACCEPT")
    t.run("process 3")
    assert any(m[0] == CATCHUP_REQ and m[3] == 2 for s, d, m in t.net if (s, d) == (3, 1))
    return t.nodes[3].core


@pytest.mark.parametrize("bad", list(BAD.values())[:4], ids=list(BAD)[:4])
def test_chosen_with_a_malformed_batch_is_refused(bad):
    t = elected()
    core = catching_up(t)
    assert "client batch" in refused(core, (CHOSEN, 1, t.nodes[1].core.ballot, 2, [bad]))
    t.run("stabilize")
    committed(t, "after")


@pytest.mark.parametrize("bad", list(BAD.values())[:4], ids=list(BAD)[:4])
def test_promise_with_a_malformed_batch_is_refused(bad):
    t = elected()
    t.run("crash 1")
    t.run("campaign 2")
    t.run("process 2")
    t.run("persist 2")
    core = t.nodes[2].core
    assert "client batch" in refused(core, (PROMISE, 3, core.ballot, 1, [2, make_ballot(1, 1), bad]))


# ---------------------------------------------------------------- CHOSEN

def test_chosen_not_asked_for_is_ignored():
    t = elected()
    core = t.nodes[3].core
    ballot = t.nodes[1].core.ballot
    before = state(core)
    core.step((CHOSEN, 1, ballot, 2, [GOOD]))             # no request outstanding
    assert core.ready() is None and state(core) == before
    core = catching_up(t)                                  # asked 1, from slot 2
    t.run("drop type=CATCHUP_REQ")
    before = state(core)
    core.step((CHOSEN, 2, t.nodes[2].core.ballot, 2, [GOOD]))   # another peer
    core.step((CHOSEN, 1, ballot, 3, [GOOD]))                    # another slot
    assert core.ready() is None and state(core) == before
    assert core.statistics()["chosen_unasked"] == 3
    # The answer to the request is taken (the request is sent again after a timeout).
    for _ in range(20):
        t.run("tick 3")
        t.run("stabilize")
    assert core.commit_index == t.nodes[1].core.commit_index


def test_chosen_contradicting_a_chosen_value_is_refused():
    core = Replica(3, [1, 2, 3], KVStore(), Config(check_invariants=True))
    b1, b2 = make_ballot(1, 1), make_ballot(2, 2)
    v2, v3, forged = (encode_batch(101, seq, 0, [encode_command("put", ["k", str(seq)])])
                      for seq in (1, 2, 3))
    core.step((ACCEPT, 1, b1, 1, [b""], 0))
    core.step((HEARTBEAT, 1, b1, 3, 1))           # slots 2..3 chosen: ask replica 1
    rd = core.ready()
    assert [m for _, m in rd.messages if m[0] == CATCHUP_REQ] == [(CATCHUP_REQ, 3, b1, 2)]
    core.persisted(rd.persist_id)
    core.step((ACCEPT, 2, b2, 2, [v2, v3], 3))    # a new leader re-proposed them
    rd = core.ready()
    core.persisted(rd.persist_id)
    assert core.commit_index == 3
    assert "contradicts" in refused(core, (CHOSEN, 1, b1, 2, [forged, v3]))
    assert core.statistics()["chosen_conflicts"] == 1
    assert core.chosen_value(2) == v2


# ---------------------------------------------------------------- other handlers

def test_accepted_for_slots_never_proposed_is_refused():
    t = elected()
    leader = t.nodes[1].core
    ballot, last = leader.ballot, leader.last_slot
    assert "past the last" in refused(leader, (ACCEPTED, 2, ballot, 1, last + 1, 0))
    assert "past the last" in refused(leader, (ACCEPTED, 2, ballot, last, 2, 0))
    assert "past the last" in refused(leader, (ACCEPTED, 2, ballot, 1, 2**62, 0))
    refused(leader, (ACCEPTED, 2, ballot, 0, 1, 0))
    committed(t, "after")


def test_heartbeat_ack_for_a_heartbeat_never_sent_is_refused():
    """...and does not count as hearing from that peer (check-quorum)."""
    t = elected()
    leader = t.nodes[1].core
    t.run("partition 1 | 2 3")
    t.run("tick 1 20")       # the first quorum check: 2 and 3 were heard in the election
    t.run("stabilize")
    assert leader.role == "leader"
    refused(leader, (HEARTBEAT_ACK, 2, leader.ballot, 10**6, 0))
    t.run("tick 1 20")       # the next one: nobody was heard
    assert leader.role == "follower"
    t.run("heal")
    elect_other(t)
    committed(t, "after")


def test_accept_far_past_the_commit_index_is_ignored():
    """Even when the leader's commit index says it is near: only our own counts."""
    t = elected("accept_ahead=100")
    core = t.nodes[2].core
    ballot = t.nodes[1].core.ballot
    last = core.last_slot
    core.step((ACCEPT, 1, ballot, 500, [GOOD], 1000))
    rd = core.ready()
    assert core.last_slot == last
    assert not rd.records and not rd.messages_after_persist
    t.run("stabilize")
    committed(t, "after")


def test_promise_entries_outside_the_prepared_range_are_refused():
    t = elected()
    t.run("crash 1")
    t.run("campaign 2")
    t.run("process 2")
    t.run("persist 2")
    core = t.nodes[2].core
    b, old = core.ballot, make_ballot(1, 1)
    refused(core, (PROMISE, 3, b, 0, [0, old, b""]))                     # before the prepared slot
    refused(core, (PROMISE, 3, b, 0, [3, old, b"", 2, old, b""]))        # out of order
    refused(core, (PROMISE, 3, b, 0, [2, old, b"", 2, old, b""]))        # twice
    refused(core, (PROMISE, 3, b, 0, [2, make_ballot(9, 3), b""]))       # above the promise
    refused(core, (PROMISE, 3, b, 0, [2, old]))                          # not triples
    t.run("stabilize")
    assert core.role == "leader"


def test_promise_with_slots_no_honest_quorum_holds_is_refused():
    """Once, one entry at a far slot made the new leader fill every slot below it."""
    t = elected("accept_ahead=100")
    t.run("crash 1")
    t.run("campaign 2")
    t.run("process 2")
    t.run("persist 2")
    core = t.nodes[2].core
    msg = (PROMISE, 3, core.ballot, 0, [1000, make_ballot(1, 1), b""])
    with pytest.raises(MessageError, match="no honest quorum"):
        core.step(msg)
    assert core.role == "candidate" and core.last_slot < 1000
    assert core.statistics()["promises_refused"] == 1
    t.run("tick 2 3")
    t.run("stabilize")
    assert core.role == "leader" and core.last_slot < 100


def test_promise_far_ahead_is_deferred_until_caught_up():
    t = elected("accept_ahead=100")
    t.run("crash 1")
    t.run("campaign 2")
    t.run("process 2")
    t.run("persist 2")
    core = t.nodes[2].core
    core.step((PROMISE, 3, core.ballot, 10_000, []))
    rd = core.ready()
    assert core.role == "candidate"
    assert core.statistics()["promises_deferred"] == 1
    assert [m for _, m in rd.messages if m[0] == CATCHUP_REQ]


def test_accept_or_chosen_without_values_is_refused():
    t = elected()
    ballot = t.nodes[1].core.ballot
    refused(t.nodes[2].core, (ACCEPT, 1, ballot, 2, [], 1))
    core = catching_up(t)
    refused(core, (CHOSEN, 1, ballot, 2, []))


def test_prevote_for_someone_elses_ballot_is_refused():
    t = elected()
    refused(t.nodes[3].core, (PREVOTE, 2, make_ballot(5, 1)))


# ---------------------------------------------------------------- the caller

def test_persisted_refuses_an_id_never_handed_out():
    core = Replica(1, [1, 2, 3], KVStore())
    with pytest.raises(ValueError, match="never|newest"):
        core.persisted(1)
    for _ in range(40):
        core.tick()
    rd = core.ready()
    core.persisted(rd.persist_id)
    with pytest.raises(ValueError):
        core.persisted(rd.persist_id + 1)


def test_recovery_refuses_a_malformed_value():
    core = Replica(1, [1, 2, 3], KVStore())
    with pytest.raises(WalCorruptError, match="client batch"):
        core.recover([(REC_ACCEPT, 1, make_ballot(1, 1), [BAD["count-past-the-commands"]]),
                      (REC_COMMIT, 1)])
