"""How a certificate names its holder: one ``cypaxos:`` URI subject alternative name.

* ``cypaxos://replica/N``: replica N (1..65535);
* ``cypaxos://client``: a client, never a replica.

Nothing else in a certificate (common name, DNS names, other URIs) is read as an
identity, and a certificate with two ``cypaxos:`` URIs, or a replica id with a sign,
a leading zero or trailing text, names nobody.  The identity is read from the
certificate as TLS verified it (`ssl.SSLSocket.getpeercert()`), so only what the
cluster's CA signed counts.
"""
from __future__ import annotations

import re
from typing import Iterable, Union

from cypaxos.wire import REPLICA_ID_MAX

__all__ = ["CLIENT", "CLIENT_URI", "REPLICA_ID_MAX", "Identity", "replica_uri",
           "identity_from_uris", "certificate_identity", "describe"]

CLIENT = "client"
"""The identity of a client certificate (a replica's identity is its id, an int)."""

CLIENT_URI = "cypaxos://client"
_SCHEME = "cypaxos:"
_REPLICA_URI = re.compile(r"cypaxos://replica/([1-9][0-9]{0,4})")

Identity = Union[int, str, None]
"""A replica id, CLIENT, or None (no certificate, or one that names nobody)."""


def replica_uri(replica_id: int) -> str:
    """The URI SAN that names replica `replica_id` (1..65535)."""
    if type(replica_id) is not int or not 1 <= replica_id <= REPLICA_ID_MAX:
        raise ValueError(f"replica id {replica_id!r} is not in 1..{REPLICA_ID_MAX}")
    return f"cypaxos://replica/{replica_id}"


def identity_from_uris(uris: Iterable[str]) -> Identity:
    """The identity the URI SANs `uris` of one certificate name (see the module doc)."""
    ours = [uri for uri in uris if uri[:len(_SCHEME)].lower() == _SCHEME]
    if len(ours) != 1:
        return None
    if ours[0] == CLIENT_URI:
        return CLIENT
    match = _REPLICA_URI.fullmatch(ours[0])
    if match is None:
        return None
    replica_id = int(match.group(1))
    return replica_id if replica_id <= REPLICA_ID_MAX else None


def certificate_identity(cert: dict | None) -> Identity:
    """The identity in a verified peer certificate, as `getpeercert()` returns it.

    `cert` is None or empty when the peer presented no certificate (or it was not
    verified): that names nobody.
    """
    if not cert:
        return None
    return identity_from_uris(value for kind, value in cert.get("subjectAltName", ())
                              if kind == "URI")


def describe(identity: Identity) -> str:
    """`identity` for a log line: "replica 3", "a client", "nobody"."""
    if identity is None:
        return "nobody"
    return "a client" if identity == CLIENT else f"replica {identity}"
