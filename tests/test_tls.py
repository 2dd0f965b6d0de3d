"""TLS contexts (cypaxos.security.tls) in real TLS 1.3 handshakes, with the handshake
machines on top, using certificates written by `cypaxos certs` (conftest.py).

The handshakes run over real sockets (a socket pair, and loopback TCP for the whole
path) with `trio.SSLStream`; nothing about TLS is mocked.
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import ssl
from pathlib import Path

import pytest
import trio

from cypaxos.errors import ConfigError
from cypaxos.security import TLS, tls
from cypaxos.security.handshake import (
    CLIENT, Acceptor, Authenticated, Dialer, Method, Refused, ReplicaAuth,
)

pytestmark = pytest.mark.fast

CLUSTER = "c-tls"
MEMBERS = {1, 2, 3}
TIMEOUT_S = 20


def files(directory: Path, name: str) -> TLS:
    return TLS(ca=directory / "ca.pem", cert=directory / f"{name}.pem",
               key=directory / f"{name}.key")


async def tls_connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                      server_hostname: str = "localhost"):
    """Both sides' TLS handshakes over a real socket pair.

    Returns (server stream, client stream, {side: the ssl error it failed with}).
    """
    a, b = trio.socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname=server_hostname)
    errors = {}

    async def shake(side, stream):
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            errors[side] = exc.__cause__ or exc
            await trio.aclose_forcefully(stream)   # the other side sees the end

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shake, "server", server)
            nursery.start_soon(shake, "client", client)
    return server, client, errors


async def drive(stream, machine):
    """Run one handshake machine over `stream` to its outcome (what a shell will do)."""
    try:
        if isinstance(machine, Dialer):
            await stream.send_all(machine.start())
        while machine.outcome is None:
            data = await stream.receive_some(65536)
            reply = machine.receive_data(data)
            if reply:
                await stream.send_all(reply)
    except trio.BrokenResourceError:
        if machine.outcome is None:
            machine.receive_data(b"")
    return machine.outcome


async def handshakes(server, client, acceptor, dialer):
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive, server, acceptor)
            nursery.start_soon(drive, client, dialer)
    return acceptor.outcome, dialer.outcome


def replica_auth(replica_id, **kw):
    return ReplicaAuth(cluster_id=CLUSTER, replica_id=replica_id, tls=True, **kw)


async def peer_handshake(acceptor_files: TLS, acceptor_id: int, dialer_files: TLS,
                         dialer_id: int, dialed_id: int):
    """TLS, then the handshake, between replica `acceptor_id` serving with
    `acceptor_files` and replica `dialer_id` dialing it (as replica `dialed_id`) with
    `dialer_files`.  Returns both outcomes."""
    server, client, errors = await tls_connect(tls.server_context(acceptor_files),
                                               tls.peer_context(dialer_files))
    assert errors == {}
    acceptor = Acceptor(replica_auth(acceptor_id), MEMBERS,
                        peer_certificate=tls.peer_identity(server))
    dialer = Dialer.peer(replica_auth(dialer_id), dialed_id,
                         peer_certificate=tls.peer_identity(client))
    return await handshakes(server, client, acceptor, dialer)


def verify_error(error) -> str:
    assert isinstance(error, ssl.SSLError), repr(error)
    return getattr(error, "verify_message", "") or str(error)


# ---------------------------------------------------------------- replicas

async def test_replica_to_replica(cluster_certs):
    server, client, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1")),
        tls.peer_context(files(cluster_certs, "replica-2")))
    assert errors == {}
    assert server.version() == client.version() == "TLSv1.3"
    assert tls.peer_identity(server) == 2 and tls.peer_identity(client) == 1
    assert await peer_handshake(files(cluster_certs, "replica-1"), 1,
                                files(cluster_certs, "replica-2"), 2, 1) == (
        Authenticated(2, CLUSTER, Method.CERTIFICATE), Authenticated(1, CLUSTER, Method.CERTIFICATE))


async def test_replica_to_replica_over_loopback_tcp_with_secret(cluster_certs):
    secret = b"9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc"
    server_ctx = tls.server_context(files(cluster_certs, "replica-3"))
    client_ctx = tls.peer_context(files(cluster_certs, "replica-1"))
    outcomes = {}
    accepted = trio.Event()

    async def accept(stream):
        ssl_stream = trio.SSLStream(stream, server_ctx, server_side=True)
        await ssl_stream.do_handshake()
        acceptor = Acceptor(replica_auth(3, cluster_secrets=(secret,)), MEMBERS,
                            peer_certificate=tls.peer_identity(ssl_stream))
        outcomes["acceptor"] = await drive(ssl_stream, acceptor)
        accepted.set()
        await ssl_stream.aclose()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, accept, 0,
                                                              host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1")
            await stream.do_handshake()
            dialer = Dialer.peer(replica_auth(1, cluster_secrets=(secret,)), 3,
                                 peer_certificate=tls.peer_identity(stream))
            outcomes["dialer"] = await drive(stream, dialer)
            await stream.aclose()
            await accepted.wait()
            nursery.cancel_scope.cancel()
    assert outcomes == {"acceptor": Authenticated(1, CLUSTER, Method.SECRET),
                        "dialer": Authenticated(3, CLUSTER, Method.SECRET)}


@pytest.mark.parametrize("acceptor, dialer, refuser, reason", [
    # Replica 3's files on the host that claims to be replica 2.
    (("replica-1", 1), ("replica-3", 2, 1), "acceptor",
     "the hello names replica 2 but the certificate names replica 3"),
    # Replica 2 dials what it believes is replica 1, and finds replica 3's certificate.
    (("replica-3", 3), ("replica-2", 2, 1), "dialer",
     "dialed replica 1 but its certificate names replica 3"),
    # Dialing with the client's files: TLS accepts them (client authentication), the
    # handshake does not.
    (("replica-1", 1), ("client", 2, 1), "acceptor", "a client certificate cannot act as a peer"),
])
async def test_wrong_identity_refused(cluster_certs, acceptor, dialer, refuser, reason):
    (acceptor_name, acceptor_id), (dialer_name, dialer_id, dialed_id) = acceptor, dialer
    acceptor_outcome, dialer_outcome = await peer_handshake(
        files(cluster_certs, acceptor_name), acceptor_id,
        files(cluster_certs, dialer_name), dialer_id, dialed_id)
    mine, theirs = ((acceptor_outcome, dialer_outcome) if refuser == "acceptor"
                    else (dialer_outcome, acceptor_outcome))
    assert mine == Refused(reason)
    assert theirs == Refused(reason, remote=True)   # the other side was told why


async def test_client_certificate_refused_as_a_server(cluster_certs):
    # Serving with the client's files: it has no server authentication usage.
    _, _, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "client")),
        tls.peer_context(files(cluster_certs, "replica-2")))
    verify_error(errors["client"])
    assert errors["client"].verify_code == 26   # X509_V_ERR_INVALID_PURPOSE


async def test_certificate_of_another_ca_refused(cluster_certs, foreign_certs):
    # Another cluster's replica 2 dials our replica 1: the server refuses it.
    server, client, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1")),
        tls.peer_context(TLS(ca=cluster_certs / "ca.pem", cert=foreign_certs / "replica-2.pem",
                             key=foreign_certs / "replica-2.key")))
    assert "server" in errors and "certificate verify failed" in str(errors["server"])
    # In TLS 1.3 the client learns it on its first read.
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(TIMEOUT_S):
            while await client.receive_some(100):
                pass
            raise trio.BrokenResourceError("closed")
    # Our replica dials a server with another cluster's certificate: refused too.
    _, _, errors = await tls_connect(
        tls.server_context(files(foreign_certs, "replica-1")),
        tls.peer_context(files(cluster_certs, "replica-2")))
    verify_error(errors["client"])
    # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN or _UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert errors["client"].verify_code in (19, 20)


async def test_tls_1_2_refused(cluster_certs):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cluster_certs / "ca.pem")
    old.load_cert_chain(cluster_certs / "client.pem", cluster_certs / "client.key")
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    _, _, errors = await tls_connect(tls.server_context(files(cluster_certs, "replica-1")), old)
    assert "server" in errors and "client" in errors
    assert "unsupported protocol" in str(errors["server"]).lower()


# ---------------------------------------------------------------- clients

async def test_client_with_certificate(cluster_certs):
    server, client, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-2")),
        tls.client_context(files(cluster_certs, "client")))
    assert errors == {}
    acceptor = Acceptor(replica_auth(2), MEMBERS, peer_certificate=tls.peer_identity(server))
    dialer = Dialer.client(tls=True, peer_certificate=tls.peer_identity(client))
    assert await handshakes(server, client, acceptor, dialer) == (
        Authenticated(CLIENT, CLUSTER, Method.CERTIFICATE),
        Authenticated(2, CLUSTER, Method.CERTIFICATE))


@pytest.mark.parametrize("hostname, ok", [
    ("localhost", True), ("127.0.0.1", True), ("::1", True), ("db1.example", True),
    ("DB1.example", True), ("10.9.8.7", True), ("db2.example", False), ("10.9.8.6", False),
    ("example", False),
])
async def test_client_checks_host_names(cluster_certs, hostname, ok):
    _, _, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1")),
        tls.client_context(files(cluster_certs, "client")), server_hostname=hostname)
    if ok:
        assert errors == {}
    else:
        assert "Hostname mismatch" in verify_error(errors["client"]) or \
            "IP address mismatch" in verify_error(errors["client"])


async def test_client_without_certificate(cluster_certs):
    anonymous_tls = TLS(ca=cluster_certs / "ca.pem")
    # Required by default ...
    _, _, errors = await tls_connect(tls.server_context(files(cluster_certs, "replica-1")),
                                     tls.client_context(anonymous_tls))
    assert "server" in errors and "certificate" in str(errors["server"]).lower()
    # ... optional when the replica takes anonymous (or token) clients.
    server, client, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1"), client_certificate_required=False),
        tls.client_context(anonymous_tls))
    assert errors == {} and tls.peer_identity(server) is None
    acceptor = Acceptor(replica_auth(1, allow_anonymous_clients=True), MEMBERS,
                        peer_certificate=tls.peer_identity(server))
    dialer = Dialer.client(tls=True, peer_certificate=tls.peer_identity(client))
    assert await handshakes(server, client, acceptor, dialer) == (
        Authenticated(CLIENT, CLUSTER, Method.ANONYMOUS),
        Authenticated(1, CLUSTER, Method.CERTIFICATE))


async def test_optional_client_certificate_still_verified(cluster_certs, foreign_certs):
    _, _, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1"), client_certificate_required=False),
        tls.client_context(TLS(ca=cluster_certs / "ca.pem", cert=foreign_certs / "client.pem",
                               key=foreign_certs / "client.key")))
    assert "certificate verify failed" in str(errors["server"])


async def test_user_context(cluster_certs):
    context = ssl.create_default_context(cafile=str(cluster_certs / "ca.pem"))
    context.load_cert_chain(cluster_certs / "client.pem", cluster_certs / "client.key")
    assert tls.client_context(context) is context
    _, client, errors = await tls_connect(
        tls.server_context(files(cluster_certs, "replica-1")), tls.client_context(context))
    assert errors == {} and tls.peer_identity(client) == 1
    with pytest.raises(ConfigError, match="PROTOCOL_TLS_SERVER"):
        tls.server_context(context)
    with pytest.raises(ConfigError, match="PROTOCOL_TLS_CLIENT"):
        tls.client_context(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


# ---------------------------------------------------------------- files

def test_identity_of_each_file(cluster_certs):
    from cypaxos.security import pki

    for name, identity in (("replica-1", 1), ("replica-3", 3), ("client", CLIENT), ("ca", None)):
        info = pki.read_certificate((cluster_certs / f"{name}.pem").read_bytes())
        assert info.identity == identity, name


@pytest.mark.parametrize("uris, identity", [
    (["cypaxos://replica/7"], 7),
    (["cypaxos://client"], CLIENT),
    (["https://example.com", "cypaxos://replica/65535"], 65535),
    (["cypaxos://replica/65536"], None),
    (["cypaxos://replica/0"], None),
    (["cypaxos://replica/07"], None),
    (["cypaxos://replica/+7"], None),
    (["cypaxos://replica/7/"], None),
    (["cypaxos://replica/7", "cypaxos://replica/8"], None),
    (["cypaxos://replica/7", "cypaxos://client"], None),
    (["CYPAXOS://replica/7"], None),
    (["cypaxos://Replica/7"], None),
    ([], None),
])
def test_identity_from_uris(uris, identity):
    from cypaxos.security.identity import certificate_identity, identity_from_uris

    assert identity_from_uris(uris) == identity
    assert certificate_identity({"subjectAltName": [("DNS", "x"), *(("URI", u) for u in uris)]}) \
        == identity
    assert certificate_identity(None) is None and certificate_identity({}) is None


def test_own_certificate_checked(cluster_certs, caplog):
    tls.check_own_certificate(files(cluster_certs, "replica-2"), 2)
    with pytest.raises(ConfigError, match=r"names replica 2, not replica 1"):
        tls.check_own_certificate(files(cluster_certs, "replica-2"), 1)
    with pytest.raises(ConfigError, match=r"names a client, not replica 1"):
        tls.check_own_certificate(files(cluster_certs, "client"), 1)
    now = datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(ConfigError, match="expired on"):
        tls.check_own_certificate(files(cluster_certs, "replica-2"), 2,
                                  now=now + datetime.timedelta(days=5 * 366))
    with pytest.raises(ConfigError, match="is not valid before"):
        tls.check_own_certificate(files(cluster_certs, "replica-2"), 2,
                                  now=now - datetime.timedelta(days=2))
    with caplog.at_level(logging.WARNING, logger="cypaxos.security"):
        tls.check_own_certificate(files(cluster_certs, "replica-2"), 2,
                                  now=now + datetime.timedelta(days=5 * 365 - 10))
    assert "expires on" in caplog.text


def test_file_problems_are_one_line(cluster_certs, tmp_path):
    good = files(cluster_certs, "replica-1")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate\n")
    not_a_key = tmp_path / "nokey.pem"
    not_a_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    cases = [
        (TLS(ca=tmp_path / "missing.pem", cert=good.cert, key=good.key),
         f"TLS CA file {tmp_path / 'missing.pem'}: No such file or directory"),
        (TLS(ca=tmp_path, cert=good.cert, key=good.key), "Is a directory"),
        (TLS(ca=junk, cert=good.cert, key=good.key), "is not a PEM file"),
        (TLS(ca=good.key, cert=good.cert, key=good.key), "holds no valid certificate"),
        (TLS(ca=good.ca, cert=junk, key=good.key), f"TLS certificate file {junk} is not a PEM file"),
        (TLS(ca=good.ca, cert=good.key, key=good.key), "holds no valid certificate"),
        (TLS(ca=good.ca, cert=good.cert, key=cluster_certs / "replica-2.key"),
         "is not the key of certificate"),
        (TLS(ca=good.ca, cert=good.cert, key=not_a_key), "holds no valid private key"),
        (TLS(ca=good.ca, cert=good.cert, key=good.cert), "holds no valid private key"),
    ]
    for settings_, message in cases:
        for build in (tls.server_context, tls.peer_context, tls.client_context):
            with pytest.raises(ConfigError) as raised:
                build(settings_)
            text = str(raised.value)
            assert message in text and "\n" not in text, (build.__name__, text)
    with pytest.raises(ConfigError, match="both a certificate and its key"):
        TLS(ca=good.ca, cert=good.cert)
    with pytest.raises(ConfigError, match="need its certificate and key"):
        tls.server_context(TLS(ca=good.ca))


def test_encrypted_key_refused(cluster_certs, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((cluster_certs / "replica-1.key").read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ConfigError, match="is encrypted"):
        tls.server_context(TLS(ca=cluster_certs / "ca.pem", cert=cluster_certs / "replica-1.pem",
                               key=encrypted))


def test_exposed_key_warns(cluster_certs, tmp_path, caplog):
    exposed = tmp_path / "replica-1.key"
    exposed.write_bytes((cluster_certs / "replica-1.key").read_bytes())
    os.chmod(exposed, 0o644)
    with caplog.at_level(logging.WARNING, logger="cypaxos.security"):
        tls.server_context(TLS(ca=cluster_certs / "ca.pem", cert=cluster_certs / "replica-1.pem",
                               key=exposed))
    assert "may be read by group or others (mode 0644)" in caplog.text


def test_ca_bundle_of_two_cas(cluster_certs, foreign_certs, tmp_path):
    # Rotation to a new CA: a bundle of both verifies either side's certificates.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((cluster_certs / "ca.pem").read_bytes() + (foreign_certs / "ca.pem").read_bytes())

    async def both():
        for server_dir, client_dir in ((cluster_certs, foreign_certs), (foreign_certs, cluster_certs)):
            _, _, errors = await tls_connect(
                tls.server_context(TLS(bundle, server_dir / "replica-1.pem", server_dir / "replica-1.key")),
                tls.peer_context(TLS(bundle, client_dir / "replica-2.pem", client_dir / "replica-2.key")))
            assert errors == {}
    trio.run(both)
