"""The client's dial under TLS and with tokens (cypaxos.client.connection), against an
in-process acceptor that does what a replica does: real loopback TCP, `trio.SSLStream`
on both sides (TLS 1.3), the `Acceptor` handshake machine on the server's side.

Every failure is checked for the one `DialError` it must become: its reason, and
whether it is definitive (the session then fails calls fast) and reachable.
"""
from __future__ import annotations

import math
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio

import cypaxos
from cypaxos.security.tlsstream import TlsStream
from cypaxos.client.connection import PLAIN, credentials, describe, dial
from cypaxos.client.dialing import DialError
from cypaxos.errors import ConfigError, UnavailableError
from cypaxos.security import tls
from cypaxos.security.handshake import Acceptor, Authenticated, ReplicaAuth

pytestmark = pytest.mark.fast

CLUSTER = "c-client-tls"
TOKEN = b"tok-5d1e4c3b2a19f8e7d6c5b4a39281706f5e4d"
OTHER_TOKEN = b"tok-a1b2c3d4e5f60718293a4b5c6d7e8f9012"
TIMEOUT_S = 20


def files(directory: Path, name: str) -> cypaxos.TLS:
    return cypaxos.TLS(ca=directory / "ca.pem", cert=directory / f"{name}.pem",
                       key=directory / f"{name}.key")


class FakeReplica:
    """Replica `replica_id`'s accepting side: TLS (if `server_tls`), then the Acceptor.

    `outcomes` collects each connection's handshake outcome (or the TLS error).
    """

    def __init__(self, replica_id=1, *, server_tls=None, client_certificate_required=True,
                 hang_up=False, **auth) -> None:
        self.replica_id = replica_id
        self.hang_up = hang_up   # close abruptly right after the welcome
        self.context = (tls.server_context(server_tls,
                                           client_certificate_required=client_certificate_required)
                        if server_tls is not None else None)
        self.auth = ReplicaAuth(cluster_id=CLUSTER, replica_id=replica_id,
                                tls=server_tls is not None, **auth)
        self.outcomes = []

    async def handle(self, stream) -> None:
        try:
            certificate = None
            if self.context is not None:
                stream = trio.SSLStream(stream, self.context, server_side=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    self.outcomes.append(exc.__cause__)
                    return
                certificate = tls.peer_identity(stream)
            acceptor = Acceptor(self.auth, {1, 2, 3}, peer_certificate=certificate)
            while acceptor.outcome is None:
                data = await stream.receive_some(65536)
                out = acceptor.receive_data(data)
                if acceptor.outcome is not None:
                    # Before the welcome goes out: the client may look at once.
                    self.outcomes.append(acceptor.outcome)
                if out:
                    await stream.send_all(out)
                if not data:
                    break
            if isinstance(acceptor.outcome, Authenticated) and not self.hang_up:
                # Hold the connection until the client closes it, as a replica would.
                while await stream.receive_some(65536):
                    pass
        except trio.BrokenResourceError as exc:
            if acceptor_done(self.outcomes):
                return
            self.outcomes.append(exc.__cause__ or exc)
        finally:
            await trio.aclose_forcefully(stream)


def acceptor_done(outcomes) -> bool:
    return bool(outcomes) and isinstance(outcomes[-1], Authenticated)


async def serve(nursery, replica: FakeReplica) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, replica.handle, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def try_dial(address, creds=PLAIN):
    with trio.fail_after(TIMEOUT_S):
        try:
            conn = await dial(address, timeout_s=TIMEOUT_S, credentials=creds)
        except DialError as exc:
            return exc
    await conn.aclose()
    return conn


# ---------------------------------------------------------------- it connects

async def test_client_certificate(nursery, cluster_certs):
    replica = FakeReplica(2, server_tls=files(cluster_certs, "replica-2"))
    address = await serve(nursery, replica)
    conn = await try_dial(address, credentials(tls=files(cluster_certs, "client")))
    assert not isinstance(conn, DialError), conn.reason
    assert (conn.cluster_id, conn.replica_id) == (CLUSTER, 2)
    assert isinstance(conn.stream, TlsStream) and conn.stream.version() == "TLSv1.3"
    assert replica.outcomes[0].method.value == "certificate"


async def test_token_under_tls_without_certificate(nursery, cluster_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"),
                          client_certificate_required=False, client_tokens=(TOKEN,))
    address = await serve(nursery, replica)
    ca_only = cypaxos.TLS(ca=cluster_certs / "ca.pem")
    conn = await try_dial(address, credentials(tls=ca_only, token=TOKEN.decode()))
    assert not isinstance(conn, DialError), conn.reason
    assert replica.outcomes[-1].method.value == "token"
    refused = await try_dial(address, credentials(tls=ca_only, token=OTHER_TOKEN))
    assert isinstance(refused, DialError)
    assert refused.reason == "authentication failed: client token not accepted"
    assert refused.definitive and refused.reachable
    # No token, no certificate: refused by the handshake, saying what is needed.
    refused = await try_dial(address, credentials(tls=ca_only))
    assert refused.reason.startswith("authentication failed: this cluster requires")
    assert "client certificate" in refused.reason and refused.definitive


async def test_token_without_tls(nursery):
    replica = FakeReplica(3, client_tokens=(TOKEN,))
    address = await serve(nursery, replica)
    conn = await try_dial(address, credentials(token=TOKEN))
    assert not isinstance(conn, DialError), conn.reason
    assert conn.replica_id == 3 and isinstance(conn.stream, trio.SocketStream)
    refused = await try_dial(address, credentials(token=OTHER_TOKEN))
    assert refused.reason == "authentication failed: client token not accepted"
    refused = await try_dial(address)
    assert refused.reason == ("authentication failed: this cluster requires a client "
                              "token (--token-file)")


async def test_user_built_context(nursery, cluster_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"))
    address = await serve(nursery, replica)
    context = ssl.create_default_context(cafile=str(cluster_certs / "ca.pem"))
    context.load_cert_chain(cluster_certs / "client.pem", cluster_certs / "client.key")
    creds = credentials(tls=context)
    assert creds.ssl_context is context
    conn = await try_dial(address, creds)
    assert not isinstance(conn, DialError), conn.reason


async def test_a_tls_connection_that_breaks_later_ends_its_stream(nursery, cluster_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"), hang_up=True)
    address = await serve(nursery, replica)
    with trio.fail_after(TIMEOUT_S):
        conn = await dial(address, timeout_s=TIMEOUT_S,
                          credentials=credentials(tls=files(cluster_certs, "client")))
        # A hang-up without a close_notify is the end of the stream, as on plain TCP
        # (the framing catches a frame cut off by it), and the client says that.
        while await conn.stream.receive_some(65536):
            pass
        await conn.aclose()


# ---------------------------------------------------------------- it fails, clearly

async def test_no_client_certificate_is_authentication_failed(nursery, cluster_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"))
    address = await serve(nursery, replica)
    refused = await try_dial(address, credentials(tls=cypaxos.TLS(ca=cluster_certs / "ca.pem")))
    assert isinstance(refused, DialError)
    assert refused.reason.startswith("authentication failed: the replica requires a client "
                                     "certificate"), refused.reason
    assert refused.definitive and refused.reachable


async def test_client_certificate_of_another_ca(nursery, cluster_certs, foreign_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"))
    address = await serve(nursery, replica)
    foreign = cypaxos.TLS(ca=cluster_certs / "ca.pem", cert=foreign_certs / "client.pem",
                          key=foreign_certs / "client.key")
    refused = await try_dial(address, credentials(tls=foreign))
    assert refused.reason.startswith("authentication failed: the replica did not accept "
                                     "the client's certificate"), refused.reason
    assert refused.definitive


async def test_replica_of_another_ca(nursery, cluster_certs, foreign_certs):
    replica = FakeReplica(1, server_tls=files(foreign_certs, "replica-1"))
    address = await serve(nursery, replica)
    refused = await try_dial(address, credentials(tls=files(cluster_certs, "client")))
    assert refused.reason.startswith("TLS: the replica's certificate is not signed by the "
                                     "CA given"), refused.reason
    assert refused.definitive and refused.reachable


async def test_host_name_mismatch(nursery, cluster_certs):
    replica = FakeReplica(1, server_tls=files(cluster_certs, "replica-1"))
    address = await serve(nursery, replica)
    # 127.0.0.2 reaches the same listener on Linux, but the certificate does not name it.
    port = address.rsplit(":", 1)[1]
    with trio.fail_after(TIMEOUT_S):
        listeners = await nursery.start(partial(trio.serve_tcp, replica.handle, 0,
                                                host="127.0.0.2"))
    other = f"127.0.0.2:{listeners[0].socket.getsockname()[1]}"
    assert port
    refused = await try_dial(other, credentials(tls=files(cluster_certs, "client")))
    assert refused.reason == ("TLS: the replica's certificate does not name 127.0.0.2 "
                              "(dial a host name or address its certificate names)")
    assert refused.definitive


async def test_tls_client_to_a_replica_without_tls(nursery, cluster_certs):
    address = await serve(nursery, FakeReplica(1, allow_anonymous_clients=True))
    refused = await try_dial(address, credentials(tls=files(cluster_certs, "client")))
    assert isinstance(refused, DialError)
    assert "TLS" in refused.reason, refused.reason


async def test_plain_client_to_a_replica_with_tls(nursery, cluster_certs):
    address = await serve(nursery, FakeReplica(1, server_tls=files(cluster_certs, "replica-1")))
    refused = await try_dial(address)
    assert isinstance(refused, DialError)
    assert "TLS" in refused.reason, refused.reason


async def test_open_client_fails_fast_with_the_reason(nursery, cluster_certs):
    address = await serve(nursery, FakeReplica(1, server_tls=files(cluster_certs, "replica-1")))
    async with cypaxos.open_client(address, timeout=TIMEOUT_S,
                                   tls=cypaxos.TLS(ca=cluster_certs / "ca.pem")) as kv:
        with trio.fail_after(TIMEOUT_S):
            with pytest.raises(UnavailableError, match="authentication failed: the replica "
                                                       "requires a client certificate"):
                await kv.put(b"k", b"v")


# ---------------------------------------------------------------- bad settings

def test_bad_settings_are_config_errors(cluster_certs, tmp_path):
    with pytest.raises(ConfigError, match="client token: a key must be 32 to 256"):
        credentials(token="short")
    with pytest.raises(ConfigError, match="client token: a key is printable ASCII"):
        credentials(token="é" * 40)
    with pytest.raises(ConfigError, match="client token: a key is bytes"):
        credentials(token=12345)
    with pytest.raises(ConfigError, match="TLS CA file .*missing.pem: No such file"):
        credentials(tls=cypaxos.TLS(ca=tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="tls must be a cypaxos.TLS or an ssl.SSLContext"):
        credentials(tls=str(cluster_certs / "ca.pem"))
    with pytest.raises(ConfigError, match="PROTOCOL_TLS_CLIENT"):
        credentials(tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # At once, from the public entry points, before any thread or connection.
    with pytest.raises(ConfigError, match="client token"):
        cypaxos.connect("127.0.0.1:1", token=b"x")
    with pytest.raises(ConfigError, match="TLS CA file"):
        cypaxos.connect("127.0.0.1:1", tls=cypaxos.TLS(ca=tmp_path / "missing.pem"))
    assert credentials() is PLAIN and math.isfinite(TIMEOUT_S)
