"""The async client under asyncio as under Trio: the same tests, run under each.

Every test here is written with anyio (task groups, timeouts, sleeps) and runs once
per event loop (`backend`: "trio", then "asyncio") through `anyio.run`, against real
replica processes (`LocalCluster`), over TCP and TLS: `cypaxos.open_client` picks the
wiring of the loop it is called in (the Trio `Client` or the asyncio
`AsyncioClient`), and both must behave the same.  The Trio-only tests of the client's
protocol against fake replicas are tests/test_client.py's.
"""
from __future__ import annotations

import inspect
import os

import anyio
import pytest

import cypaxos
from cypaxos import commands
from cypaxos.client import Client, SessionSettings, open_client
from cypaxos.client.aio import AsyncioClient
from cypaxos.errors import (
    ClosedError, CommandError, RequestError, TimeoutError, UnavailableError,
)
from cypaxos.security.secrets import generate_key

from conftest import READY_TIMEOUT_S

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
        async with anyio.create_task_group() as tg:
            async with open_client(cluster.cluster_arg, timeout=CLIENT_TIMEOUT_S) as kv:
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
