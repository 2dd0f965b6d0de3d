"""Replica addresses: the one parser of ``HOST:PORT``, ``ID=HOST:PORT,...`` and client lists.

One set of rules, used by the command line, the replica, the client, the local
cluster and the tools:

* an address is ``HOST:PORT``; PORT is decimal digits, 1..65535; HOST is not empty;
* an IPv6 host is written in brackets, ``[::1]:7001`` (a bare ``::1:7001`` is
  ambiguous and refused); `split_address` returns the host without them;
* the canonical text of an address is ``HOST:PORT`` with the port as a plain number
  and an IPv6 host in brackets (`format_address`): what replicas report, compare
  and redirect to;
* a list is comma-separated; blanks around entries and empty entries are ignored.

Every malformed value raises `cypaxos.errors.ConfigError` with one line naming the
bad entry and, when given, where it came from (``--cluster``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Union

from .ballots import REPLICA_ID_MAX
from .errors import ConfigError

__all__ = ["Addresses", "split_address", "format_address",
           "normalize_address", "parse_addresses", "parse_cluster"]

Addresses = Union[str, Iterable[str]]
"""What a client takes: ``"h:p,h:p"``, or an iterable of ``"h:p"`` or (host, port)."""


def _what(entry: str, source: str | None) -> str:
    return f"{source} entry {entry!r}" if source else f"address {entry!r}"


def split_address(address: str, *, source: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6HOST]:PORT``) -> (host without brackets, port).

    `source` names where the address came from, for the error message
    (e.g. ``"--cluster"``).  Raises ConfigError.
    """
    if not isinstance(address, str):
        raise ConfigError(f"bad address {address!r}: expected 'HOST:PORT'")
    address = address.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or host == "[]":
        raise ConfigError(f"{_what(address, source)} is not HOST:PORT")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{_what(address, source)}: the port must be a number in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ConfigError(f"{_what(address, source)}: write an IPv6 host as [HOST]:PORT")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The canonical ``HOST:PORT`` text (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_address(address: str, *, source: str | None = None) -> str:
    """Check `address` and return its canonical text (see the module docstring)."""
    return format_address(*split_address(address, source=source))


def parse_addresses(addresses: Addresses, *, source: str | None = None) -> list[str]:
    """Check a client's replica list and return its distinct canonical addresses, in order.

    `addresses` is a comma-separated string or an iterable of strings or of (host,
    port) pairs.  ``ID=HOST:PORT`` entries (the ``serve --cluster`` form) are taken
    too, ids ignored, so one string serves both.  Raises ConfigError naming the bad
    entry (and `source`, e.g. ``"--cluster"``), so a typo fails at once instead of as
    a timeout later.
    """
    if isinstance(addresses, str):
        items = addresses.split(",")
    elif isinstance(addresses, Iterable):
        items = list(addresses)
    else:
        raise ConfigError(f"addresses must be a 'HOST:PORT,...' string or a list, "
                          f"not {type(addresses).__name__}")
    result: list[str] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            host = str(item[0])
            item = f"{host}:{item[1]}" if host.startswith("[") else format_address(host, item[1])
        if not isinstance(item, str):
            raise ConfigError(f"bad address {item!r}: expected 'HOST:PORT'")
        item = item.strip()
        if not item:
            continue  # "a:1,b:2," and stray spaces are harmless
        if "=" in item:
            item = item.partition("=")[2].strip()
        address = normalize_address(item, source=source)
        if address not in result:
            result.append(address)
    if not result:
        raise ConfigError(f"{source} is empty: no replica address given" if source
                          else "no replica address given")
    return result


def parse_cluster(spec: str, *, source: str = "--cluster") -> dict[int, str]:
    """Parse ``1=HOST:PORT,2=HOST:PORT,...`` into {replica_id: canonical address}.

    Raises ConfigError for a malformed entry, an id outside 1..65535, an id named
    twice or two replicas at one address.
    """
    cluster: dict[int, str] = {}
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{source} is empty; expected 1=HOST:PORT,2=HOST:PORT,...")
    for part in spec.split(","):
        part = part.strip()
        rid, sep, address = part.partition("=")
        if not sep:
            raise ConfigError(f"{source} entry {part!r} is not ID=HOST:PORT")
        rid = rid.strip()
        if not (rid.isascii() and rid.isdigit()):
            raise ConfigError(f"{source} entry {part!r}: {rid!r} is not a replica id")
        replica_id = int(rid)
        if not 1 <= replica_id <= REPLICA_ID_MAX:
            raise ConfigError(f"{source} entry {part!r}: replica ids are 1..{REPLICA_ID_MAX}")
        address = normalize_address(address, source=source)
        if replica_id in cluster:
            raise ConfigError(f"{source} names replica {replica_id} twice")
        cluster[replica_id] = address
    if len(set(cluster.values())) != len(cluster):
        raise ConfigError(f"{source} gives two replicas the same address")
    return cluster
