"""`cypaxos certs` run as a real subprocess: the files, their modes and contents, the
refusal to overwrite, `--force`, `--host`, and one-line errors with documented exits."""
from __future__ import annotations

import datetime
import ipaddress
import os
import stat

import pytest
from conftest import write_certs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_cli import assert_one_error_line, run_cli

from cypaxos.security import pki

NAMES = ["ca", "replica-1", "replica-2", "client"]


def load(directory, name) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())


def sans(cert) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def usages(cert) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_files_modes_and_contents(tmp_path):
    directory = tmp_path / "new" / "certs"
    result = run_cli("certs", str(directory), "--replicas", "2", "--host", "db1.example",
                     "--host", "10.0.0.5", "--host", "db1.example")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert b"valid until" in result.stdout
    assert sorted(os.listdir(directory)) == sorted(f"{n}.{s}" for n in NAMES for s in ("pem", "key"))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for name in NAMES:
        assert stat.S_IMODE(os.stat(directory / f"{name}.key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(directory / f"{name}.pem").st_mode) == 0o644

    ca = load(directory, "ca")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= datetime.timedelta(days=3650)
    for name in NAMES[1:]:
        cert = load(directory, name)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
        assert cert.issuer == ca.subject
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=1825)

    replica = load(directory, "replica-2")
    names = sans(replica)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["cypaxos://replica/2"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "db1.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5")]
    assert usages(replica) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    client = load(directory, "client")
    assert sans(client).get_values_for_type(x509.UniformResourceIdentifier) == ["cypaxos://client"]
    assert sans(client).get_values_for_type(x509.DNSName) == []
    assert usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pki.read_certificate((directory / "client.pem").read_bytes()).identity == "client"


def test_keys_are_0600_whatever_the_umask(tmp_path):
    for umask in (0o000, 0o077, 0o277):
        directory = tmp_path / f"umask-{umask:o}"
        result = run_cli("certs", str(directory), "--replicas", "1",
                         preexec_fn=lambda umask=umask: os.umask(umask))
        assert result.returncode == 0, result.stderr
        for name in ("ca", "replica-1", "client"):
            assert stat.S_IMODE(os.stat(directory / f"{name}.key").st_mode) == 0o600
            assert stat.S_IMODE(os.stat(directory / f"{name}.pem").st_mode) == 0o644


def test_refuses_to_overwrite_then_force_replaces(tmp_path):
    directory = write_certs(tmp_path / "certs", replicas=2)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    result = run_cli("certs", str(directory), "--replicas", "2")
    assert_one_error_line(result, 1, contains="exists; pass --force")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    # One file of the set is enough to refuse (a client.pem left from before, say).
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "client.pem").write_bytes(b"keep me")
    assert_one_error_line(run_cli("certs", str(lone), "--replicas", "1"), 1,
                          contains="client.pem exists")
    assert os.listdir(lone) == ["client.pem"]

    os.chmod(directory / "replica-1.key", 0o666)   # an old key left world-readable
    result = run_cli("certs", str(directory), "--replicas", "2", "--force")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in after)   # a new CA, new keys
    assert stat.S_IMODE(os.stat(directory / "replica-1.key").st_mode) == 0o600
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.mark.parametrize("args, code, contains", [
    (["--replicas", "2", "--host", "bad host"], 2, "--host 'bad host' is neither"),
    (["--replicas", "2", "--host=-x.example"], 2, "is neither a DNS name"),
    (["--replicas", "2", "--host", ""], 2, "is neither"),
    (["--replicas", "0"], 2, "--replicas"),
    (["--replicas", "x"], 2, "--replicas"),
    ([], 2, "--replicas"),
])
def test_bad_arguments_write_nothing(tmp_path, args, code, contains):
    directory = tmp_path / "certs"
    assert_one_error_line(run_cli("certs", str(directory), *args), code, contains=contains)
    assert not directory.exists()


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    assert_one_error_line(run_cli("certs", str(blocker / "certs"), "--replicas", "1"), 1,
                          contains="cannot create")
    # An existing directory where no file can be created (file modes do not stop
    # root; /proc does).
    result = run_cli("certs", "/proc/self", "--replicas", "1")
    assert_one_error_line(result, 1, contains="cannot write")


def test_help_lists_the_files():
    result = run_cli("certs", "--help")
    assert result.returncode == 0
    for word in (b"ca.pem", b"replica-N.pem", b"client.key", b"--host", b"--force", b"0600"):
        assert word in result.stdout
