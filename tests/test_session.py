"""Tests of cypaxos.client.session without I/O: a ClientSession driven by hand.

No event loop, no socket: the test is the wiring (and, at the end, the opening
handshake of `cypaxos.client.dialing` against the replica's acceptor machine).  It tells the session the time and
what happened to its connection, carries its request bodies to a real one-replica
core (the key-value store and the session table behind it), and brings the replies
back, as h11's tests drive a connection over a fake link.
"""
import functools
import struct

import pytest

from cypaxos import commands, wire
from cypaxos.client.dialing import DialError, Handshake
from cypaxos.client.session import ClientSession, SessionSettings
from cypaxos.clientops import ABANDONED, DONE, SENT, Op
from cypaxos.core import PROPOSED, Config, Replica
from cypaxos.errors import TimeoutError, UnavailableError
from cypaxos.security import handshake
from cypaxos.statemachine import KVStore

pytestmark = pytest.mark.fast

A, B, C = "10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"


class Core:
    """A one-replica cluster answering request bodies as a replica would."""

    def __init__(self):
        self.core = Replica(1, [1], KVStore(), Config())
        for _ in range(40):
            self.core.tick()
        self._drive()
        assert self.core.role == "leader"
        self.batches = []   # every client batch proposed, in order

    def _drive(self):
        results = {}
        while (rd := self.core.ready()) is not None:
            for sid, first, packed in rd.results:
                results[sid, first] = packed
            self.core.persisted(rd.persist_id)
        return results

    def answer(self, body):
        request = wire.parse_client_request(body)
        if request[0] == "submit":
            self.batches.append(request[2])
            assert self.core.propose(request[2]) == PROPOSED
            packed = self._drive()[struct.unpack_from("<QQ", request[2])]
            return wire.parse_reply(wire.ok(request[1], packed))
        values = [self.core.state_machine.query(q) for q in request[2]]
        return wire.parse_reply(wire.ok(request[1], values))


def put_ops(n, deadline=100.0, value=b"v"):
    """`n` puts and the list their wake-ups append their indexes to (what a parked
    caller's task may be: any callable)."""
    ops = [Op(commands.encode_put(b"k%d" % i, value), deadline) for i in range(n)]
    woken = []
    for i, op in enumerate(ops):
        op.task = functools.partial(woken.append, i)
    return ops, woken


def queue(session, ops, write=True):
    for op in ops:
        session.queue_one(op, write, False, len(op.payload) + 4, True)


def connect(session, now=0.0, address=None):
    if address is None:
        address, _ = session.next_dial(now)
    assert session.connection_made(address, "c1", 1, now) is None
    return address


def registered(addresses=(A,), settings=None):
    """A connected session that has registered (and done one put), and its core."""
    session, core = ClientSession(list(addresses), settings), Core()
    connect(session)
    ops, _ = put_ops(1)
    queue(session, ops)
    exchange(session, core)
    assert session.session_id is not None and ops[0].state == DONE
    return session, core


def exchange(session, core, now=0.0):
    """Send what the session has, answer all of it, until nothing is left."""
    rounds = 0
    while bodies := session.requests_to_send(now):
        for body in bodies:
            session.reply_received(core.answer(body), now)
            session.check_invariants()
        rounds += 1
    return rounds


def test_registers_first_then_numbers_batches_and_acks():
    session, core = ClientSession([A]), Core()
    connect(session)
    ops, woken = put_ops(3)
    queue(session, ops)
    bodies = session.requests_to_send(0.0)
    assert len(bodies) == 1 and commands.unpack_client_batch(bodies[0][2])[0].session_id == 0
    assert session.requests_to_send(0.0) == []   # writes wait for the registration
    session.reply_received(core.answer(bodies[0]), 0.0)
    assert session.session_id is not None
    exchange(session, core)
    assert [op.state for op in ops] == [DONE] * 3 and len(woken) == 3
    more, _ = put_ops(2)
    queue(session, more)
    exchange(session, core)
    batches = [commands.unpack_client_batch(b)[0] for b in core.batches[1:]]
    assert [(b.first_seq, b.acked_seq, len(b.commands)) for b in batches] == [(1, 0, 3), (4, 3, 2)]


def test_batches_are_cut_by_count_and_bytes_and_the_window_holds_the_rest():
    settings = SessionSettings(batch_commands_max=2, batch_bytes_max=100, inflight_batches_max=2)
    session, core = ClientSession([A], settings), Core()
    connect(session)
    exchange(session, core)   # nothing queued: nothing sent, not even a registration
    assert not core.batches
    ops, _ = put_ops(5)
    big = Op(commands.encode_put(b"big", b"x" * 200), 100.0)   # alone, however large
    queue(session, ops + [big])
    session.reply_received(core.answer(session.requests_to_send(0.0)[0]), 0.0)  # registered
    first = session.requests_to_send(0.0)
    assert [len(commands.unpack_client_batch(b[2])[0].commands) for b in first] == [2, 2]
    assert session.statistics()["queued_commands"] == 2   # the window (2) is full
    for body in first:
        session.reply_received(core.answer(body), 0.0)
    rest = session.requests_to_send(0.0)
    assert [len(commands.unpack_client_batch(b[2])[0].commands) for b in rest] == [1, 1]
    assert commands.unpack_client_batch(rest[1][2])[0].commands == [big.payload]


def test_a_new_connection_resends_every_unanswered_batch_byte_for_byte():
    session, core = registered([A, B])
    sent = []
    for i in range(3):   # three batches, unanswered: the connection dies
        ops, _ = put_ops(1)
        queue(session, ops)
        sent += session.requests_to_send(0.0)
    session.connection_lost(0.1, "connection reset")
    assert session.requests_to_send(0.1) == []   # nothing to send without a connection
    connect(session, 0.1)
    again = session.requests_to_send(0.1)
    assert [b[2] for b in again] == [b[2] for b in sent]    # the same bytes, in order
    assert len({b[1] for b in again + sent}) == 6           # under fresh request ids
    for body in again:
        session.reply_received(core.answer(body), 0.1)
    # An answer to the dead connection's request ids is ignored.
    session.reply_received(("ok", sent[0][1], b""), 0.1)
    assert session.statistics()["outstanding_batches"] == 0


def test_a_retry_answer_resends_the_batch_and_the_earlier_ones_after_a_pause():
    session, core = registered(settings=SessionSettings(retry_pause_s=0.01))
    bodies = []
    for i in range(2):
        ops, _ = put_ops(1)
        queue(session, ops)
        bodies += session.requests_to_send(0.0)
    retry = commands.pack_results([(commands.RESULT_RETRY, b"")])
    session.reply_received(("ok", bodies[1][1], retry), 0.0)
    assert session.requests_to_send(0.005) == []   # the pause, and new ones are held
    assert session.next_send_at() == pytest.approx(0.01)
    again = session.requests_to_send(0.01)
    assert [b[2] for b in again] == [b[2] for b in bodies]
    assert session.statistics()["retry_results"] == 1


def test_rounds_of_dials_pause_only_between_rounds():
    session = ClientSession([A, B, C], SessionSettings(backoff_min_s=0.02, backoff_max_s=0.05))
    times = []
    now = 0.0
    addresses = []
    for _ in range(7):
        address, at = session.next_dial(now)
        addresses.append(address)
        times.append(at)
        now = at
        session.connection_failed(address, "timed out", now)
    assert len(set(addresses[:3])) == 3 and addresses[3:6] == addresses[:3]
    assert times == pytest.approx([0, 0, 0, 0.02, 0.02, 0.02, 0.06])   # 20 ms, then 40


def test_when_every_replica_refuses_the_pending_calls_fail_at_once():
    session, core = registered([A, B])
    sent, sent_woken = put_ops(1)
    queue(session, sent)
    sent_body, = session.requests_to_send(0.0)
    session.connection_lost(0.0, "connection reset")
    queued, queued_woken = put_ops(2)
    queue(session, queued)
    address, _ = session.next_dial(0.0)
    session.connection_failed(address, "connection refused", 0.0, definitive=True)
    assert not sent_woken and not queued_woken     # one address is not all of them
    address, _ = session.next_dial(0.0)
    session.connection_failed(address, "connection refused", 0.0, definitive=True)
    assert len(sent_woken) == 1 and len(queued_woken) == 2
    assert isinstance(sent[0].error, UnavailableError) and sent[0].error.maybe_applied
    assert not queued[0].error.maybe_applied and "connection refused" in str(queued[0].error)
    assert session.statistics()["queued_commands"] == 0
    assert not session.wants_connection()
    # The sent batch is still outstanding: the next connection sends it first.
    connect(session, 1.0)
    assert [b[2] for b in session.requests_to_send(1.0)] == [sent_body[2]]


def test_a_replica_that_is_up_does_not_let_the_calls_fail_fast():
    session = ClientSession([A, B])
    ops, woken = put_ops(1)
    queue(session, ops)
    address, _ = session.next_dial(0.0)
    session.connection_failed(address, "connection refused", 0.0, definitive=True)
    address, _ = session.next_dial(0.0)
    session.connection_failed(address, "timed out", 0.0)   # maybe just slow
    address, at = session.next_dial(0.0)
    session.connection_failed(address, "connection refused", at, definitive=True)
    assert not woken


def test_a_redirect_to_an_unreachable_leader_means_no_leader():
    session = ClientSession([A])
    ops, woken = put_ops(1, deadline=5.0)
    queue(session, ops)
    connect(session, 0.0, A)
    registration = session.requests_to_send(0.0)[0]
    session.reply_received(("redirect", registration[1], B), 0.0)
    assert session.disconnect == f"redirected to {B}"
    session.connection_lost(0.0)
    assert session.next_dial(0.0) == (B, 0.0)   # the leader, at once
    session.connection_failed(B, "connection refused", 0.0, definitive=True)
    assert not woken   # A is up: not every replica refused
    session.expire(5.0)
    assert woken and ops[0].expired
    error = session.expired_error(ops[0], 0.0, 5.0)
    assert isinstance(error, UnavailableError) and not error.maybe_applied
    assert str(error) == (f"no leader within 5 s: no quorum, or an election in progress "
                          f"({A} names {B} as the leader, which is unreachable "
                          f"(connection refused))")


def test_requests_pending_without_a_reply_are_a_stall():
    session, _ = registered([A, B], SessionSettings(stall_timeout_s=2.0))
    ops, _ = put_ops(1, deadline=50.0)
    queue(session, ops)
    assert len(session.requests_to_send(0.0)) == 1
    assert session.next_send_at() == 2.0
    assert session.requests_to_send(1.9) == [] and session.disconnect is None
    assert session.requests_to_send(2.0) == [] and session.disconnect == "no reply for 2 s"
    session.connection_lost(2.0)
    assert session.statistics()["stalls"] == 1
    # A frozen replica that welcomed us is a plain timeout, not "unavailable".
    error = session.expired_error(ops[0], 0.0, 1.0)
    assert isinstance(error, TimeoutError) and error.maybe_applied


def test_reads_are_batched_and_a_refused_one_is_split_until_the_bad_query_fails():
    session, core = ClientSession([A]), Core()
    connect(session)
    queries = [Op(commands.encode_get(b"k%d" % i), 100.0) for i in range(4)]
    queries[2] = Op(b"?", 100.0)
    for op in queries:
        session.queue_one(op, False, False, len(op.payload) + 4, True)
    body, = session.requests_to_send(0.0)   # one read request, four queries
    assert len(body[2]) == 4
    session.reply_received(("error", body[1], "bad_request", "no"), 0.0)
    for _ in range(4):
        for part in session.requests_to_send(0.0):
            if b"?" in part[2]:
                session.reply_received(("error", part[1], "bad_request", "no"), 0.0)
            else:
                session.reply_received(core.answer(part), 0.0)
    assert [op.state for op in queries] == [DONE] * 4
    assert [op.value for i, op in enumerate(queries) if i != 2] == [b"\x00"] * 3
    assert "refused the query" in str(queries[2].error) and not queries[2].error.maybe_applied


def test_an_op_finished_while_queued_is_never_sent():
    session = ClientSession([A])
    ops, _ = put_ops(2)
    queue(session, ops)
    ops[0].state = ABANDONED   # its caller gave up
    session.forget_queued(True, 1, len(ops[0].payload) + 4)
    connect(session)
    session.reply_received(("ok", session.requests_to_send(0.0)[0][1],
                            commands.pack_results([(0, (7).to_bytes(8, "little"))])), 0.0)
    body, = session.requests_to_send(0.0)
    assert commands.unpack_client_batch(body[2])[0].commands == [ops[1].payload]
    assert ops[1].state == SENT and ops[1].sent and not ops[0].sent


# ---------------------------------------------------------------------------
# The opening handshake, sans-I/O (cypaxos.client.dialing), against the replica's

def acceptor(**auth):
    return handshake.Acceptor(handshake.ReplicaAuth("c1", 2, **auth), {1, 2, 3})


def test_a_handshake_with_a_replica_says_whom_it_reached():
    ours, theirs = Handshake(), acceptor(allow_anonymous_clients=True)
    answer = theirs.receive_data(ours.start())
    # What the replica sends after its welcome belongs to the connection's frames.
    ours.receive_data(answer[:3])
    assert not ours.done
    assert ours.receive_data(answer[3:] + b"\0\0\0\1") == b""
    assert ours.done and (ours.cluster_id, ours.replica_id) == ("c1", 2)
    assert ours.trailing_data == b"\0\0\0\1"


@pytest.mark.parametrize("answer, reason", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a cypaxos replica (it answered "
                                          "'HTTP/1.1 400 Bad Request')"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not a cypaxos replica (it answered 'SSH-2.0-OpenSSH_9.6')"),
    (bytes.fromhex("15030300020246"), "not a cypaxos replica without TLS (it answered in TLS)"),
    (b"\0\0\0\2\x10\x20", "not a cypaxos replica (it answered '????? ')"),
])
def test_a_server_that_is_not_a_replica_is_named_so(answer, reason):
    ours = Handshake()
    ours.start()
    with pytest.raises(DialError) as info:
        ours.receive_data(answer)
    assert info.value.reason == reason
    assert info.value.definitive and info.value.reachable
    ours = Handshake()
    ours.start()
    with pytest.raises(DialError, match="^not a cypaxos replica"):
        for i in range(6):   # byte by byte: told as soon as it shows
            ours.receive_data(answer[i:i + 1])


def test_a_refused_handshake_and_a_closed_connection():
    ours, theirs = Handshake(), acceptor(client_tokens=(b"0123456789abcdefghijklmnopqrstuv",))
    with pytest.raises(DialError) as info:
        ours.receive_data(theirs.receive_data(ours.start()))
    assert info.value.reason == ("authentication failed: this cluster requires a client "
                                 "token (--token-file)")
    assert info.value.definitive
    ours = Handshake()
    ours.start()
    with pytest.raises(DialError) as info:
        ours.receive_data(b"")
    assert info.value.reason == ("connection closed by the replica before its welcome (if "
                                 "the cluster uses TLS, give the client its CA: --tls-ca)")
    assert not info.value.definitive   # a replica at its connection limit, say
