"""Tests of cypaxos.client.

Two kinds:

- against `FakeReplica`, an in-process Trio server speaking the client wire protocol
  with scripted misbehaviour (retry results, busy, refusals, redirects, silence,
  dropped connections), to pin down batch assembly, resends and deadlines exactly;
- against real 3-replica clusters (`cypaxos.tools.local.LocalCluster`: one process per
  replica on free loopback ports, data in tmp_path), for round trips, batching,
  redirects, stale reads, the blocking client, a leader crash under load and a cluster
  that is down.

Nothing sleeps to wait for a state: waits poll with a deadline.
"""
import struct
import subprocess
import sys
import threading

import pytest
import trio

from cypaxos import commands, wire
from cypaxos.client import (
    COMMAND_BYTES_MAX, BlockingClient, Client, SessionSettings, connect, open_client,
    parse_addresses,
)
from cypaxos.errors import (
    ClientError, ClosedError, CommandError, ConfigError, RequestError, SessionExpiredError,
    TimeoutError, UnavailableError,
)
from cypaxos.core import PROPOSED, Config, Replica
from cypaxos.statemachine import KVStore

# ---------------------------------------------------------------------------
# A scriptable fake replica

DEFAULT = object()   # a hook's "behave normally"
SILENT = object()    # a hook's "never answer this request"
DROP = object()      # a hook's "close the connection without answering"


class FakeReplica:
    """One fake replica: a real one-replica core behind it (the key-value store and the
    session table, registrations included), scripted misbehaviour in front.

    `submit_hook(fake, request_id, batch)` and `read_hook(fake, request_id, queries,
    stale)` may return a reply body, DEFAULT, SILENT or DROP; registrations are
    answered without the hook unless `hook_registrations` is set.  Every request is
    recorded in `requests` as the parsed tuple.
    """

    def __init__(self, replica_id=1, *, welcome=True, cluster_id="fake", port=0,
                 max_sessions=100, cluster=None):
        """`cluster`: another FakeReplica whose state (core) this one shares, as the
        replicas of one cluster do."""
        self.port = port
        self.replica_id = replica_id
        self.welcome = welcome
        self.cluster_id = cluster_id
        self.address = None
        self.requests = []
        self.connections = 0
        if cluster is not None:
            self.core = cluster.core
        else:
            self.core = Replica(1, [1], KVStore(), Config(max_sessions=max_sessions))
            for _ in range(40):
                self.core.tick()
            self._drive()
            assert self.core.role == "leader"
        self.submit_hook = None
        self.hook_registrations = False
        self.read_hook = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.address = "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    @property
    def store(self):
        return self.core.state_machine

    def _drive(self):
        results = {}
        while (rd := self.core.ready()) is not None:
            for sid, first, packed in rd.results:
                results[sid, first] = packed
            self.core.persisted(rd.persist_id)
        return results

    def apply(self, batch):
        """Propose `batch` to the core; its packed results once chosen and applied."""
        assert self.core.propose(batch) == PROPOSED
        return self._drive()[struct.unpack_from("<QQ", batch)]

    def register(self):
        """Register one more session (from another client, as it were): its id."""
        packed = self.apply(commands.pack_client_batch(0, 1, 0, [b""]))
        (status, data), = commands.unpack_results(packed)
        assert status == commands.RESULT_OK
        return int.from_bytes(data, "little")

    def respond(self, request):
        op, request_id = request[0], request[1]
        if op == "submit":
            reply = DEFAULT
            if self.submit_hook is not None and (self.hook_registrations
                                                 or not is_registration(request[2])):
                reply = self.submit_hook(self, request_id, request[2])
            if reply is DEFAULT:
                reply = wire.ok(request_id, self.apply(request[2]))
            return reply
        if op == "read":
            reply = DEFAULT
            if self.read_hook is not None:
                reply = self.read_hook(self, request_id, request[2], request[3])
            if reply is DEFAULT:
                try:
                    reply = wire.ok(request_id, [self.store.query(q) for q in request[2]])
                except ValueError as exc:
                    reply = wire.error(request_id, "bad_request", str(exc))
            return reply
        if op == "status":
            return wire.ok(request_id, {"id": self.replica_id, "role": "leader"})
        return wire.error(request_id, "bad_request", "no snapshots here")

    async def _handle(self, stream):
        self.connections += 1
        decoder = wire.FrameDecoder()
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    decoder.feed(data)
                    out = []
                    while (obj := decoder.next_frame()) is not None:
                        if obj == ["client"]:
                            if not self.welcome:
                                continue   # a listener that never says welcome
                            out.append(wire.welcome(self.cluster_id, self.replica_id))
                            continue
                        request = wire.parse_client_request(obj)
                        self.requests.append(request)
                        reply = self.respond(request)
                        if reply is DROP:
                            if out:
                                await stream.send_all(wire.encode_frames(out))
                            return
                        if reply is not SILENT:
                            out.append(reply)
                    if out:
                        await stream.send_all(wire.encode_frames(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def submits(self):
        """The client batches received (registrations aside), parsed, in arrival order."""
        return [commands.unpack_client_batch(r[2])[0] for r in self.requests
                if r[0] == "submit" and not is_registration(r[2])]

    def registrations(self):
        """The registrations received, in arrival order (their nonces)."""
        return [commands.unpack_client_batch(r[2])[0].first_seq for r in self.requests
                if r[0] == "submit" and is_registration(r[2])]


def is_registration(batch):
    return batch[:8] == bytes(8)


async def start_fake(nursery, **kwargs):
    return await nursery.start(FakeReplica(**kwargs).run)


def refuse_batches_with(marker):
    """A submit hook refusing ("too_large") every batch whose bytes contain `marker`."""
    def hook(fake, request_id, batch):
        if marker in batch:
            return wire.error(request_id, "too_large", "no")
        return DEFAULT
    return hook


def kv_results(n, status=commands.RESULT_OK):
    return commands.pack_results([(status, b"")] * n)


# ---------------------------------------------------------------------------
# Addresses and argument checks (no server)

def test_parse_addresses():
    assert parse_addresses("a:1, b:2,,a:1,") == ["a:1", "b:2"]
    assert parse_addresses(["127.0.0.1:7001", ("h", 7002)]) == ["127.0.0.1:7001", "h:7002"]
    assert parse_addresses("[::1]:7001") == ["[::1]:7001"]
    for bad in ["", " , ", "nohost", "h:", ":7001", "h:0", "h:65536", "h:x", "::1:7001",
                ["h:1", 5], 42]:
        with pytest.raises(ConfigError):
            parse_addresses(bad)


async def test_bad_addresses_fail_at_open():
    with pytest.raises(ConfigError, match="port"):
        async with open_client("127.0.0.1:notaport"):
            pass
    with pytest.raises(ConfigError, match="no replica address"):
        async with open_client([]):
            pass
    with pytest.raises(ConfigError):
        connect("localhost")   # no port: refused before any thread starts


async def test_unresolvable_host_is_unavailable():
    async with open_client("no-such-host.invalid:7001", timeout=1.0) as kv:
        with pytest.raises(UnavailableError) as info:
            await kv.put(b"k", b"v")
    assert not info.value.maybe_applied
    assert "no-such-host.invalid:7001" in str(info.value)


async def test_oversized_command_refused_before_sending():
    async with open_client("127.0.0.1:9", timeout=1.0) as kv:
        with trio.fail_after(0.5):   # immediate, not after the timeout
            with pytest.raises(RequestError) as info:
                await kv.submit(b"x" * (COMMAND_BYTES_MAX + 1))
            with pytest.raises(RequestError):
                await kv.put(b"k", b"v" * COMMAND_BYTES_MAX)
            with pytest.raises(RequestError):
                await kv.query(b"q" * (COMMAND_BYTES_MAX + 1))
    assert not info.value.maybe_applied
    # The largest command that fits still makes a frame within the limit.
    batch = commands.pack_client_batch(2**63 - 1, 2**62 - 2, 2**62, [b"x" * COMMAND_BYTES_MAX])
    assert len(wire.encode_frame(wire.submit_request(2**63 - 1, batch))) - 4 \
        <= wire.FRAME_BYTES_MAX


async def test_nothing_listening_is_unavailable_not_applied():
    # Every replica refuses the connection: the calls fail as soon as each address
    # has refused once, not at their deadline (60 s here; the guard is far below it).
    async with open_client("127.0.0.1:9,127.0.0.1:11", timeout=60) as kv:
        with trio.fail_after(30):
            with pytest.raises(UnavailableError) as info:
                await kv.put(b"k", b"v")
            assert not info.value.maybe_applied
            assert str(info.value) == ("no replica reachable: 127.0.0.1:9: connection "
                                       "refused; 127.0.0.1:11: connection refused")
            with pytest.raises(UnavailableError) as info:
                await kv.get_many([b"k", b"l"])
            assert not info.value.maybe_applied
            assert "127.0.0.1:11: connection refused" in str(info.value)
        stats = kv.statistics()
        assert stats["connect_failures"] >= 4 and stats["fail_fast"] == 2
        assert stats["queued_commands"] == 0


async def test_an_error_in_the_block_leaves_it_as_itself():
    # Not as an exception group around it (the client's tasks live in a nursery of
    # the block): `except cypaxos.UnavailableError` around the block must catch it.
    with pytest.raises(UnavailableError):
        async with open_client("127.0.0.1:9", timeout=60) as kv:
            with trio.fail_after(30):
                await kv.put(b"k", b"v")
    with pytest.raises(KeyError):
        async with open_client("127.0.0.1:9"):
            raise KeyError("the caller's own")
    with trio.CancelScope() as scope:   # cancellation goes through as before
        async with open_client("127.0.0.1:9"):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def _answering_like(nursery, answer: bytes) -> str:
    """A TCP server that answers whatever it is sent with `answer`, then closes."""
    async def handler(stream):
        await stream.receive_some(1024)
        await stream.send_all(answer)
        await stream.aclose()
    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]


async def test_a_server_that_is_not_a_replica_is_named_so(nursery):
    # An HTTP server (one that rejects a request it cannot parse, as most do) used
    # to read "frame body of 1213486160 bytes exceeds the limit".
    http = await _answering_like(nursery, b"HTTP/1.1 400 Bad Request\r\n"
                                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    tls = await _answering_like(nursery, bytes.fromhex("15030300020246"))  # a TLS alert
    async with open_client([http], timeout=60) as kv:
        with trio.fail_after(30):   # every address definitively failed: at once
            with pytest.raises(UnavailableError) as info:
                await kv.put(b"k", b"v")
        assert str(info.value) == ("no replica reachable: %s: not a cypaxos replica "
                                   "(it answered 'HTTP/1.1 400 Bad Request')" % http)
        assert not info.value.maybe_applied
    async with open_client([tls, http], timeout=60) as kv:
        status = await kv.status()
    assert status[0]["error"] == "not a cypaxos replica without TLS (it answered in TLS)"
    assert status[1]["error"].startswith("not a cypaxos replica (it answered 'HTTP/1.1 400")
    assert not status[0]["reachable"] and not status[1]["reachable"]


async def test_a_replica_naming_an_unreachable_leader_means_no_leader(nursery):
    # A quorum lost: the replica left up still names the leader it last heard of,
    # which refuses connections.  That is "no leader", not "connection refused".
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % sock.getsockname()[1]
    follower = await start_fake(nursery, replica_id=1)
    follower.submit_hook = lambda f, rid, batch: wire.redirect(rid, dead)
    follower.read_hook = lambda f, rid, queries, stale: wire.redirect(rid, dead)
    follower.hook_registrations = True
    async with open_client([follower.address], timeout=1.0) as kv:
        with pytest.raises(UnavailableError) as info:
            await kv.put(b"k", b"v")
        assert str(info.value) == (
            f"no leader within 1 s: no quorum, or an election in progress "
            f"({follower.address} names {dead} as the leader, which is unreachable "
            f"(connection refused))")
        assert not info.value.maybe_applied
        with pytest.raises(UnavailableError, match="^no leader within 0.5 s"):
            await kv.get(b"k", timeout=0.5)
        assert kv.statistics()["fail_fast"] == 0   # a replica was up the whole time


# ---------------------------------------------------------------------------
# Against a fake replica: batching, resends, refusals, deadlines

async def test_batches_carry_consecutive_seqs_and_acked(nursery):
    fake = await start_fake(nursery)
    async with open_client(fake.address) as kv:
        async def put(i):
            await kv.put(b"k%d" % i, b"v%d" % i)
        for _ in range(3):
            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(put, i)
        assert await kv.get(b"k299") == b"v299"
        stats = kv.statistics()
    batches = fake.submits()
    assert stats["commands"] == 900
    assert stats["registrations"] == len(fake.registrations()) == 1
    assert stats["submit_requests"] == len(batches) + 1 < 900 // 10   # batched
    assert {b.session_id for b in batches} == {kv.session_id}
    seq = 1
    for b in batches:
        assert b.first_seq == seq
        assert b.acked_seq < b.first_seq
        seq += len(b.commands)
    assert seq == 901
    # Each round of 300 was answered before the next began, so acked caught up.
    assert batches[-1].acked_seq >= 600


async def test_new_connection_sends_queued_calls_without_a_wakeup(nursery):
    # Regression: a sender cancelled (its connection died) after taking the wake-up
    # for newly queued calls, but before sending them, used to strand them: the next
    # connection's sender waited for a wake-up that had already been consumed.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # A second address that accepts and never answers: dials there time out, which
    # is no proof that the cluster is down, so the call waits instead of failing fast.
    silent = await start_fake(nursery, welcome=False)
    async with open_client(["127.0.0.1:%d" % port, silent.address], timeout=10,
                           settings=SessionSettings(connect_timeout_s=0.1)) as kv:
        done = trio.Event()

        async def put():
            await kv.put(b"k", b"v")
            done.set()
        nursery.start_soon(put)
        with trio.fail_after(5):
            while not (kv.statistics()["queued_commands"]
                       and kv.statistics()["connect_failures"]):
                await trio.sleep(0.005)
        kv._kick_event = trio.Event()   # the wake-up is gone, as if a dead sender took it
        fake = await start_fake(nursery, port=port)
        with trio.fail_after(5):
            await done.wait()
    assert len(fake.submits()) == 1


async def test_retry_result_resends_same_bytes(nursery):
    fake = await start_fake(nursery)
    answered = []

    def hook(fake, request_id, batch):
        if not answered:
            answered.append(batch)
            return wire.ok(request_id, kv_results(1, commands.RESULT_RETRY))
        return DEFAULT
    fake.submit_hook = hook
    async with open_client(fake.address) as kv:
        await kv.put(b"a", b"1")
        assert kv.statistics()["retry_results"] == 1
    sent = [r[2] for r in fake.requests if r[0] == "submit" and not is_registration(r[2])]
    assert sent == [answered[0], answered[0]]


async def test_reconnect_resends_outstanding_batches_in_order(nursery):
    fake = await start_fake(nursery)
    drops = []

    def hook(fake, request_id, batch):
        # Drop the connection on the third submit, once: the first three are unanswered.
        if len(fake.submits()) == 3 and not drops:
            drops.append(1)
            return DROP
        if not drops:
            return SILENT
        return DEFAULT
    fake.submit_hook = hook
    async with open_client(fake.address) as kv:
        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(kv.put, b"k%d" % i, b"v")
                await trio.sleep(0.01)   # three separate batches
        stats = kv.statistics()
    sent = [r[2] for r in fake.requests if r[0] == "submit" and not is_registration(r[2])]
    assert len(sent) == 6 and sent[3:] == sent[:3]   # byte for byte, seq order
    assert fake.connections == 2
    assert stats["resent_batches"] == 3


async def test_duplicate_resend_applied_once(nursery):
    fake = await start_fake(nursery)
    first = []

    def hook(fake, request_id, batch):
        if not first:
            first.append(fake.apply(batch))   # applied, then the answer is "lost"
            return DROP
        return DEFAULT
    fake.submit_hook = hook
    async with open_client(fake.address) as kv:
        assert await kv.cas(b"c", None, b"1") is True   # not False: applied once
        assert await kv.get(b"c") == b"1"


async def test_busy_backs_off_and_resends(nursery):
    fake = await start_fake(nursery)
    busy = [3]

    def hook(fake, request_id, batch):
        if busy[0]:
            busy[0] -= 1
            return wire.error(request_id, "busy", "queue full")
        return DEFAULT
    fake.submit_hook = hook
    async with open_client(fake.address) as kv:
        start = trio.current_time()
        await kv.put(b"k", b"v")
        assert trio.current_time() - start >= 0.02 + 0.04   # backed off
        assert kv.statistics()["busy_replies"] == 3


async def test_refused_command_fails_alone_and_session_moves_on(nursery):
    fake = await start_fake(nursery)
    bad = b"Pbad"
    fake.submit_hook = refuse_batches_with(bad)
    async with open_client(fake.address) as kv:
        await kv.put(b"z", b"0")
        old_session = kv.session_id
        results = {}

        async def call(name, command):
            try:
                results[name] = await kv.submit(command)
            except ClientError as exc:
                results[name] = exc
        async with trio.open_nursery() as n:   # one batch: the same scheduling round
            n.start_soon(call, "a", commands.encode_put(b"a", b"1"))
            n.start_soon(call, "bad", bad)
            n.start_soon(call, "b", commands.encode_put(b"b", b"2"))
        assert results["a"] == b"" and results["b"] == b""
        assert isinstance(results["bad"], RequestError)
        assert not results["bad"].maybe_applied
        assert kv.session_id != old_session
        assert kv.statistics()["session_restarts"] == 1
        # The new session works from seq 1, and state is as expected.
        await kv.put(b"c", b"3")
        assert [await kv.get(k) for k in (b"a", b"b", b"c")] == [b"1", b"2", b"3"]
    new = [b for b in fake.submits() if b.session_id != old_session]
    assert new[0].first_seq == 1


async def test_session_expired_fails_the_call_and_a_new_session_follows(nursery):
    fake = await start_fake(nursery, max_sessions=1)
    async with open_client(fake.address) as kv:
        await kv.put(b"a", b"1")
        first = kv.session_id
        fake.register()          # another client's registration evicts ours
        with pytest.raises(SessionExpiredError) as info:
            await kv.put(b"b", b"2")
        assert info.value.maybe_applied
        await kv.put(b"c", b"3")  # in a new session
        assert kv.session_id not in (None, first)
        stats = kv.statistics()
        assert (stats["registrations"], stats["sessions_expired"]) == (2, 1)
        # The expired command was not applied; the others were, once each.
        assert [await kv.get(k) for k in (b"a", b"b", b"c")] == [b"1", None, b"3"]
    assert [b.session_id for b in fake.submits()] == [first, first, kv.session_id]
    assert len(fake.registrations()) == 2


async def test_reads_batched_and_bad_query_isolated(nursery):
    fake = await start_fake(nursery)
    async with open_client(fake.address) as kv:
        await kv.put(b"k", b"v")
        results = {}

        async def get(i):
            results[i] = await kv.get(b"k")
        async with trio.open_nursery() as n:
            for i in range(100):
                n.start_soon(get, i)
        assert set(results.values()) == {b"v"} and len(results) == 100
        assert kv.statistics()["read_requests"] < 10   # batched
        results.clear()

        async def bad():
            with pytest.raises(RequestError, match="unknown query"):
                await kv.query(b"?")
        async with trio.open_nursery() as n:   # one bad query among 64 good ones
            for i in range(32):
                n.start_soon(get, i)
            n.start_soon(bad)
            for i in range(32, 64):
                n.start_soon(get, i)
        assert set(results.values()) == {b"v"} and len(results) == 64
        assert await kv.get(b"k", stale=True) == b"v"
    reads = [r for r in fake.requests if r[0] == "read"]
    assert len(reads) < 30
    assert reads[-1][3] is True and all(r[3] is False for r in reads[:-1])


async def test_oversized_reply_then_smaller_requests(nursery):
    fake = await start_fake(nursery)
    huge = []

    def hook(fake, request_id, queries, stale):
        # The first read is answered with a frame over what a client accepts.
        if not huge:
            huge.append(1)
            return wire.ok(request_id, [b"\x01" + b"x" * (70 << 20)] * len(queries))
        return DEFAULT
    fake.read_hook = hook
    async with open_client(fake.address, timeout=20) as kv:
        await kv.put(b"k", b"v")
        values = {}

        async def get(i):
            values[i] = await kv.get(b"k")
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(get, i)
        assert list(values.values()) == [b"v"] * 8
        stats = kv.statistics()
        # Dropped the connection, then asked one query per request.
        assert stats["connections"] == 2
        reads = [r for r in fake.requests if r[0] == "read"]
        assert [len(r[2]) for r in reads[1:]] == [1] * (len(reads) - 1)


async def test_large_values_batched_reads(nursery):
    fake = await start_fake(nursery)
    value = b"L" * (10 << 20)
    async with open_client(fake.address, timeout=20) as kv:
        for i in range(8):
            await kv.put(b"big%d" % i, value)
        results = {}

        async def get(i):
            results[i] = await kv.get(b"big%d" % i)
        # Batched, these would come back in one 80 MiB frame: over what a client
        # accepts, so the client must end up asking in smaller requests.
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(get, i)
        assert all(results[i] == value for i in range(8))


async def test_redirect_to_leader(nursery):
    leader = await start_fake(nursery, replica_id=2)
    follower = await start_fake(nursery, replica_id=1, cluster=leader)
    follower.submit_hook = lambda f, rid, batch: wire.redirect(rid, leader.address)
    async with open_client([follower.address]) as kv:
        await kv.put(b"k", b"v")
        stats = kv.statistics()
        assert stats["redirects"] == 1
        assert stats["connected_to"] == leader.address
        assert leader.address in kv.addresses   # learned
    assert len(leader.submits()) == 1


async def test_no_leader_anywhere_is_unavailable(nursery):
    fakes = [await start_fake(nursery, replica_id=1)]
    fakes.append(await start_fake(nursery, replica_id=2, cluster=fakes[0]))
    for fake in fakes:
        fake.submit_hook = lambda f, rid, batch: wire.redirect(rid, None)
        fake.hook_registrations = True
    async with open_client([f.address for f in fakes], timeout=0.5) as kv:
        with pytest.raises(UnavailableError, match="^no leader within") as info:
            await kv.put(b"k", b"v")
    # Never sent: with no leader the client could not even register its session.
    assert not info.value.maybe_applied
    assert all(not f.submits() and f.registrations() for f in fakes)


async def test_timeout_maybe_applied_flags(nursery):
    fake = await start_fake(nursery)
    fake.submit_hook = lambda f, rid, batch: SILENT
    fake.read_hook = lambda f, rid, queries, stale: SILENT
    async with open_client(fake.address, timeout=0.3) as kv:
        with pytest.raises(TimeoutError) as info:
            await kv.put(b"k", b"v")
        assert info.value.maybe_applied
        with pytest.raises(TimeoutError) as info:
            await kv.get(b"k", timeout=0.1)
        assert not info.value.maybe_applied
    silent = await start_fake(nursery, welcome=False)   # accepts, never welcomes
    async with open_client(silent.address, timeout=0.3) as kv:
        with pytest.raises(UnavailableError) as info:
            await kv.put(b"k", b"v")
        assert not info.value.maybe_applied


async def test_cancelled_call_leaves_client_usable(nursery):
    fake = await start_fake(nursery)
    fake.submit_hook = lambda f, rid, batch: SILENT
    async with open_client(fake.address) as kv:
        with trio.move_on_after(0.2) as scope:
            await kv.put(b"k", b"v")
        assert scope.cancelled_caught
        fake.submit_hook = None
        await kv.put(b"k2", b"v2")   # the first batch goes again first: same session
        assert await kv.get(b"k") == b"v" and await kv.get(b"k2") == b"v2"


async def test_replica_of_another_cluster_is_refused(nursery):
    other = await start_fake(nursery, replica_id=2, cluster_id="other")
    ours = await start_fake(nursery, replica_id=1, cluster_id="ours")
    ours.submit_hook = lambda f, rid, batch: wire.redirect(rid, other.address)
    async with open_client([ours.address], timeout=0.5) as kv:
        with pytest.raises(TimeoutError, match="cluster 'other'"):
            await kv.put(b"k", b"v")
    assert not other.requests


async def test_stalled_replica_is_left_for_another(nursery):
    stuck = await start_fake(nursery, replica_id=1)
    stuck.submit_hook = lambda f, rid, batch: SILENT
    good = await start_fake(nursery, replica_id=2, cluster=stuck)
    async with open_client([stuck.address, good.address], timeout=5,
                           settings=SessionSettings(stall_timeout_s=0.2)) as kv:
        for i in range(3):
            await kv.put(b"k%d" % i, b"v")
        assert kv.statistics()["connected_to"] == good.address
        assert kv.statistics()["stalls"] <= 1


async def test_shutting_down_replica_is_left_for_another(nursery):
    leaving = await start_fake(nursery, replica_id=1)
    leaving.submit_hook = lambda f, rid, batch: wire.error(rid, "shutting_down", "bye")
    good = await start_fake(nursery, replica_id=2, cluster=leaving)
    async with open_client([leaving.address, good.address], timeout=5) as kv:
        for i in range(3):
            await kv.put(b"k%d" % i, b"v")
        assert kv.statistics()["connected_to"] == good.address


def test_unclosed_blocking_client_does_not_hang_exit(tmp_path, cypaxos_env):
    script = tmp_path / "script.py"
    script.write_text("import cypaxos.client as c\n"
                      "c.connect('127.0.0.1:9', timeout=0.1)\n"   # dropped, never closed
                      "kv = c.connect('127.0.0.1:9', timeout=0.1)\n"
                      "print('done')\n")
    result = subprocess.run([sys.executable, str(script)], env=cypaxos_env, timeout=20,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr


def test_blocking_client_unavailable():
    with connect("127.0.0.1:9", timeout=0.3) as kv:
        with pytest.raises(UnavailableError) as info:
            kv.put(b"k", b"v")
        assert not info.value.maybe_applied
        assert kv.status()[0]["reachable"] is False


async def test_queued_commands_that_time_out_are_never_sent(nursery):
    fake = await start_fake(nursery)
    # No stall may end the connection while the window fills (on a busy machine that
    # can take a while): every batch stays outstanding on the one connection.
    settings = SessionSettings(stall_timeout_s=120)
    async with open_client(fake.address, timeout=60, settings=settings) as kv:
        # Registered first: a put queued while the registration is in flight would
        # share the next batch with the one after it.
        await kv.put(b"warm", b"up")
        fake.submit_hook = lambda f, rid, batch: SILENT
        async with trio.open_nursery() as n:
            # Fill the window of in-flight batches, one put per batch.
            for i in range(64):
                n.start_soon(kv.put, b"k%d" % i, b"v")
                with trio.fail_after(20):
                    while kv.statistics()["outstanding_batches"] < i + 1:
                        await trio.sleep(0.001)
            with pytest.raises(TimeoutError) as info:
                await kv.put(b"k999", b"v", timeout=0.1)
            assert kv.statistics()["queued_commands"] == 0   # removed from the queue
            n.cancel_scope.cancel()
    assert not info.value.maybe_applied
    assert len(fake.submits()) == 1 + 64
    assert all(b"k999" not in r[2] for r in fake.requests)


async def test_close_fails_pending_calls(nursery):
    fake = await start_fake(nursery)
    fake.submit_hook = lambda f, rid, batch: SILENT
    outcome = []
    async with open_client(fake.address) as kv:
        async def put():
            try:
                await kv.put(b"k", b"v")
            except ClosedError as exc:
                outcome.append(exc)
        nursery.start_soon(put)
        with trio.fail_after(5):
            while not fake.submits():
                await trio.sleep(0.01)
    with trio.fail_after(5):
        while not outcome:
            await trio.sleep(0.01)
    assert outcome[0].maybe_applied
    with pytest.raises(ClosedError):
        await kv.put(b"k", b"v")


async def test_status_and_snapshot_per_address(nursery):
    fake = await start_fake(nursery, replica_id=4)
    async with open_client([fake.address, "127.0.0.1:9"]) as kv:
        status = await kv.status()
        snap = await kv.snapshot()
    assert status[0]["reachable"] and status[0]["id"] == 4 and status[0]["role"] == "leader"
    assert status[0]["address"] == fake.address
    assert status[1] == {"address": "127.0.0.1:9", "reachable": False,
                         "error": "connection refused"}
    assert snap[0]["reachable"] and "bad_request" in snap[0]["error"]
    assert not snap[1]["reachable"]


# ---------------------------------------------------------------------------
# Bulk calls (put_many, submit_many, get_many, query_many)

async def test_bulk_calls_batch_in_order(nursery):
    fake = await start_fake(nursery)
    async with open_client(fake.address) as kv:
        await kv.put_many([(b"b%d" % i, b"v%d" % i) for i in range(1000)])
        assert kv.statistics()["commands"] == 1000
        batches = fake.submits()
        assert len(batches) < 100      # far fewer requests than commands
        seqs = [b.first_seq for b in batches]
        assert seqs == sorted(seqs) and seqs[0] == 1
        assert sum(len(b.commands) for b in batches) == 1000
        keys = [b"b%d" % i for i in range(1000)] + [b"absent"]
        values = await kv.get_many(keys)
        assert values == [b"v%d" % i for i in range(1000)] + [None]
        assert await kv.get_many(keys[:3], stale=True) == [b"v0", b"v1", b"v2"]
        assert await kv.get_many([]) == [] and await kv.submit_many([]) == []
        results = await kv.submit_many([commands.encode_delete(b"b0"),
                                        commands.encode_delete(b"b0")])
        assert [commands.decode_bool(r) for r in results] == [True, False]
        # query_many answers the raw queries, like query().
        assert await kv.query_many([commands.encode_get(b"b1")]) == [b"\x01v1"]


async def test_bulk_call_failures(nursery):
    fake = await start_fake(nursery)
    bad = b"Pbad"
    fake.submit_hook = refuse_batches_with(bad)
    async with open_client(fake.address) as kv:
        good = commands.encode_put(b"a", b"1")
        # One refused command fails alone; the others are applied and answered.
        out = await kv.submit_many([good, bad, good], return_exceptions=True)
        assert out[0] == b"" and out[2] == b"" and isinstance(out[1], RequestError)
        with pytest.raises(RequestError):
            await kv.submit_many([good, bad])
        with pytest.raises(RequestError, match="exceeds the limit"):
            await kv.submit_many([good, b"x" * (COMMAND_BYTES_MAX + 1)])
        with pytest.raises(TypeError):
            await kv.put_many([(b"k", 5)])
        assert await kv.get(b"a") == b"1"


async def test_raised_errors_leave_nothing_uncollectable(nursery):
    # Ops are not tracked by the cyclic GC, so an op keeping the exception its
    # caller raised (whose traceback holds the caller's frame, which holds the op)
    # would leak a frame per failed call.
    import gc
    import types

    fake = await start_fake(nursery)
    bad = b"Pbad"
    fake.submit_hook = refuse_batches_with(bad)

    def frames_alive():
        gc.collect()
        return sum(type(o) is types.TracebackType for o in gc.get_objects())

    async with open_client(fake.address) as kv:
        good = commands.encode_put(b"a", b"1")
        for _ in range(5):   # warm up (first-time allocations)
            with pytest.raises(RequestError):
                await kv.submit(bad)
        before = frames_alive()
        for _ in range(100):
            with pytest.raises(RequestError):
                await kv.submit(bad)
            with pytest.raises(RequestError):
                await kv.submit_many([good, bad])
        assert frames_alive() - before < 20


async def test_bulk_call_deadline_and_cancel(nursery):
    fake = await start_fake(nursery)
    fake.submit_hook = lambda f, rid, batch: SILENT
    fake.read_hook = lambda f, rid, queries, stale: SILENT
    async with open_client(fake.address, timeout=0.3) as kv:
        with trio.fail_after(5):
            with pytest.raises(TimeoutError) as info:
                await kv.put_many([(b"k%d" % i, b"v") for i in range(100)])
        assert info.value.maybe_applied
        out = await kv.query_many([commands.encode_get(b"k")] * 3, timeout=0.1,
                                  return_exceptions=True)
        assert all(isinstance(e, TimeoutError) and not e.maybe_applied for e in out)
        with trio.move_on_after(0.1) as scope:
            await kv.put_many([(b"c%d" % i, b"v") for i in range(100)])
        assert scope.cancelled_caught
        assert kv.statistics()["queued_commands"] == 0
        fake.submit_hook = None
        fake.read_hook = None
        await kv.put_many([(b"after", b"1")], timeout=5)
        assert await kv.get_many([b"after", b"k0"], timeout=5) == [b"1", b"v"]


async def test_bulk_call_larger_than_the_queue(nursery):
    fake = await start_fake(nursery)
    async with open_client(fake.address,
                           settings=SessionSettings(queue_commands_max=100)) as kv:
        await kv.put_many([(b"q%d" % i, b"%d" % i) for i in range(1000)])
        assert await kv.get_many([b"q%d" % i for i in range(1000)]) == \
            [b"%d" % i for i in range(1000)]
        # Nothing queued beyond the bound at any time: a batch never exceeds it.
        assert max(len(b.commands) for b in fake.submits()) <= 100


# ---------------------------------------------------------------------------
# Real clusters



async def wait_leader(kv, timeout=30.0, *, dead=()):
    """Poll `status()` until every live replica answers and exactly one leads (with
    every live replica agreeing); return its entry.  `dead`: addresses to ignore."""
    status = None
    with trio.move_on_after(timeout):
        while True:
            status = await kv.status(timeout=1.0)
            live = [s for s in status if s["address"] not in dead]
            leaders = [s for s in live if s["reachable"] and s.get("role") == "leader"]
            if len(leaders) == 1 and all(s["reachable"] for s in live):
                if all(s.get("leader") == leaders[0]["address"] for s in live):
                    return leaders[0]
            await trio.sleep(0.05)
    fields = ("address", "reachable", "role", "ballot", "leader", "commit_index", "error")
    raise AssertionError(f"no single leader within {timeout} s; last status: "
                         f"{[{k: s.get(k) for k in fields} for s in status or []]}")


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    """One 3-replica cluster shared by the non-destructive tests of this module."""
    return shared_cluster


async def test_round_trips(cluster):
    async with open_client(cluster.cluster_arg, timeout=10) as kv:
        await wait_leader(kv)
        await kv.put(b"rt", b"one")
        assert await kv.get(b"rt") == b"one"
        await kv.put("rt-str", "two")            # str is UTF-8
        assert await kv.get(b"rt-str") == b"two"
        assert await kv.get(b"rt-missing") is None
        assert await kv.cas(b"rt", b"one", b"three") is True
        assert await kv.cas(b"rt", b"one", b"four") is False
        assert await kv.get(b"rt") == b"three"
        assert await kv.cas(b"rt-new", None, b"x") is True     # None = absent
        assert await kv.cas(b"rt-new", None, b"y") is False
        assert await kv.delete(b"rt") is True
        assert await kv.delete(b"rt") is False
        assert await kv.get(b"rt") is None
        assert await kv.submit(commands.encode_put(b"rt-raw", b"r")) == b""
        assert await kv.get(b"rt-raw") == b"r"
        assert int(await kv.query(b"N")) >= 3
        with pytest.raises(CommandError) as info:
            await kv.submit(b"Z nonsense")
        assert info.value.maybe_applied and "unknown command" in str(info.value)
        with pytest.raises(RequestError):
            await kv.query(b"?")
        await kv.put(b"rt-big", b"b" * (2 << 20))   # bigger than one batch
        assert await kv.get(b"rt-big") == b"b" * (2 << 20)


async def test_status_and_snapshot(cluster):
    async with open_client(cluster.cluster_arg, timeout=10) as kv:
        leader = await wait_leader(kv)
        await kv.put(b"st", b"1")
        with trio.fail_after(10):
            while True:
                status = await kv.status()
                if len({(s["applied_index"], s["state_digest"]) for s in status}) == 1:
                    break
                await trio.sleep(0.05)
        assert [s["address"] for s in status] == cluster.addresses
        assert sorted(s["id"] for s in status) == [1, 2, 3]
        for s in status:
            assert s["reachable"] and s["leader"] == leader["address"]
            for name in ("role", "ballot", "commit_index", "applied_index", "state_digest"):
                assert name in s
        snap = await kv.snapshot()
        assert [s["address"] for s in snap] == cluster.addresses
        assert all(s["reachable"] and ("applied_index" in s or "error" in s) for s in snap)


async def test_concurrent_puts_are_batched(cluster):
    async with open_client(cluster.cluster_arg, timeout=20) as kv:
        await wait_leader(kv)
        before = kv.statistics()

        async def worker(w):
            for i in range(w, 3000, 200):
                await kv.put(b"bt%d" % i, b"v%d" % i)
        async with trio.open_nursery() as n:
            for w in range(200):
                n.start_soon(worker, w)
        stats = kv.statistics()
        submits = stats["submit_requests"] - before["submit_requests"]
        assert stats["commands"] - before["commands"] == 3000
        assert submits < 3000 // 5, stats
        values = {}

        async def check(i):
            values[i] = await kv.get(b"bt%d" % i)
        async with trio.open_nursery() as n:
            for i in range(3000):
                n.start_soon(check, i)
        assert all(values[i] == b"v%d" % i for i in range(3000))
        assert kv.statistics()["read_requests"] - stats["read_requests"] < 3000 // 5


async def test_redirect_from_follower(cluster):
    async with open_client(cluster.cluster_arg) as probe:
        leader = await wait_leader(probe)
    follower = next(a for a in cluster.addresses if a != leader["address"])
    async with open_client([follower], timeout=10) as kv:
        await kv.put(b"rd", b"1")
        assert await kv.get(b"rd") == b"1"
        stats = kv.statistics()
        assert stats["redirects"] >= 1
        assert stats["connected_to"] == leader["address"]


async def test_stale_reads(cluster):
    async with open_client(cluster.cluster_arg, timeout=10) as kv:
        leader = await wait_leader(kv)
        await kv.put(b"stale", b"fresh")
    for address in cluster.addresses:
        # A client that knows only this replica: stale reads are served right there.
        async with open_client([address], timeout=10) as kv:
            with trio.fail_after(10):
                while await kv.get(b"stale", stale=True) != b"fresh":
                    await trio.sleep(0.02)
            stats = kv.statistics()
            assert stats["connected_to"] == address and stats["redirects"] == 0
            assert await kv.query(b"N", stale=True)
    assert leader["address"] in cluster.addresses


async def test_bulk_calls_on_a_cluster(cluster):
    async with open_client(cluster.cluster_arg, timeout=20) as kv:
        await wait_leader(kv)
        items = [(b"bk%d" % i, b"v%d" % i) for i in range(20000)]
        await kv.put_many(items)
        assert await kv.get_many([k for k, _ in items]) == [v for _, v in items]
        assert kv.statistics()["batches"] < 200
        swapped = await kv.submit_many([commands.encode_cas(b"bk0", b"v0", b"w"),
                                        commands.encode_cas(b"bk0", b"v0", b"x")])
        assert [commands.decode_bool(r) for r in swapped] == [True, False]


def test_bulk_calls_blocking(cluster):
    with connect(cluster.cluster_arg, timeout=20) as blocking:
        blocking.put_many((b"bb%d" % i, b"%d" % i) for i in range(100))
        assert blocking.get_many([b"bb0", b"bb99", b"bb100"]) == [b"0", b"99", None]
        assert blocking.submit_many([commands.encode_delete(b"bb0")]) == [b"\x01"]
        assert blocking.query_many([commands.encode_get(b"bb0")]) == [b"\x00"]


def test_blocking_client_from_threads(cluster):
    with connect(cluster.cluster_arg, timeout=10) as kv:
        assert isinstance(kv, BlockingClient)
        kv.put(b"bl", b"0")
        failures = []

        def work(t):
            try:
                for i in range(25):
                    kv.put(b"bl-%d-%d" % (t, i), b"%d" % i)
                assert kv.get(b"bl-%d-24" % t) == b"24"
                assert kv.cas(b"bl-%d-0" % t, b"0", b"x")
            except Exception as exc:   # reported in the main thread
                failures.append(exc)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
        assert kv.get(b"bl-7-0") == b"x"
        assert kv.get("bl", stale=True) in (b"0", None)   # a follower may lag
        assert kv.delete(b"bl") is True
        assert kv.submit(commands.encode_put(b"bl2", b"y")) == b""
        assert kv.query(commands.encode_get(b"bl2")) == b"\x01y"
        assert len(kv.status()) == 3 and len(kv.snapshot()) == 3
        assert kv.statistics()["commands"] >= 200
    with pytest.raises(ClosedError):
        kv.put(b"k", b"v")
    kv.close()   # twice is fine


async def test_leader_crash_under_load(new_cluster):
    cluster = new_cluster(fsync=False)
    cluster.start_all()
    try:
        async with open_client(cluster.cluster_arg, timeout=10) as kv:
            leader = await wait_leader(kv)
            await kv.put(b"warm", b"up")   # connected to the leader
            outcome = {}

            async def put(i):
                try:
                    await kv.put(b"lc%d" % i, b"v%d" % i)
                    outcome[i] = "ok"
                except TimeoutError:
                    outcome[i] = "timeout"
            # Freeze the leader first, so the puts are provably in flight (sent, not
            # answered) when it dies; in waves, so that several batches are.
            cluster.pause(leader["id"])
            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(put, i)
                    if i % 25 == 24:
                        await trio.sleep(0.005)
                with trio.fail_after(5):
                    while kv.statistics()["queued_commands"]:
                        await trio.sleep(0.001)
                assert not outcome and kv.statistics()["outstanding_batches"] >= 2
                cluster.kill(leader["id"])
            assert len(outcome) == 200
            assert set(outcome.values()) <= {"ok", "timeout"}
            new_leader = await wait_leader(kv, dead=[leader["address"]])
            assert new_leader["address"] != leader["address"]
            for i, result in outcome.items():
                if result == "ok":
                    assert await kv.get(b"lc%d" % i) == b"v%d" % i
            assert sum(r == "ok" for r in outcome.values()) >= 150   # 10 s is plenty
    finally:
        cluster.close()


async def test_evicted_sessions_are_expired_not_reapplied(new_cluster):
    """With `serve --max-sessions 1`, a second client's registration evicts the first
    client's session: its next write fails SessionExpiredError instead of being
    applied in a recreated session, and its write after that goes in a new one."""
    cluster = new_cluster(fsync=False, extra_args=("--max-sessions", "1"))
    cluster.start_all()
    try:
        async with open_client(cluster.cluster_arg, timeout=10) as first, \
                open_client(cluster.cluster_arg, timeout=10) as second:
            await wait_leader(first)
            assert await first.cas(b"once", None, b"first") is True
            await second.put(b"other", b"x")           # registers: evicts `first`'s
            with pytest.raises(SessionExpiredError) as info:
                await first.put(b"late", b"1")
            assert info.value.maybe_applied
            assert await first.get(b"late") is None      # not applied
            await first.put(b"later", b"2")              # a new session (evicts `second`)
            assert first.statistics()["registrations"] == 2
            assert await second.get(b"later") == b"2"
            statuses = await first.status()
            assert all(s["reachable"] for s in statuses)
    finally:
        cluster.close()


async def test_quorum_loss_is_no_leader(new_cluster):
    cluster = new_cluster(fsync=False)
    cluster.start_all()
    try:
        async with open_client(cluster.cluster_arg, timeout=10) as kv:
            leader = await wait_leader(kv)
            await kv.put(b"quorum", b"1")
            # The leader and one follower die; the last replica is up, alone.
            other = next(i for i in cluster.ids if i != leader["id"])
            cluster.kill(leader["id"])
            cluster.kill(other)
            with pytest.raises(UnavailableError) as info:
                await kv.put(b"quorum", b"2", timeout=3)
            assert str(info.value).startswith("no leader within 3 s: no quorum"), info.value
            assert info.value.maybe_applied   # it was sent (redirected, or lost with the leader)
            with pytest.raises(UnavailableError) as info:
                await kv.get(b"quorum", timeout=2)
            assert str(info.value).startswith("no leader within 2 s: no quorum"), info.value
            assert not info.value.maybe_applied
    finally:
        cluster.close()


async def test_cluster_down(new_cluster):
    cluster = new_cluster(fsync=False)
    cluster.start_all()
    try:
        async with open_client(cluster.cluster_arg, timeout=10) as kv:
            await wait_leader(kv)
            await kv.put(b"down", b"1")
            # Frozen replicas: the command is sent and never answered.
            for replica_id in cluster.ids:
                cluster.pause(replica_id)
            with pytest.raises(TimeoutError) as info:
                await kv.put(b"down", b"2", timeout=0.5)
            assert info.value.maybe_applied
            with pytest.raises(TimeoutError) as info:
                await kv.get(b"down", timeout=0.3)
            assert not info.value.maybe_applied
            # Dead replicas: nothing is reachable, nothing is sent.
            for replica_id in cluster.ids:
                cluster.kill(replica_id)
            with pytest.raises(UnavailableError) as info:
                await kv.put(b"down", b"3", timeout=1.0)
            assert not info.value.maybe_applied
            assert "refused" in str(info.value)
            with pytest.raises(UnavailableError) as info:
                await kv.get(b"down", timeout=0.5)
            assert not info.value.maybe_applied
            status = await kv.status(timeout=1.0)
            assert [s["reachable"] for s in status] == [False] * 3
    finally:
        cluster.close()
