"""The cypaxos client: `open_client` (Trio or asyncio), `connect` (blocking), one session.

* `cypaxos.client.session`: `ClientSession`, the client's protocol without I/O
  (sessions, numbering, batches, the in-flight window, resends, redirects, reads,
  deadlines), with `cypaxos.client.routing` (which replica, when, and what the
  errors say);
* `cypaxos.client.calls`: `ClientCalls`, the public calls over a session, for any
  event loop;
* `cypaxos.client.api`: the Trio `Client` and `open_client`, wired with
  `cypaxos.client.connection` (dial, frames) and `cypaxos.client.dialing` (the
  opening handshake and what a failed dial means, sans-I/O);
* `cypaxos.client.aio`: `AsyncioClient`, what `open_client` yields under asyncio: the
  same calls and session, wired with `cypaxos.client.aioconnection` (an asyncio
  Protocol; imported only when asyncio runs it);
* `cypaxos.client.blocking`: `BlockingClient`, a `Client` in a background thread;
* `cypaxos.client.backup`: `Client.backup`, a consistent copy of the state to a file.

Addresses are parsed by `cypaxos.addresses.parse_addresses`.
"""
from ..addresses import parse_addresses
from .api import COMMAND_BYTES_MAX, Client, open_client
from .backup import BackupInfo
from .blocking import BlockingClient, connect
from .session import ClientSession, SessionSettings

__all__ = ["Client", "BlockingClient", "open_client", "connect", "parse_addresses",
           "COMMAND_BYTES_MAX", "ClientSession", "SessionSettings", "BackupInfo"]
