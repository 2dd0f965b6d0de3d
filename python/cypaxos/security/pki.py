"""Certificates of a cypaxos cluster, built and read with `cryptography`.

What `cypaxos certs` issues (docs/security.md, "Certificates"):

* a CA, ECDSA P-256, valid CA_VALIDITY_DAYS, that signs everything below and nothing
  else (path length 0); its subject carries a random suffix, so the CAs of two clusters
  never share a name;
* per replica N, a certificate valid CERT_VALIDITY_DAYS whose identity is the URI
  subject alternative name ``cypaxos://replica/N`` (`cypaxos.security.identity`),
  with DNS/IP names for localhost, 127.0.0.1, ::1 and every ``--host``, usable for TLS
  server and client authentication (a replica both accepts and dials);
* one client certificate with the URI ``cypaxos://client``, client authentication only,
  no host names: it can never pass as a replica, neither when dialing (it names no
  replica id) nor when accepting (TLS refuses it as a server certificate).

ECDSA P-256 rather than Ed25519: both work for TLS 1.3 with OpenSSL 3, but P-256 is
also accepted by every TLS stack a client might bring (LibreSSL, older OpenSSL, Go).

This module imports `cryptography` (tens of milliseconds): only `cypaxos certs` and a
replica checking its own certificate load it, never a plain client.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cypaxos.security.identity import (
    CLIENT_URI, REPLICA_ID_MAX, Identity, identity_from_uris, replica_uri,
)

__all__ = [
    "CA_VALIDITY_DAYS", "CERT_VALIDITY_DAYS", "host_name", "Issued", "issue",
    "CertificateInfo", "read_certificate",
]

CA_VALIDITY_DAYS = 3650
"""The CA is valid for ten years."""

CERT_VALIDITY_DAYS = 1825
"""Replica and client certificates are valid for five years (docs/security.md: rotation)."""

_BACKDATE = datetime.timedelta(hours=1)  # hosts whose clocks are a little behind accept them


@dataclass(frozen=True)
class Issued:
    """One certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8, unencrypted: a replica must start unattended; the file's mode protects it.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cypaxos"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _leaf(ca_cert: x509.Certificate, ca_key, common_name: str,
          alt_names: list, usages: list, now: datetime.datetime) -> Issued:
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def host_name(host: str) -> x509.GeneralName:
    """A host as a SAN: an IP address, else a DNS name (ValueError if neither)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if (not host or len(host) > 253 or not all(
            re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
            for label in labels)):
        raise ValueError(f"{host!r} is neither a DNS name nor an IP address")
    return x509.DNSName(host.rstrip(".").lower())


_ALWAYS = ("localhost", "127.0.0.1", "::1")


def issue(replicas: int, hosts: Sequence[str] = (),
          now: datetime.datetime | None = None) -> dict[str, Issued]:
    """A new CA and its certificates: {"ca": ..., "replica-1": ..., ..., "client": ...}.

    `hosts` go into every replica certificate's SANs beside localhost, 127.0.0.1 and
    ::1.  ValueError for a bad host or replica count.
    """
    if type(replicas) is not int or not 1 <= replicas <= REPLICA_ID_MAX:
        raise ValueError(f"replica count {replicas!r} is not in 1..{REPLICA_ID_MAX}")
    names = []
    for host in (*_ALWAYS, *hosts):
        name = host_name(host)
        if name not in names:
            names.append(name)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_key = _new_key()
    ca_name = _name(f"cypaxos CA {os.urandom(6).hex()}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    issued = {"ca": Issued(ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key))}
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for replica_id in range(1, replicas + 1):
        issued[f"replica-{replica_id}"] = _leaf(
            ca_cert, ca_key, f"cypaxos replica {replica_id}",
            [x509.UniformResourceIdentifier(replica_uri(replica_id)), *names], both, now)
    issued["client"] = _leaf(ca_cert, ca_key, "cypaxos client",
                             [x509.UniformResourceIdentifier(CLIENT_URI)],
                             [ExtendedKeyUsageOID.CLIENT_AUTH], now)
    return issued


@dataclass(frozen=True)
class CertificateInfo:
    """What a replica checks about its own certificate before it serves."""

    identity: Identity
    not_valid_before: datetime.datetime
    not_valid_after: datetime.datetime
    subject: str


def read_certificate(pem: bytes) -> CertificateInfo:
    """Parse the first certificate of a PEM file (ValueError if there is none)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return CertificateInfo(identity_from_uris(uris), cert.not_valid_before_utc,
                           cert.not_valid_after_utc, cert.subject.rfc4514_string())
