"""The contract between a `ReplicaNode` and whatever runs it: the `Storage` and
`Transport` protocols it is given, and its `NodeOptions`.

The server implements them over files and sockets (`replica.disk.DiskStorage`,
`replica.outbox.SocketTransport`), the simulator over its fake disk and network
(`cypaxos.testing.simnode`), the transcript tests over fakes that wait for commands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .limits import CLIENT_BUFFER_BYTES_MAX, QUERIES_PER_READ_MAX, REPLY_BYTES_MAX

__all__ = ["Storage", "Transport", "NodeOptions"]


class Storage(Protocol):
    """What the node needs of its disk: the write-ahead log and snapshot files.

    Sequence numbers count WAL records from 1.  Invariant: ``durable_seq <= last_seq``;
    a record is durable (survives a crash) once ``durable_seq`` reaches it.
    """

    @property
    def first_seq(self) -> int:
        """The oldest record still in the log."""

    @property
    def last_seq(self) -> int:
        """The newest record appended (durable or not)."""

    @property
    def durable_seq(self) -> int:
        """Every record up to this one is durable."""

    @property
    def sync_in_flight(self) -> bool:
        """Whether a sync started by `start_sync` has not ended yet."""

    def append(self, records: list) -> int:
        """Append the core's record tuples (in order); return the bytes they took."""

    def start_sync(self) -> bool:
        """Start making every record appended so far durable, without waiting.

        At most one sync is in flight (False if one is: its end starts the next).  Its
        end is reported by calling the node's `on_sync_done(error)`.
        """

    def sync(self) -> None:
        """Make every record appended so far durable before returning (inline)."""

    def truncate_before(self, seq: int) -> None:
        """Delete durable records before `seq` (a durable snapshot covers them)."""

    def write_snapshot(self, index: int, data: list) -> None:
        """Start writing snapshot file `index` from its pieces, durably (written to a
        temporary name, synced, renamed); report through `on_snapshot_written`."""

    def read_snapshot(self, index: int) -> None:
        """Start reading snapshot file `index`; report through `on_snapshot_read`."""

    def write_incoming(self, peer: int, offset: int, data: bytes) -> None:
        """Start writing `data` at `offset` of the incoming file from `peer` (offset 0
        starts the file afresh; need not be durable); report through
        `on_incoming_written`.  The node never has two of these in flight per peer."""

    def read_incoming(self, peer: int) -> None:
        """Start reading the whole incoming file from `peer`; report through
        `on_incoming_read`."""

    def discard_incoming(self, peer: int) -> None:
        """Delete the incoming file from `peer`, if any (never waits)."""


class Transport(Protocol):
    """Where the node's messages go.  Sends queue; `flush` lets them leave.

    The node flushes at the end of every `drive` (and wherever it holds nothing back):
    a runner may send at once instead of queueing.
    """

    def send(self, peer: int, message: tuple) -> None:
        """Queue a message for a peer (it may be dropped: the core resends what matters)."""

    def reply(self, conn: Any, reply: list) -> None:
        """Queue a reply (`cypaxos.wire` ok/redirect/error) to a client connection."""

    def backlog(self, conn: Any) -> int:
        """Bytes of replies queued for `conn` and not yet sent (0 if unknown)."""

    def flush(self) -> None:
        """Write everything queued since the last flush."""


@dataclass
class NodeOptions:
    """How a node behaves around its core (no I/O settings: those are the runner's)."""

    replica_id: int
    cluster: dict  # replica id -> address (for redirects and status)
    cluster_id: str
    snapshot_bytes: int = 16 << 20   # snapshot once this much WAL was written since the last
    snapshot_slots: int = 100_000    # ... or once this many slots were applied since
    retain_slots: int = 64           # slots kept in memory after a snapshot for lagging peers
    follower_inline_sync: bool = True
    drive_lone_requests: bool = True  # False: every request waits for the driver (transcripts)
    chunk_bytes: int = 1 << 20        # snapshot transfer chunk
    chunk_ack_ticks: int = 200        # resend a chunk after this many ticks without an ack
    chunk_tries: int = 10             # unanswered chunks in a row before a transfer stops
    incoming_bytes_max: int = 1 << 34  # a snapshot transfer over this many bytes is refused
    log_interval_ticks: int = 6000    # a repeated warning is logged at most once per this
    status: dict = field(default_factory=dict)  # fixed status fields added by the runner
    # What one client may cost (replica.limits, docs/security.md "Limits").
    queries_per_read_max: int = QUERIES_PER_READ_MAX   # more in one read: too_large
    reply_bytes_max: int = REPLY_BYTES_MAX  # a read whose results pass this: too_large
    backlog_bytes_max: int = CLIENT_BUFFER_BYTES_MAX  # reads answered busy past this
    snapshot_requests_max: int = 0     # snapshot requests per window (0: no bound)
    snapshot_window_ticks: int = 6000  # the ticks of one minute: snapshot_requests_max's window
    check_invariants: bool = False    # assert the node's invariants after every drive (slow)
    fault: int = 0                    # test-only FAULT_* bits; never set in production
