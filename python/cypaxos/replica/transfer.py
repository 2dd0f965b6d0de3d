"""Snapshot transfer between two replicas, as sans-I/O state machines.

Theory of operation
-------------------
A replica whose peer needs slots it has compacted away streams its latest snapshot
file to that peer in chunks, one chunk in flight at a time:

    sender                                  receiver
    SNAPSHOT_CHUNK(index, offset, total, data)  ->
                                            <-  SNAPSHOT_ACK(index, next_offset)

The receiver acknowledges the bytes it *holds* (written to its incoming file), so
the ack says where the next chunk starts: after a lost chunk or a lost ack the sender
resends from there (resume), and an ack that goes backwards (to 0) means the receiver
restarted the transfer (it holds another snapshot's bytes, or the one it had failed
verification).  An ack of `total` means "done, or no longer needed: stop".

* The sender (`SnapshotSender`) resends its chunk after `ack_timeout_ticks` ticks
  without an answer and gives up after `tries` unanswered chunks in a row (the core
  asks again later if the peer still needs a snapshot) or `tries` restarts.
* The receiver (`SnapshotReceiver`, one per sending peer, so that transfers from two
  peers compete without mixing bytes) never buffers more than one chunk: bytes go to
  an incoming file in the data dir, one write at a time, and are acknowledged once
  written.  A transfer whose `total` is over `total_bytes_max` is refused (acked as
  done, counted).  A chunk for a newer snapshot restarts the transfer from 0; a
  chunk for an older one is answered "done".  Once every byte is written the file is
  read back and verified by the node (checksum, cluster id, the state decodes) before
  it is written durably as a snapshot and installed; a file that fails is discarded
  and the transfer restarts from 0.

Both classes do no I/O: they return what to do (`Chunk` to send, `Ack` to send,
`Write` to start) and are told what happened (`on_ack`, `on_tick`, `on_written`).
The node (`cypaxos.replica.node`) owns them and carries out their outputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

__all__ = ["Chunk", "Ack", "Write", "Verify", "SnapshotSender", "SnapshotReceiver",
           "TransferError"]


class TransferError(ValueError):
    """A chunk that no honest sender produces (it runs past `total`)."""


class Chunk(NamedTuple):
    """Send SNAPSHOT_CHUNK(index, offset, total, data)."""

    index: int
    offset: int
    total: int
    data: bytes


class Ack(NamedTuple):
    """Send SNAPSHOT_ACK(index, next_offset)."""

    index: int
    next_offset: int


class Write(NamedTuple):
    """Write `data` at `offset` of the incoming file (offset 0 starts a new file)."""

    offset: int
    data: bytes


class Verify(NamedTuple):
    """Every byte is written: read the file back and verify it (`index`, `total`)."""

    index: int
    total: int


class SnapshotSender:
    """One snapshot file being streamed to one peer.

    `data` is the whole file (the sender's own snapshot, bounded by its state).
    """

    __slots__ = ("index", "data", "chunk_bytes", "ack_timeout_ticks", "tries",
                 "offset", "waited_ticks", "misses", "restarts", "done", "failed")

    def __init__(self, index: int, data: bytes, *, chunk_bytes: int,
                 ack_timeout_ticks: int, tries: int) -> None:
        if chunk_bytes < 1 or ack_timeout_ticks < 1 or tries < 1:
            raise ValueError("chunk_bytes, ack_timeout_ticks and tries must be positive")
        self.index = index
        self.data = data
        self.chunk_bytes = chunk_bytes
        self.ack_timeout_ticks = ack_timeout_ticks
        self.tries = tries
        # Invariant: 0 <= offset <= len(data); offset is where the chunk in flight starts.
        self.offset = 0
        self.waited_ticks = 0   # ticks since the chunk in flight was sent
        self.misses = 0         # chunks in a row that got no answer
        self.restarts = 0       # acks that sent us back to 0 after progress
        self.done = False       # the receiver has it (or no longer needs it)
        self.failed = False     # given up

    @property
    def total(self) -> int:
        """The file's size in bytes."""
        return len(self.data)

    @property
    def finished(self) -> bool:
        """Whether nothing more will be sent (done or given up)."""
        return self.done or self.failed

    def chunk(self) -> Chunk:
        """The chunk at the acknowledged offset (sent first, and again on a timeout)."""
        offset = self.offset
        self.waited_ticks = 0
        return Chunk(self.index, offset, len(self.data),
                     self.data[offset:offset + self.chunk_bytes])

    def on_ack(self, index: int, next_offset: int) -> Optional[Chunk]:
        """The receiver holds `next_offset` bytes of snapshot `index`: the next chunk,
        or None (finished, or an ack for another transfer or a stale one)."""
        if index != self.index or self.finished:
            return None
        if next_offset >= len(self.data):
            self.done = True
            return None
        if next_offset == self.offset:
            return None   # what is in flight (a duplicate ack, or one for a resent chunk)
        if next_offset < self.offset:
            if next_offset:
                return None   # a stale ack, overtaken by a later one
            # The receiver went back to 0: it restarted the transfer.
            self.restarts += 1
            if self.restarts >= self.tries:
                self.failed = True
                return None
        self.offset = next_offset
        self.misses = 0
        return self.chunk()

    def on_tick(self) -> Optional[Chunk]:
        """One tick passed: the chunk again after a timeout, else None."""
        if self.finished:
            return None
        self.waited_ticks += 1
        if self.waited_ticks < self.ack_timeout_ticks:
            return None
        self.misses += 1
        if self.misses >= self.tries:
            self.failed = True
            return None
        return self.chunk()


class SnapshotReceiver:
    """The incoming side of the transfer from one peer.

    State: the snapshot being received (`index`, `total`), how many bytes are written
    (`held`), and whether a write or the verification is under way.
    """

    __slots__ = ("index", "total", "held", "writing", "verifying", "total_bytes_max")

    # The smallest file a snapshot can be (its header); anything smaller is refused.
    TOTAL_BYTES_MIN = 20

    def __init__(self, total_bytes_max: int) -> None:
        self.total_bytes_max = total_bytes_max
        self.index = 0
        self.total = 0
        # Invariant: 0 <= held <= total; writing and verifying are never both set;
        # verifying implies held == total.
        self.held = 0
        self.writing = 0       # bytes of the write in flight (0: none)
        self.verifying = False

    @property
    def active(self) -> bool:
        """Whether a transfer is in progress (its incoming file exists)."""
        return self.total > 0

    def reset(self) -> None:
        """Forget the transfer (the caller discards its incoming file)."""
        self.index = self.total = self.held = self.writing = 0
        self.verifying = False

    def on_chunk(self, index: int, offset: int, total: int, data: bytes,
                 needed: bool) -> Union[Ack, Write, None]:
        """A chunk arrived; `needed` is False when snapshot `index` is no newer than
        what the replica already holds.

        Returns the Ack to send, the Write to start (its ack follows `on_written`), or
        None (a write or the verification is under way: the sender resends if need
        be).  Raises TransferError for a chunk that runs past its `total`.
        """
        if not needed or total > self.total_bytes_max or total < self.TOTAL_BYTES_MIN:
            if index == self.index and not (self.writing or self.verifying):
                self.reset()
            return Ack(index, total)   # done, or not wanted: stop sending
        if self.writing or self.verifying:
            return None
        if index != self.index or total != self.total:
            if index < self.index:
                return Ack(index, total)   # an older transfer than ours: stop it
            if offset != 0:
                return Ack(index, 0)       # start over: this is not the transfer we hold
            self.index, self.total, self.held = index, total, 0
        if offset != self.held or not data:
            return Ack(index, self.held)   # resume from what we hold
        if offset + len(data) > total:
            raise TransferError(f"snapshot chunk at {offset} of {len(data)} bytes runs past "
                                f"the snapshot's {total} bytes")
        self.writing = len(data)
        return Write(offset, data)

    def on_written(self) -> Union[Ack, Verify]:
        """The write in flight is on the incoming file: ack it, or verify the whole."""
        assert self.writing, "no write in flight"
        self.held += self.writing
        self.writing = 0
        if self.held < self.total:
            return Ack(self.index, self.held)
        self.verifying = True
        return Verify(self.index, self.total)

    def on_verified(self, ok: bool) -> Ack:
        """The verification ended: done (the snapshot is installed), or start over."""
        index, total = self.index, self.total
        self.reset()
        return Ack(index, total if ok else 0)
