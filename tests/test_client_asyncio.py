"""The async client under asyncio as under Trio: the same tests, run under each.

Every test here is written with anyio (task groups, timeouts, sleeps) and runs once
per event loop (`backend`: "trio", then "asyncio") through `anyio.run`, against real
replica processes (`LocalCluster`), over TCP and TLS: `cypaxos.open_client` picks the
wiring of the loop it is called in (the Trio `Client` or the asyncio
`AsyncioClient`), and both must behave the same.  The fake replicas of
tests/test_client.py serve the tests of the protocol's corners from a Trio loop of
their own, in a thread.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import os
import time
import types

import anyio
import pytest
import trio

import cypaxos
from cypaxos import commands, wire
from cypaxos.client import Client, SessionSettings, open_client
from cypaxos.client.aio import AsyncioClient
from cypaxos.errors import (
    ClientError, ClosedError, CommandError, RequestError, SessionExpiredError, TimeoutError,
    UnavailableError,
)
from cypaxos.security.secrets import generate_key
from cypaxos.tools.local import free_ports

from conftest import READY_TIMEOUT_S
from triothread import TrioThread
from test_client import (
    DEFAULT, DROP, SILENT, FakeReplica, is_registration, kv_results, refuse_batches_with,
    start_fake,
)

CLIENT_TIMEOUT_S = 20.0
"""Generous: the machine running the tests may be busy."""

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["trio", "asyncio"])
def backend(request) -> str:
    """The event loop a test runs under."""
    return request.param


def run(backend: str, test, *args) -> None:
    """Run `await test(*args)` in a fresh event loop of `backend`."""
    anyio.run(test, *args, backend=backend)


async def wait_leader(kv, timeout: float = 30.0, *, dead=()) -> dict:
    """Poll `status()` until every live replica answers and one leads, agreed by all."""
    status = None
    with anyio.move_on_after(timeout):
        while True:
            status = await kv.status(timeout=1.0)
            live = [s for s in status if s["address"] not in dead]
            leaders = [s for s in live if s["reachable"] and s.get("role") == "leader"]
            if len(leaders) == 1 and all(s["reachable"] for s in live) and all(
                    s.get("leader") == leaders[0]["address"] for s in live):
                return leaders[0]
            await anyio.sleep(0.05)
    raise AssertionError(f"no single leader within {timeout} s: {status}")


def expected_type(backend: str) -> type:
    return Client if backend == "trio" else AsyncioClient


# ---------------------------------------------------------------------------
# Without a cluster


def test_the_asyncio_client_has_every_public_method_of_the_trio_client():
    public = {name for name in dir(Client) if not name.startswith("_")}
    assert public <= {name for name in dir(AsyncioClient) if not name.startswith("_")}
    for name in public:
        trio_method, aio_method = getattr(Client, name), getattr(AsyncioClient, name)
        if not callable(trio_method):   # a property
            assert type(trio_method) is type(aio_method), name
            continue
        assert inspect.signature(trio_method) == inspect.signature(aio_method), name
        assert inspect.iscoroutinefunction(trio_method) == \
            inspect.iscoroutinefunction(aio_method), name


def test_an_error_in_the_block_leaves_it_as_itself(backend):
    async def body():
        # Not as an exception group: `except cypaxos.UnavailableError` around the
        # block must catch it.
        with pytest.raises(UnavailableError) as info:
            async with open_client("127.0.0.1:9,127.0.0.1:11", timeout=60) as kv:
                assert type(kv) is expected_type(backend)
                with anyio.fail_after(30):   # every address refuses: fails fast
                    await kv.put(b"k", b"v")
        assert not info.value.maybe_applied
        assert str(info.value) == ("no replica reachable: 127.0.0.1:9: connection "
                                   "refused; 127.0.0.1:11: connection refused")
        with pytest.raises(KeyError):
            async with open_client("127.0.0.1:9"):
                raise KeyError("the caller's own")
        with anyio.CancelScope() as scope:   # cancellation goes through as before
            async with open_client("127.0.0.1:9"):
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        with pytest.raises(cypaxos.ConfigError, match="port"):
            async with open_client("127.0.0.1:notaport"):
                pass
        async with open_client("no-such-host.invalid:7001", timeout=1.0) as kv:
            with pytest.raises(UnavailableError, match="no-such-host.invalid:7001"):
                await kv.get(b"k")
            with pytest.raises(RequestError):   # refused before sending
                await kv.submit(b"x" * (cypaxos.client.COMMAND_BYTES_MAX + 1))
            status = await kv.status(timeout=1.0)
            assert status[0]["address"] == "no-such-host.invalid:7001"
            assert not status[0]["reachable"] and status[0]["error"]
    run(backend, body)


# ---------------------------------------------------------------------------
# A shared cluster


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    """One 3-replica cluster shared by the non-destructive tests of this module."""
    return shared_cluster


def test_round_trips(cluster, backend, tmp_path):
    async def body():
        p = backend[0].encode()   # keys of their own per backend
        async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S) as kv:
            assert type(kv) is expected_type(backend)
            leader = await wait_leader(kv)
            await kv.put(p + b"rt", b"one")
            assert await kv.get(p + b"rt") == b"one"
            await kv.put(p.decode() + "rt-str", "two")   # str is UTF-8
            assert await kv.get(p + b"rt-str") == b"two"
            assert await kv.get(p + b"rt-missing") is None
            assert await kv.cas(p + b"rt", b"one", b"three") is True
            assert await kv.cas(p + b"rt", b"one", b"four") is False
            assert await kv.cas(p + b"rt-new", None, b"x") is True
            assert await kv.delete(p + b"rt") is True
            assert await kv.delete(p + b"rt") is False
            assert await kv.submit(commands.encode_put(p + b"rt-raw", b"r")) == b""
            assert await kv.query(commands.encode_get(p + b"rt-raw")) == b"\x01r"
            with pytest.raises(CommandError) as info:
                await kv.submit(b"Z nonsense")
            assert info.value.maybe_applied and "unknown command" in str(info.value)
            with pytest.raises(RequestError):
                await kv.query(b"?")
            await kv.put(p + b"rt-big", b"b" * (2 << 20))   # bigger than one batch
            assert await kv.get(p + b"rt-big") == b"b" * (2 << 20)
            items = [(p + b"bk%d" % i, b"v%d" % i) for i in range(5000)]
            await kv.put_many(items)
            assert await kv.get_many([k for k, _ in items]) == [v for _, v in items]
            assert await kv.get_many([p + b"bk0"], stale=True) in ([b"v0"], [None])
            swapped = await kv.submit_many([commands.encode_cas(p + b"bk0", b"v0", b"w"),
                                            commands.encode_cas(p + b"bk0", b"v0", b"x")])
            assert [commands.decode_bool(r) for r in swapped] == [True, False]
            assert await kv.query_many([commands.encode_get(p + b"bk0")]) == [b"\x01w"]
            failures = await kv.submit_many([b"Z nonsense"], return_exceptions=True)
            assert isinstance(failures[0], CommandError)
            status = await kv.status()
            assert [s["address"] for s in status] == cluster.addresses
            assert all(s["reachable"] and s["leader"] == leader["address"] for s in status)
            snap = await kv.snapshot()
            assert all(s["reachable"] and ("applied_index" in s or "error" in s)
                       for s in snap)
            info = await kv.backup(tmp_path / "copy.cpxbak")
            assert info.size_bytes > 0 and info.index >= 1
            assert os.path.getsize(tmp_path / "copy.cpxbak") == info.size_bytes
            stats = kv.statistics()
            assert stats["connected_to"] == leader["address"] and stats["commands"] > 5000
            assert stats["batches"] < 500
        with pytest.raises(ClosedError):
            await kv.put(p + b"rt", b"after")
    run(backend, body)


def test_many_concurrent_calls_are_pipelined(cluster, backend):
    async def body():
        p = backend[0].encode()
        async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S) as kv:
            await wait_leader(kv)
            before = kv.statistics()

            async def worker(w):
                for i in range(w, 3000, 200):
                    await kv.put(p + b"bt%d" % i, b"v%d" % i)
            async with anyio.create_task_group() as tg:
                for w in range(200):
                    tg.start_soon(worker, w)
            stats = kv.statistics()
            assert stats["commands"] - before["commands"] == 3000
            assert stats["submit_requests"] - before["submit_requests"] < 3000 // 5, stats
            values = {}

            async def check(i):
                values[i] = await kv.get(p + b"bt%d" % i)
            async with anyio.create_task_group() as tg:
                for i in range(3000):
                    tg.start_soon(check, i)
            assert all(values[i] == b"v%d" % i for i in range(3000))
            assert kv.statistics()["read_requests"] - stats["read_requests"] < 3000 // 5
    run(backend, body)


def test_redirect_from_follower_and_stale_reads(cluster, backend):
    async def body():
        p = backend[0].encode()
        async with open_client(cluster.cluster_arg) as probe:
            leader = await wait_leader(probe)
        follower = next(a for a in cluster.addresses if a != leader["address"])
        async with open_client([follower], timeout=CLIENT_TIMEOUT_S) as kv:
            await kv.put(p + b"rd", b"1")
            assert await kv.get(p + b"rd") == b"1"
            stats = kv.statistics()
            assert stats["redirects"] >= 1 and stats["connected_to"] == leader["address"]
        async with open_client([follower], timeout=CLIENT_TIMEOUT_S) as kv:
            with anyio.fail_after(CLIENT_TIMEOUT_S):
                while await kv.get(p + b"rd", stale=True) != b"1":
                    await anyio.sleep(0.02)
            assert kv.statistics()["connected_to"] == follower
    run(backend, body)


def test_a_cancelled_call_leaves_the_client_usable(cluster, backend):
    async def body():
        p = backend[0].encode()
        settings = SessionSettings(queue_commands_max=1)
        async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S,
                               settings=settings) as kv:
            await wait_leader(kv)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await kv.put(p + b"cc", b"never waited for")
            assert scope.cancelled_caught
            async with anyio.create_task_group() as tg:   # callers waiting for room
                for i in range(50):
                    tg.start_soon(kv.put, p + b"cc%d" % i, b"v")
            assert await kv.get_many([p + b"cc%d" % i for i in range(50)]) == [b"v"] * 50
            assert kv.statistics()["queued_commands"] == 0
    run(backend, body)


# ---------------------------------------------------------------------------
# Clusters of their own: failures


def test_leader_killed_under_load_exactly_once(new_cluster, backend):
    cluster = new_cluster(fsync=False)
    cluster.start_all()

    async def body():
        async with open_client(cluster.cluster_arg, timeout=10) as kv:
            leader = await wait_leader(kv)
            await kv.put(b"warm", b"up")   # connected to the leader
            outcome = {}

            async def cas(i):
                # A cas that is applied twice answers False the second time: a
                # resend after the crash must be answered from the session table.
                try:
                    outcome[i] = await kv.cas(b"lc%d" % i, None, b"v%d" % i)
                except TimeoutError as exc:
                    outcome[i] = exc
            # Freeze the leader first, so the calls are provably in flight (sent, not
            # answered) when it dies; in waves, so that several batches are.
            cluster.pause(leader["id"])
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(cas, i)
                    if i % 25 == 24:
                        await anyio.sleep(0.005)
                with anyio.fail_after(5):
                    while kv.statistics()["queued_commands"]:
                        await anyio.sleep(0.001)
                assert not outcome and kv.statistics()["outstanding_batches"] >= 2
                cluster.kill(leader["id"])
            assert len(outcome) == 200
            new_leader = await wait_leader(kv, dead=[leader["address"]])
            assert new_leader["address"] != leader["address"]
            assert kv.statistics()["connected_to"] == new_leader["address"]
            for i, result in outcome.items():
                if result is True:
                    assert await kv.get(b"lc%d" % i) == b"v%d" % i
                else:
                    assert isinstance(result, TimeoutError) and result.maybe_applied, result
            assert sum(r is True for r in outcome.values()) >= 150   # 10 s is plenty
    run(backend, body)


def test_timeouts_and_close(new_cluster, backend):
    cluster = new_cluster(fsync=False)
    cluster.start_all()

    async def body():
        outcome = []
        # No stall may end the connection to the frozen leader before the last put
        # is sent (no replica would take it then).
        settings = SessionSettings(stall_timeout_s=120)
        async with anyio.create_task_group() as tg:
            async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S,
                                   settings=settings) as kv:
                await wait_leader(kv)
                await kv.put(b"down", b"1")
                # Frozen replicas: a command is sent and never answered.
                for replica_id in cluster.ids:
                    cluster.pause(replica_id)
                with pytest.raises(TimeoutError) as info:
                    await kv.put(b"down", b"2", timeout=0.5)
                assert info.value.maybe_applied
                with pytest.raises(TimeoutError) as info:
                    await kv.get(b"down", timeout=0.3)
                assert not info.value.maybe_applied
                with pytest.raises(TimeoutError) as info:
                    await kv.put_many([(b"d1", b"1"), (b"d2", b"2")], timeout=0.3)

                async def put():
                    try:
                        await kv.put(b"down", b"3")
                    except ClosedError as exc:
                        outcome.append(exc)
                commands_before = kv.statistics()["commands"]
                tg.start_soon(put)
                with anyio.fail_after(10):   # until it is sent (queued, then taken)
                    while (kv.statistics()["commands"] == commands_before
                           or kv.statistics()["queued_commands"]):
                        await anyio.sleep(0.01)
            # Leaving the block closed the client: the waiting put failed.
        assert len(outcome) == 1 and outcome[0].maybe_applied
        with pytest.raises(ClosedError):
            await kv.get(b"down")
        # Dead replicas: nothing is reachable, nothing is sent.
        for replica_id in cluster.ids:
            cluster.kill(replica_id)
        async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S) as kv:
            with pytest.raises(UnavailableError, match="refused") as info:
                await kv.put(b"down", b"4")
            assert not info.value.maybe_applied
            status = await kv.status(timeout=1.0)
            assert [s["reachable"] for s in status] == [False] * 3
    run(backend, body)


# ---------------------------------------------------------------------------
# TLS and tokens


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A started 3-replica cluster under mutual TLS whose replicas also take clients
    with the CA and a token of theirs (fsync off), with a leader; and the token."""
    from conftest import ClusterFactory

    root = tmp_path_factory.mktemp("tls-aio")
    token = generate_key()
    tokens = root / "tokens"
    tokens.write_bytes(token + b"\n")
    os.chmod(tokens, 0o600)
    factory = ClusterFactory(root)
    cluster = factory(fsync=False, tls=True, extra_args=("--token-file", str(tokens)))
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=READY_TIMEOUT_S)
        yield cluster, token
    finally:
        factory.close()


def test_tls_and_tokens(tls_cluster, foreign_certs, backend):
    cluster, token = tls_cluster

    async def body():
        p = backend[0].encode()
        tls = cluster.client_tls
        ca_only = cypaxos.TLS(ca=tls.ca)
        async with open_client(cluster.addresses, timeout=CLIENT_TIMEOUT_S, tls=ca_only,
                               token=token) as kv:
            assert type(kv) is expected_type(backend)
            await kv.put(p + b"tls", b"over TLS")
            assert await kv.get(p + b"tls") == b"over TLS"
            assert [s["reachable"] for s in await kv.status()] == [True] * 3
        async with open_client(cluster.addresses, timeout=CLIENT_TIMEOUT_S,
                               tls=ca_only, token=generate_key()) as kv:
            with pytest.raises(UnavailableError, match="authentication failed: client "
                                                       "token not accepted"):
                await kv.get(p + b"tls")
        foreign = cypaxos.TLS(ca=foreign_certs / "ca.pem", cert=foreign_certs / "client.pem",
                              key=foreign_certs / "client.key")
        async with open_client(cluster.addresses, timeout=CLIENT_TIMEOUT_S,
                               tls=foreign) as kv:
            with pytest.raises(UnavailableError, match="TLS: the replica's certificate is "
                                                       "not signed by the CA given"):
                await kv.get(p + b"tls")
        async with open_client(cluster.addresses, timeout=2.0) as kv:   # no TLS
            with pytest.raises(UnavailableError, match="before its welcome"):
                await kv.get(p + b"tls")
    run(backend, body)


def test_tls_client_certificate(new_cluster, backend):
    cluster = new_cluster(fsync=False, tls=True)
    cluster.start_all()
    cluster.wait_ready(timeout=READY_TIMEOUT_S)

    async def body():
        async with open_client(cluster.addresses, timeout=CLIENT_TIMEOUT_S,
                               tls=cluster.client_tls) as kv:
            await kv.put(b"tls-cert", b"mutual")
            assert await kv.get(b"tls-cert", stale=True) in (b"mutual", None)
            assert await kv.get(b"tls-cert") == b"mutual"
        ca_only = cypaxos.TLS(ca=cluster.client_tls.ca)
        async with open_client(cluster.addresses, timeout=CLIENT_TIMEOUT_S,
                               tls=ca_only) as kv:
            with pytest.raises(UnavailableError, match="authentication failed: the "
                                                       "replica requires a client "
                                                       "certificate"):
                await kv.put(b"k", b"v")
    run(backend, body)


# ---------------------------------------------------------------------------
# Against fake replicas (tests/test_client.py's, served by a Trio loop of their own
# in a thread, so that the client's loop may be either): batching, resends,
# refusals, deadlines, closing


class FakeHost(TrioThread):
    """Fake replicas (`test_client.FakeReplica`) and other servers, served by a Trio
    loop in a background thread; `start(**kwargs)` returns a started fake."""

    def start(self, **kwargs) -> FakeReplica:
        """A fake replica (FakeReplica's arguments), listening."""
        return self.run(functools.partial(start_fake, self.nursery, **kwargs))

    def answering_like(self, answer: bytes) -> str:
        """A TCP server that answers whatever it is sent with `answer`, then closes."""
        async def handler(stream):
            await stream.receive_some(1024)
            await stream.send_all(answer)
            await stream.aclose()

        async def start():
            listeners = await self.nursery.start(trio.serve_tcp, handler, 0)
            return "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        return self.run(start)


@pytest.fixture
def fakes():
    host = FakeHost()
    yield host
    host.close()


def test_a_server_that_is_not_a_replica_is_named_so(fakes, backend):
    http = fakes.answering_like(b"HTTP/1.1 400 Bad Request\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    tls = fakes.answering_like(bytes.fromhex("15030300020246"))  # a TLS alert

    async def body():
        async with open_client([http], timeout=60) as kv:
            with anyio.fail_after(30):   # every address definitively failed: at once
                with pytest.raises(UnavailableError) as info:
                    await kv.put(b"k", b"v")
            assert str(info.value) == ("no replica reachable: %s: not a cypaxos replica "
                                       "(it answered 'HTTP/1.1 400 Bad Request')" % http)
            assert not info.value.maybe_applied
        async with open_client([tls, http], timeout=60) as kv:
            status = await kv.status()
        assert status[0]["error"] == "not a cypaxos replica without TLS (it answered in TLS)"
        assert status[1]["error"].startswith("not a cypaxos replica (it answered 'HTTP/1.1")
        assert not status[0]["reachable"] and not status[1]["reachable"]
    run(backend, body)


def test_batches_carry_consecutive_seqs_and_acked(fakes, backend):
    fake = fakes.start()

    async def body():
        async with open_client(fake.address) as kv:
            async def put(i):
                await kv.put(b"k%d" % i, b"v%d" % i)
            for _ in range(3):
                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        tg.start_soon(put, i)
            assert await kv.get(b"k299") == b"v299"
            stats = kv.statistics()
        batches = fake.submits()
        assert stats["commands"] == 900
        assert stats["registrations"] == len(fake.registrations()) == 1
        assert stats["submit_requests"] == len(batches) + 1 < 900 // 10   # batched
        assert {b.session_id for b in batches} == {kv.session_id}
        seq = 1
        for b in batches:
            assert b.first_seq == seq and b.acked_seq < b.first_seq
            seq += len(b.commands)
        assert seq == 901
        assert batches[-1].acked_seq >= 600
    run(backend, body)


def test_retry_busy_and_dropped_connections_resend_the_same_bytes(fakes, backend):
    retried, busy, dropped = fakes.start(), fakes.start(), fakes.start()
    answered = []

    def retry_once(fake, request_id, batch):
        if not answered:
            answered.append(batch)
            return wire.ok(request_id, kv_results(1, commands.RESULT_RETRY))
        return DEFAULT
    retried.submit_hook = retry_once
    busy_left = [3]

    def busy_thrice(fake, request_id, batch):
        if busy_left[0]:
            busy_left[0] -= 1
            return wire.error(request_id, "busy", "queue full")
        return DEFAULT
    busy.submit_hook = busy_thrice
    drops = []

    def drop_third(fake, request_id, batch):
        # Drop the connection on the third submit, once: the first three are unanswered.
        if len(fake.submits()) == 3 and not drops:
            drops.append(1)
            return DROP
        return SILENT if not drops else DEFAULT
    dropped.submit_hook = drop_third

    async def body():
        async with open_client(retried.address) as kv:
            await kv.put(b"a", b"1")
            assert kv.statistics()["retry_results"] == 1
        sent = [r[2] for r in retried.requests
                if r[0] == "submit" and not is_registration(r[2])]
        assert sent == [answered[0], answered[0]]
        async with open_client(busy.address) as kv:
            start = time.monotonic()
            await kv.put(b"k", b"v")
            assert time.monotonic() - start >= 0.02 + 0.04   # backed off
            assert kv.statistics()["busy_replies"] == 3
        async with open_client(dropped.address) as kv:
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(kv.put, b"k%d" % i, b"v")
                    with anyio.fail_after(5):   # three separate batches
                        while len(dropped.submits()) < i + 1:
                            await anyio.sleep(0.005)
            stats = kv.statistics()
        sent = [r[2] for r in dropped.requests
                if r[0] == "submit" and not is_registration(r[2])]
        assert len(sent) == 6 and sent[3:] == sent[:3]   # byte for byte, seq order
        assert dropped.connections == 2 and stats["resent_batches"] == 3
    run(backend, body)


def test_duplicate_resend_applied_once(fakes, backend):
    fake = fakes.start()
    first = []

    def hook(fake, request_id, batch):
        if not first:
            first.append(fake.apply(batch))   # applied, then the answer is "lost"
            return DROP
        return DEFAULT
    fake.submit_hook = hook

    async def body():
        async with open_client(fake.address) as kv:
            assert await kv.cas(b"c", None, b"1") is True   # not False: applied once
            assert await kv.get(b"c") == b"1"
    run(backend, body)


def test_refused_command_and_expired_session(fakes, backend):
    fake = fakes.start()
    bad = b"Pbad"
    fake.submit_hook = refuse_batches_with(bad)
    expiring = fakes.start(max_sessions=1)

    async def body():
        async with open_client(fake.address) as kv:
            await kv.put(b"z", b"0")
            old_session = kv.session_id
            results = {}

            async def call(name, command):
                try:
                    results[name] = await kv.submit(command)
                except ClientError as exc:
                    results[name] = exc
            async with anyio.create_task_group() as tg:   # one batch: one round
                tg.start_soon(call, "a", commands.encode_put(b"a", b"1"))
                tg.start_soon(call, "bad", bad)
                tg.start_soon(call, "b", commands.encode_put(b"b", b"2"))
            assert results["a"] == b"" and results["b"] == b""
            assert isinstance(results["bad"], RequestError)
            assert not results["bad"].maybe_applied
            assert kv.session_id != old_session
            assert kv.statistics()["session_restarts"] == 1
            await kv.put(b"c", b"3")
            assert [await kv.get(k) for k in (b"a", b"b", b"c")] == [b"1", b"2", b"3"]
        new = [b for b in fake.submits() if b.session_id != old_session]
        assert new[0].first_seq == 1
        async with open_client(expiring.address) as kv:
            await kv.put(b"a", b"1")
            first_session = kv.session_id
            expiring.register()   # another client's registration evicts ours
            with pytest.raises(SessionExpiredError) as info:
                await kv.put(b"b", b"2")
            assert info.value.maybe_applied
            await kv.put(b"c", b"3")  # in a new session
            assert kv.session_id not in (None, first_session)
            assert [await kv.get(k) for k in (b"a", b"b", b"c")] == [b"1", None, b"3"]
    run(backend, body)


def test_reads_batched_and_oversized_replies(fakes, backend):
    fake = fakes.start()
    huge = []

    def hook(fake, request_id, queries, stale):
        # The first read of the second part is answered with a frame over what a
        # client accepts.
        if huge == [0]:
            huge[0] = sum(r[0] == "read" for r in fake.requests)   # this one's number
            return wire.ok(request_id, [b"\x01" + b"x" * (70 << 20)] * len(queries))
        return DEFAULT
    fake.read_hook = hook

    async def body():
        async with open_client(fake.address, timeout=20) as kv:
            await kv.put(b"k", b"v")
            results = {}

            async def get(i):
                results[i] = await kv.get(b"k")
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(get, i)
            assert set(results.values()) == {b"v"} and len(results) == 100
            assert kv.statistics()["read_requests"] < 10   # batched

            async def bad():
                with pytest.raises(RequestError, match="unknown query"):
                    await kv.query(b"?")
            results.clear()
            async with anyio.create_task_group() as tg:   # one bad query among good ones
                for i in range(32):
                    tg.start_soon(get, i)
                tg.start_soon(bad)
            assert set(results.values()) == {b"v"} and len(results) == 32
            assert await kv.get(b"k", stale=True) == b"v"
            huge.append(0)
            results.clear()
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(get, i)
            assert list(results.values()) == [b"v"] * 8
            # Dropped the connection, then asked one query per request.
            assert kv.statistics()["connections"] == 2
        after = [r for r in fake.requests if r[0] == "read"][huge[0]:]
        assert after and [len(r[2]) for r in after] == [1] * len(after)
    run(backend, body)


def test_redirects_and_no_leader(fakes, backend):
    leader = fakes.start(replica_id=2)
    follower = fakes.start(replica_id=1, cluster=leader)
    follower.submit_hook = lambda f, rid, batch: wire.redirect(rid, leader.address)
    lost = [fakes.start(replica_id=1)]
    lost.append(fakes.start(replica_id=2, cluster=lost[0]))
    for fake in lost:
        fake.submit_hook = lambda f, rid, batch: wire.redirect(rid, None)
        fake.hook_registrations = True
    other = fakes.start(replica_id=2, cluster_id="other")
    ours = fakes.start(replica_id=1, cluster_id="ours")
    ours.submit_hook = lambda f, rid, batch: wire.redirect(rid, other.address)

    async def body():
        async with open_client([follower.address]) as kv:
            await kv.put(b"k", b"v")
            stats = kv.statistics()
            assert stats["redirects"] == 1 and stats["connected_to"] == leader.address
            assert leader.address in kv.addresses   # learned
        assert len(leader.submits()) == 1
        async with open_client([f.address for f in lost], timeout=0.5) as kv:
            with pytest.raises(UnavailableError, match="^no leader within") as info:
                await kv.put(b"k", b"v")
        assert not info.value.maybe_applied
        async with open_client([ours.address], timeout=0.5) as kv:
            with pytest.raises(TimeoutError, match="cluster 'other'"):
                await kv.put(b"k", b"v")
        assert not other.requests
    run(backend, body)


def test_timeouts_cancels_and_stalls(fakes, backend):
    fake = fakes.start()
    fake.submit_hook = lambda f, rid, batch: SILENT
    fake.read_hook = lambda f, rid, queries, stale: SILENT
    silent = fakes.start(welcome=False)   # accepts, never welcomes
    stuck = fakes.start(replica_id=1)
    stuck.submit_hook = lambda f, rid, batch: SILENT
    good = fakes.start(replica_id=2, cluster=stuck)
    leaving = fakes.start(replica_id=1, cluster=stuck)
    leaving.submit_hook = lambda f, rid, batch: wire.error(rid, "shutting_down", "bye")

    async def body():
        async with open_client(fake.address, timeout=0.3) as kv:
            with pytest.raises(TimeoutError) as info:
                await kv.put(b"k", b"v")
            assert info.value.maybe_applied
            with pytest.raises(TimeoutError) as info:
                await kv.get(b"k", timeout=0.1)
            assert not info.value.maybe_applied
            with anyio.fail_after(5):
                with pytest.raises(TimeoutError) as info:
                    await kv.put_many([(b"k%d" % i, b"v") for i in range(100)])
            assert info.value.maybe_applied
            out = await kv.query_many([commands.encode_get(b"k")] * 3, timeout=0.1,
                                      return_exceptions=True)
            assert all(isinstance(e, TimeoutError) and not e.maybe_applied for e in out)
            with anyio.move_on_after(0.1) as scope:
                await kv.put_many([(b"c%d" % i, b"v") for i in range(100)], timeout=5)
            assert scope.cancelled_caught
            with anyio.move_on_after(0.1) as scope:
                await kv.put(b"cancelled", b"v", timeout=5)
            assert scope.cancelled_caught
            assert kv.statistics()["queued_commands"] == 0
            fake.submit_hook = None
            fake.read_hook = None
            # The earlier batches go again first: same session.
            await kv.put_many([(b"after", b"1")], timeout=5)
            assert await kv.get_many([b"after", b"k0", b"cancelled"], timeout=5) == \
                [b"1", b"v", b"v"]
        async with open_client(silent.address, timeout=0.3) as kv:
            with pytest.raises(UnavailableError) as info:
                await kv.put(b"k", b"v")
            assert not info.value.maybe_applied
        async with open_client([stuck.address, good.address], timeout=5,
                               settings=SessionSettings(stall_timeout_s=0.2)) as kv:
            for i in range(3):
                await kv.put(b"k%d" % i, b"v")
            assert kv.statistics()["connected_to"] == good.address
            assert kv.statistics()["stalls"] <= 1
        async with open_client([leaving.address, good.address], timeout=5) as kv:
            for i in range(3):
                await kv.put(b"s%d" % i, b"v")
            assert kv.statistics()["connected_to"] == good.address
    run(backend, body)


def test_queued_calls_that_time_out_are_never_sent_and_close_fails_the_rest(fakes, backend):
    fake = fakes.start()

    async def body():
        outcome = []
        # No stall may end the connection while the window fills (on a busy machine
        # that can take a while): every batch stays outstanding on the one connection.
        settings = SessionSettings(stall_timeout_s=120)
        async with anyio.create_task_group() as tg:
            async with open_client(fake.address, timeout=60, settings=settings) as kv:
                # Registered first: a put queued while the registration is in flight
                # would share the next batch with the one after it.
                await kv.put(b"warm", b"up")
                fake.submit_hook = lambda f, rid, batch: SILENT

                async def put(i):
                    try:
                        await kv.put(b"k%d" % i, b"v")
                    except ClosedError as exc:
                        outcome.append(exc)
                # Fill the window of in-flight batches, one put per batch.
                for i in range(64):
                    tg.start_soon(put, i)
                    with anyio.fail_after(20):
                        while kv.statistics()["outstanding_batches"] < i + 1:
                            await anyio.sleep(0.001)
                with pytest.raises(TimeoutError) as info:
                    await kv.put(b"k999", b"v", timeout=0.1)
                assert not info.value.maybe_applied
                assert kv.statistics()["queued_commands"] == 0   # removed from the queue
            # Leaving the block closed the client: the 64 waiting puts fail.
        with pytest.raises(ClosedError):
            await kv.put(b"k", b"v")
        assert len(outcome) == 64 and all(exc.maybe_applied for exc in outcome)
        assert len(fake.submits()) == 1 + 64
        assert all(b"k999" not in r[2] for r in fake.requests)
    run(backend, body)


def test_status_snapshot_and_bulk_calls(fakes, backend):
    fake = fakes.start(replica_id=4)
    refusing = fakes.start()
    bad = b"Pbad"
    refusing.submit_hook = refuse_batches_with(bad)

    async def body():
        async with open_client([fake.address, "127.0.0.1:9"]) as kv:
            status = await kv.status()
            snap = await kv.snapshot()
        assert status[0]["reachable"] and status[0]["id"] == 4
        assert status[0]["role"] == "leader" and status[0]["address"] == fake.address
        assert status[1] == {"address": "127.0.0.1:9", "reachable": False,
                             "error": "connection refused"}
        assert snap[0]["reachable"] and "bad_request" in snap[0]["error"]
        assert not snap[1]["reachable"]
        settings = SessionSettings(queue_commands_max=100)
        async with open_client(fake.address, settings=settings) as kv:
            await kv.put_many([(b"q%d" % i, b"%d" % i) for i in range(1000)])
            assert await kv.get_many([b"q%d" % i for i in range(1000)]) == \
                [b"%d" % i for i in range(1000)]
        # Nothing queued beyond the bound at any time: a batch never exceeds it.
        assert max(len(b.commands) for b in fake.submits()) <= 100
        assert len(fake.submits()) < 100
        async with open_client(refusing.address) as kv:
            good = commands.encode_put(b"a", b"1")
            out = await kv.submit_many([good, bad, good], return_exceptions=True)
            assert out[0] == b"" and out[2] == b"" and isinstance(out[1], RequestError)
            with pytest.raises(RequestError):
                await kv.submit_many([good, bad])
            with pytest.raises(TypeError):
                await kv.put_many([(b"k", 5)])
            assert await kv.get(b"a") == b"1"
    run(backend, body)


def test_raised_errors_leave_nothing_uncollectable(fakes, backend):
    # Ops are not tracked by the cyclic GC: an op keeping the exception its caller
    # raised would leak a frame per failed call.
    fake = fakes.start()
    bad = b"Pbad"
    fake.submit_hook = refuse_batches_with(bad)

    def frames_alive():
        gc.collect()
        return sum(type(o) is types.TracebackType for o in gc.get_objects())

    async def body():
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
    run(backend, body)


def test_a_replica_naming_an_unreachable_leader_means_no_leader(fakes, backend):
    # A quorum lost: the replica left up still names the leader it last heard of,
    # which refuses connections.  That is "no leader", not "connection refused".
    dead = "127.0.0.1:%d" % free_ports(1)[0]
    follower = fakes.start(replica_id=1)
    follower.submit_hook = lambda f, rid, batch: wire.redirect(rid, dead)
    follower.read_hook = lambda f, rid, queries, stale: wire.redirect(rid, dead)
    follower.hook_registrations = True

    async def body():
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
    run(backend, body)


def test_a_call_queued_while_no_replica_is_up_goes_once_one_is(fakes, backend):
    port = free_ports(1)[0]
    # A second address that accepts and never answers: dials there time out, which
    # is no proof that the cluster is down, so the call waits instead of failing fast.
    silent = fakes.start(welcome=False)

    async def body():
        async with open_client(["127.0.0.1:%d" % port, silent.address], timeout=10,
                               settings=SessionSettings(connect_timeout_s=0.1)) as kv:
            done = anyio.Event()

            async def put():
                await kv.put(b"k", b"v")
                done.set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                with anyio.fail_after(5):
                    while not (kv.statistics()["queued_commands"]
                               and kv.statistics()["connect_failures"]):
                        await anyio.sleep(0.005)
                # (From a worker thread: the fakes' loop is not this one.)
                fake = await anyio.to_thread.run_sync(functools.partial(fakes.start,
                                                                        port=port))
                with anyio.fail_after(5):
                    await done.wait()
        assert len(fake.submits()) == 1
    run(backend, body)


def test_a_bug_in_the_asyncio_client_fails_its_calls_and_leaves_the_block(fakes):
    # The asyncio sender and reader are loop callbacks, whose exceptions the loop would
    # only log: the calls would wait for their deadline, and nobody would hear why.
    fake = fakes.start()

    async def body():
        with pytest.raises(RuntimeError, match="a bug"):
            async with open_client(fake.address, timeout=60) as kv:
                await kv.put(b"k", b"v")

                def broken(now):
                    raise RuntimeError("a bug")
                kv._session.requests_to_send = broken
                with pytest.raises(ClosedError):
                    await asyncio.wait_for(kv.put(b"k", b"w"), 30)
    asyncio.run(body())


def test_evicted_sessions_and_quorum_loss(new_cluster, backend):
    """With `serve --max-sessions 1`, a second client's registration evicts the first
    client's session: its next write fails SessionExpiredError instead of being
    applied in a recreated session.  Then, with a quorum lost, calls say so."""
    cluster = new_cluster(fsync=False, extra_args=("--max-sessions", "1"))
    cluster.start_all()

    async def body():
        async with open_client(cluster.cluster_arg, timeout=10) as first, \
                open_client(cluster.cluster_arg, timeout=10) as second:
            leader = await wait_leader(first)
            assert await first.cas(b"once", None, b"first") is True
            await second.put(b"other", b"x")           # registers: evicts `first`'s
            with pytest.raises(SessionExpiredError) as info:
                await first.put(b"late", b"1")
            assert info.value.maybe_applied
            assert await first.get(b"late") is None      # not applied
            await first.put(b"later", b"2")              # a new session
            assert first.statistics()["registrations"] == 2
            assert await second.get(b"later") == b"2"
            # The leader and one follower die; the last replica is up, alone.
            other = next(i for i in cluster.ids if i != leader["id"])
            cluster.kill(leader["id"])
            cluster.kill(other)
            with pytest.raises(UnavailableError) as info:
                await first.put(b"quorum", b"2", timeout=3)
            assert str(info.value).startswith("no leader within 3 s: no quorum"), info.value
            assert info.value.maybe_applied   # sent (redirected, or lost with the leader)
            with pytest.raises(UnavailableError) as info:
                await first.get(b"quorum", timeout=2)
            assert str(info.value).startswith("no leader within 2 s: no quorum"), info.value
            assert not info.value.maybe_applied
    run(backend, body)
