"""TLS settings and the three `ssl` contexts a cluster uses (docs/security.md).

* `server_context`: what a replica accepts connections with, peers and clients on one
  port: TLS 1.3 at least, its own certificate, and a certificate required from the
  other side (or optional, when clients may come without one: anonymous clients or
  clients with a token);
* `peer_context`: what a replica dials its peers with: the CA must have signed the
  acceptor's certificate; that it names the replica id dialed is checked by the
  handshake (`cypaxos.security.handshake`), not by a host name, so a replica keeps
  its identity when its address changes;
* `client_context`: what a client dials with: the CA and the host name are checked,
  and the client's own certificate is sent if it has one.

Each accepts a `TLS` (paths) or a ready `ssl.SSLContext` of the matching side, used as
given.  Every file problem is one `ConfigError` line naming the file.

After the TLS handshake, `peer_identity(ssl_object)` reads who the other side is from
its verified certificate (`cypaxos.security.identity`).
"""
from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from typing import Optional, Union

from cypaxos.errors import ConfigError
from cypaxos.security.files import warn_if_exposed
from cypaxos.security.identity import Identity, certificate_identity, describe

__all__ = [
    "TLS", "TLSSettings", "MINIMUM_VERSION", "server_context", "peer_context",
    "client_context", "peer_identity", "check_own_certificate", "EXPIRY_WARNING_DAYS",
]

log = logging.getLogger("cypaxos.security")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_3
EXPIRY_WARNING_DAYS = 30
"""A replica warns at start when its certificate expires sooner than this."""


@dataclass(frozen=True)
class TLS:
    """Where a cluster member's TLS files are: the CA, and its certificate and key.

    `cypaxos.TLS(ca="ca.pem", cert="client.pem", key="client.key")`.  A client may omit
    `cert` and `key` (a cluster that takes clients without certificates); a replica
    needs all three.  Paths are not read until a context is built.
    """

    ca: Union[str, os.PathLike]
    cert: Optional[Union[str, os.PathLike]] = None
    key: Optional[Union[str, os.PathLike]] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs both a certificate and its key, or neither")


TLSSettings = Union[TLS, ssl.SSLContext]
"""What the API takes for TLS: paths, or a context the caller built."""


def _check_readable(path, what: str) -> str:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in head:
        raise ConfigError(f"TLS {what} {path} is not a PEM file")
    return path


def _load_ca(context: ssl.SSLContext, ca) -> None:
    path = _check_readable(ca, "CA file")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ConfigError(f"TLS CA file {path} holds no valid certificate") from None


def _no_password() -> bytes:
    raise ConfigError("encrypted")


def _load_own(context: ssl.SSLContext, cert, key) -> None:
    cert_path = _check_readable(cert, "certificate file")
    key_path = _check_readable(key, "key file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_path)
    except ssl.SSLError:
        raise ConfigError(f"TLS certificate file {cert_path} holds no valid certificate") from None
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ConfigError:
        raise ConfigError(f"TLS key file {key_path} is encrypted; cypaxos needs an "
                          f"unencrypted key, protected by its file mode (0600)") from None
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS key file {key_path} is not the key of certificate "
                              f"{cert_path}") from None
        raise ConfigError(f"TLS key file {key_path} holds no valid private key") from None
    try:
        warn_if_exposed(key_path, os.stat(key_path).st_mode, "TLS key file", log)
    except OSError:
        pass  # it was just read: a race with a rename, not worth a failure


def _given(context: ssl.SSLContext, side: int, use: str) -> ssl.SSLContext:
    if context.protocol != side:
        wanted = "PROTOCOL_TLS_SERVER" if side == ssl.PROTOCOL_TLS_SERVER else "PROTOCOL_TLS_CLIENT"
        raise ConfigError(f"the SSLContext for {use} must be made with ssl.{wanted}")
    return context


def _context(tls: TLSSettings, side: int, use: str, *, own_required: bool,
             verify_mode: ssl.VerifyMode, check_hostname: bool = False) -> ssl.SSLContext:
    if isinstance(tls, ssl.SSLContext):
        return _given(tls, side, use)
    if tls.cert is None and own_required:
        raise ConfigError("a replica's TLS settings need its certificate and key")
    context = ssl.SSLContext(side)
    context.minimum_version = MINIMUM_VERSION
    if tls.cert is not None:
        _load_own(context, tls.cert, tls.key)
    _load_ca(context, tls.ca)
    if side == ssl.PROTOCOL_TLS_CLIENT:
        context.check_hostname = check_hostname
    context.verify_mode = verify_mode
    return context


def server_context(tls: TLSSettings, *, client_certificate_required: bool = True) -> ssl.SSLContext:
    """The context a replica accepts connections with.

    `client_certificate_required=False` when clients may come without a certificate
    (anonymous clients allowed, or client tokens): a certificate the other side does
    present is still verified, and a peer must always present one (the handshake
    refuses a peer hello without it).
    """
    return _context(tls, ssl.PROTOCOL_TLS_SERVER, "accepting connections", own_required=True,
                    verify_mode=ssl.CERT_REQUIRED if client_certificate_required
                    else ssl.CERT_OPTIONAL)


def peer_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context a replica dials its peers with (no host name check: see the module doc)."""
    return _context(tls, ssl.PROTOCOL_TLS_CLIENT, "dialing peers", own_required=True,
                    verify_mode=ssl.CERT_REQUIRED)


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context a client dials replicas with: CA and host name verified."""
    return _context(tls, ssl.PROTOCOL_TLS_CLIENT, "a client", own_required=False,
                    verify_mode=ssl.CERT_REQUIRED, check_hostname=True)


def peer_identity(ssl_object) -> Identity:
    """Who the other side of a finished TLS handshake is, by its verified certificate.

    `ssl_object` is anything with `getpeercert()`: an `ssl.SSLObject`, an
    `ssl.SSLSocket`, a `trio.SSLStream`.  A replica id, CLIENT, or None.
    """
    return certificate_identity(ssl_object.getpeercert())


def check_own_certificate(tls: TLS, replica_id: int,
                          now: datetime.datetime | None = None) -> None:
    """ConfigError unless `tls.cert` names replica `replica_id` and is valid now.

    A replica runs this before it serves, so that a certificate mixed up between hosts
    or expired is one line at start, not a refused handshake on every connection.
    Warns when it expires within EXPIRY_WARNING_DAYS.
    """
    from cypaxos.security import pki  # cryptography: loaded by replicas, not by clients

    path = _check_readable(tls.cert, "certificate file")
    with open(path, "rb") as f:
        pem = f.read()
    try:
        info = pki.read_certificate(pem)
    except ValueError:
        raise ConfigError(f"TLS certificate file {path} holds no valid certificate") from None
    if info.identity != replica_id:
        raise ConfigError(f"TLS certificate file {path} names {describe(info.identity)}, "
                          f"not replica {replica_id}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now < info.not_valid_before:
        raise ConfigError(f"TLS certificate file {path} is not valid before "
                          f"{info.not_valid_before:%Y-%m-%d %H:%M} UTC (is this clock right?)")
    if now >= info.not_valid_after:
        raise ConfigError(f"TLS certificate file {path} expired on "
                          f"{info.not_valid_after:%Y-%m-%d} UTC")
    if info.not_valid_after - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        log.warning("TLS certificate file %s expires on %s UTC; rotate it (docs/security.md)",
                    path, f"{info.not_valid_after:%Y-%m-%d}")
