"""The asyncio client's dial (cypaxos.client.aioconnection) under TLS and with tokens
comes to what the Trio client's dial comes to, against the same servers.

The in-process acceptors of tests/test_client_tls.py (real loopback TCP, TLS 1.3, the
`Acceptor` handshake machine) run on a Trio loop in a thread; each case dials the same
server with the Trio `connection.dial` and with the asyncio `aioconnection.dial`, and
the two must agree: connected to the same replica, or the same `DialError` (reason,
definitive, reachable).  tests/test_client_tls.py checks what the Trio outcomes are.
"""
from __future__ import annotations

import asyncio
import ssl
from functools import partial

import pytest
import trio

import cypaxos
from cypaxos.client import aioconnection, connection
from cypaxos.client.connection import PLAIN, credentials
from cypaxos.client.dialing import DialError
from cypaxos.errors import UnavailableError

from test_client_tls import CLUSTER, OTHER_TOKEN, TOKEN, FakeReplica, files
from triothread import TrioThread

pytestmark = pytest.mark.fast

TIMEOUT_S = 20


@pytest.fixture
def servers():
    """`serve(replica, host="127.0.0.1")` -> the address of a listener for `replica`."""
    thread = TrioThread()

    def serve(replica: FakeReplica, host: str = "127.0.0.1") -> str:
        async def start():
            listeners = await thread.nursery.start(partial(trio.serve_tcp, replica.handle,
                                                           0, host=host))
            return f"{host}:{listeners[0].socket.getsockname()[1]}"
        return thread.run(start)
    yield serve
    thread.close()


def outcome(result):
    if isinstance(result, DialError):
        return ("refused", result.reason, result.definitive, result.reachable)
    return ("connected", result.cluster_id, result.replica_id)


def dial_both(address: str, creds=PLAIN):
    """The outcomes of the Trio dial and of the asyncio dial of `address`."""
    async def with_trio():
        with trio.fail_after(TIMEOUT_S):
            try:
                conn = await connection.dial(address, timeout_s=TIMEOUT_S, credentials=creds)
            except DialError as exc:
                return outcome(exc)
        await conn.aclose()
        return outcome(conn)

    async def with_asyncio():
        try:
            conn = await aioconnection.dial(address, timeout_s=TIMEOUT_S, credentials=creds)
        except DialError as exc:
            return outcome(exc)
        conn.close()
        return outcome(conn)
    return trio.run(with_trio), asyncio.run(with_asyncio())


def test_connects_alike(servers, cluster_certs):
    address = servers(FakeReplica(2, server_tls=files(cluster_certs, "replica-2")))
    trio_way, asyncio_way = dial_both(address, credentials(tls=files(cluster_certs, "client")))
    assert trio_way == asyncio_way == ("connected", CLUSTER, 2)
    context = ssl.create_default_context(cafile=str(cluster_certs / "ca.pem"))
    context.load_cert_chain(cluster_certs / "client.pem", cluster_certs / "client.key")
    trio_way, asyncio_way = dial_both(address, credentials(tls=context))
    assert trio_way == asyncio_way == ("connected", CLUSTER, 2)
    plain = servers(FakeReplica(3, client_tokens=(TOKEN,)))
    assert dial_both(plain, credentials(token=TOKEN)) == (("connected", CLUSTER, 3),) * 2


@pytest.mark.parametrize("case", [
    "token refused", "no token, no certificate", "plain token refused",
    "plain without token", "no client certificate", "client certificate of another CA",
    "replica of another CA", "host name mismatch", "TLS client, plain replica",
    "plain client, TLS replica",
])
def test_fails_alike(servers, cluster_certs, foreign_certs, case):
    client = credentials(tls=files(cluster_certs, "client"))
    ca_only = cypaxos.TLS(ca=cluster_certs / "ca.pem")
    with_tls = partial(FakeReplica, 1, server_tls=files(cluster_certs, "replica-1"))
    token_tls = partial(FakeReplica, 1, server_tls=files(cluster_certs, "replica-1"),
                        client_certificate_required=False, client_tokens=(TOKEN,))
    address, creds = {
        "token refused": lambda: (servers(token_tls()),
                                  credentials(tls=ca_only, token=OTHER_TOKEN)),
        "no token, no certificate": lambda: (servers(token_tls()), credentials(tls=ca_only)),
        "plain token refused": lambda: (servers(FakeReplica(3, client_tokens=(TOKEN,))),
                                        credentials(token=OTHER_TOKEN)),
        "plain without token": lambda: (servers(FakeReplica(3, client_tokens=(TOKEN,))),
                                        PLAIN),
        "no client certificate": lambda: (servers(with_tls()), credentials(tls=ca_only)),
        "client certificate of another CA": lambda: (
            servers(with_tls()),
            credentials(tls=cypaxos.TLS(ca=cluster_certs / "ca.pem",
                                        cert=foreign_certs / "client.pem",
                                        key=foreign_certs / "client.key"))),
        "replica of another CA": lambda: (
            servers(FakeReplica(1, server_tls=files(foreign_certs, "replica-1"))), client),
        "host name mismatch": lambda: (servers(with_tls(), host="127.0.0.2"), client),
        "TLS client, plain replica": lambda: (
            servers(FakeReplica(1, allow_anonymous_clients=True)), client),
        "plain client, TLS replica": lambda: (servers(with_tls()), PLAIN),
    }[case]()
    trio_way, asyncio_way = dial_both(address, creds)
    assert trio_way[0] == "refused", trio_way
    assert asyncio_way == trio_way, case


def test_open_client_fails_fast_with_the_reason(servers, cluster_certs):
    address = servers(FakeReplica(1, server_tls=files(cluster_certs, "replica-1")))

    async def body():
        async with cypaxos.open_client(address, timeout=TIMEOUT_S,
                                       tls=cypaxos.TLS(ca=cluster_certs / "ca.pem")) as kv:
            assert type(kv).__name__ == "AsyncioClient"
            with pytest.raises(UnavailableError, match="authentication failed: the replica "
                                                       "requires a client certificate"):
                await asyncio.wait_for(kv.put(b"k", b"v"), TIMEOUT_S)
    asyncio.run(body())


def test_a_tls_connection_that_breaks_later_says_so(servers, cluster_certs):
    address = servers(FakeReplica(1, server_tls=files(cluster_certs, "replica-1"),
                                  hang_up=True))

    async def body():
        conn = await aioconnection.dial(address, timeout_s=TIMEOUT_S,
                                        credentials=credentials(tls=files(cluster_certs,
                                                                          "client")))
        lost = asyncio.get_running_loop().create_future()
        conn.attach(lambda: None, lost.set_result)
        return await asyncio.wait_for(lost, TIMEOUT_S)
    assert asyncio.run(body()) == "connection closed by the replica"
