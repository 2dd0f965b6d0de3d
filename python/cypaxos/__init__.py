"""cypaxos: a replicated state machine engine.

A Multi-Paxos core in Cython, a Trio replica server, a write-ahead log and this
client API::

    import cypaxos

    with cypaxos.connect("127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003") as kv:
        kv.put(b"k", b"v")
        kv.get(b"k")            # linearizable

    async with cypaxos.open_client(["127.0.0.1:7001", ...]) as kv:   # Trio or asyncio
        await kv.put(b"k", b"v")

    tls = cypaxos.TLS(ca="ca.pem", cert="client.pem", key="client.key")
    with cypaxos.connect("db1.example.com:7001,...", tls=tls) as kv: ...
"""
from cypaxos.client import BackupInfo, BlockingClient, Client, connect, open_client
from cypaxos.security.tls import TLS
from cypaxos.client.store import Compare, KeyValue, Op, TxnResult
from cypaxos.errors import (
    ClientError, ClosedError, CommandError, CompactedError, ConfigError, DataDirError, Error,
    IdentityMismatchError, RequestError, SessionExpiredError, StorageError, TimeoutError,
    UnavailableError, WalCorruptError,
)

__version__ = "0.1.0"
"""The package version: its one source (pyproject.toml reads it, `cypaxos --version` prints it)."""

__all__ = [
    "connect", "open_client", "Client", "BlockingClient", "BackupInfo", "TLS",
    "KeyValue", "TxnResult", "Compare", "Op",
    "Error", "ClientError", "ClosedError", "CommandError", "CompactedError", "ConfigError",
    "DataDirError",
    "IdentityMismatchError", "RequestError", "SessionExpiredError", "StorageError",
    "TimeoutError", "UnavailableError", "WalCorruptError", "__version__",
]
