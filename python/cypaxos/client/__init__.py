"""The cypaxos client: `open_client` (Trio) and `connect` (blocking), over one engine.

`cypaxos.client.api` holds the Trio `Client` (leader finding, pipelining, batching,
safe retries); `cypaxos.client.blocking` runs one in a background thread for plain
code.  Addresses are parsed by `cypaxos.addresses.parse_addresses`.
"""
from ..addresses import parse_addresses
from .api import COMMAND_BYTES_MAX, Client, open_client
from .backup import BackupInfo
from .blocking import BlockingClient, connect

__all__ = ["Client", "BlockingClient", "open_client", "connect", "parse_addresses",
           "COMMAND_BYTES_MAX", "BackupInfo"]
