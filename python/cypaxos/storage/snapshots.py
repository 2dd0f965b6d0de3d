"""Snapshot files in a data dir: format, atomic writes, loading and pruning.

A snapshot file is `magic | u32 crc32c(body) | u64 body length | body`, the body being
CBOR `[format, cluster_id, index, promised, sessions, state]` (see
`cypaxos.core.Replica.snapshot`).  Files are written to a temporary name, fsynced,
renamed to `snapshot-<index>.snap` and the directory fsynced, so a crash leaves either
the old set of snapshots or the new one, never a half-written file under a final name.
The WAL is truncated only once a snapshot is durable, so the newest snapshot may be
the only copy of what it covers: a damaged one stops the replica with a clear error
rather than be skipped.

A snapshot being received from a peer is written to `incoming-<peer>.part` in the same
directory, chunk by chunk (bounded memory); it is read back and verified before it is
written as a snapshot file.  Incoming files are never durable: one left by a crash is
deleted at open, and the transfer starts over.
"""
from __future__ import annotations

import os
import re
import struct

import cbor2
import google_crc32c

from .. import cborenc
from ..errors import StorageError
from .files import fsync_dir

MAGIC = b"CYPXSNP1"
FORMAT = 1
HEADER = struct.Struct("<8sIQ")
SNAPSHOT_DIR = "snapshots"
KEEP = 2  # the newest snapshot and the one before it
_NAME = re.compile(r"^snapshot-(\d{20})\.snap$")


class SnapshotCorruptError(StorageError):
    """A snapshot file fails its checksum or does not decode."""


def encode(cluster_id: str, snapshot: tuple) -> bytes:
    """A snapshot tuple `(index, promised, sessions, state)` as file bytes."""
    return b"".join(encode_parts(cluster_id, snapshot))


def encode_parts(cluster_id: str, snapshot: tuple) -> list[bytes]:
    """`encode`'s bytes in pieces whose last is the state itself, not a copy of it.

    The state is most of a snapshot (megabytes, several times a second under heavy
    writes): the body is the CBOR of everything else, with the state's byte string
    header in place of an empty one, and the file is written from the pieces.
    """
    index, promised, sessions, state = snapshot
    if type(state) is not bytes:
        state = bytes(state)
    head = cborenc.dumps([FORMAT, cluster_id, index, promised, sessions, b""])
    # An empty byte string is the one byte 0x40 (major type 2, length 0), at the end.
    head = head[:-1] + cborenc.bytes_header(len(state))
    crc = google_crc32c.extend(google_crc32c.value(head), state)
    return [HEADER.pack(MAGIC, crc, len(head) + len(state)), head, state]


def decode(data: bytes, cluster_id: str, origin: str = "snapshot") -> tuple:
    """File bytes -> `(index, promised, sessions, state)`; SnapshotCorruptError if bad
    (or of another cluster than `cluster_id`)."""
    cluster, snapshot = decode_any(data, origin)
    if cluster != cluster_id:
        raise SnapshotCorruptError(f"{origin} belongs to cluster {cluster!r}, not {cluster_id!r}")
    return snapshot


def decode_any(data: bytes, origin: str = "snapshot") -> tuple[str, tuple]:
    """File bytes of any cluster's snapshot (a backup) -> `(cluster_id, (index,
    promised, sessions, state))`; SnapshotCorruptError if bad."""
    if len(data) < HEADER.size:
        raise SnapshotCorruptError(f"{origin} is truncated ({len(data)} bytes)")
    magic, crc, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotCorruptError(f"{origin} is not a cypaxos snapshot")
    body = data[HEADER.size:]
    if len(body) != length:
        raise SnapshotCorruptError(f"{origin} holds {len(body)} body bytes, expected {length}")
    if google_crc32c.value(body) != crc:
        raise SnapshotCorruptError(f"{origin} fails its checksum")
    try:
        fmt, cluster, index, promised, sessions, state = cbor2.loads(body)
    except Exception as exc:
        raise SnapshotCorruptError(f"{origin} does not decode: {exc}") from None
    if fmt != FORMAT:
        raise SnapshotCorruptError(f"{origin} has format {fmt}, this version reads {FORMAT}")
    if (type(cluster) is not str or type(index) is not int or type(promised) is not int
            or type(sessions) is not list or type(state) is not bytes or index < 0):
        raise SnapshotCorruptError(f"{origin} does not hold a snapshot's fields")
    return cluster, (index, promised, sessions, state)


def decode_unchecked(data: bytes) -> tuple:
    """File bytes -> `(index, promised, sessions, state)` with no checksum, size or
    cluster check.  Only for the test-only fault that installs unverified snapshots
    (`cypaxos.replica.node.FAULT_INSTALL_UNVERIFIED`); never use it otherwise."""
    _, _, index, promised, sessions, state = cbor2.loads(data[HEADER.size:])
    return index, promised, sessions, state


class SnapshotStore:
    """The `snapshots/` directory of one data dir."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, SNAPSHOT_DIR)
        try:
            if not os.path.isdir(self.path):
                os.makedirs(self.path, exist_ok=True)
                fsync_dir(data_dir)
            for name in os.listdir(self.path):
                # A write a crash interrupted, or a transfer that must start over.
                if name.endswith(".tmp") or name.endswith(".part"):
                    os.unlink(os.path.join(self.path, name))
        except OSError as exc:
            raise StorageError(f"cannot use the snapshot directory {self.path}: "
                               f"{exc.strerror or exc}") from None

    def indexes(self) -> list[int]:
        """Indexes of the snapshot files present, oldest first."""
        found = []
        for name in os.listdir(self.path):
            m = _NAME.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def file_path(self, index: int) -> str:
        return os.path.join(self.path, f"snapshot-{index:020d}.snap")

    def latest_index(self) -> int:
        """The newest snapshot's index, 0 if there is none."""
        found = self.indexes()
        return found[-1] if found else 0

    def read(self, index: int) -> bytes:
        with open(self.file_path(index), "rb") as f:
            return f.read()

    def load_latest(self, cluster_id: str) -> tuple | None:
        """The newest snapshot, or None.  Raises SnapshotCorruptError if it is damaged."""
        index = self.latest_index()
        if not index:
            return None
        path = self.file_path(index)
        snapshot = decode(self.read(index), cluster_id, path)
        if snapshot[0] != index:
            raise SnapshotCorruptError(f"{path} holds index {snapshot[0]}")
        return snapshot

    def write(self, index: int, data) -> str:
        """Write a snapshot file atomically and durably; prune old ones.  Blocking.

        `data` is the file's bytes, or a list of pieces of them (`encode_parts`).
        Raises StorageError if the file cannot be written (a read-only directory, a
        full disk, EIO): the replica stops rather than run on without snapshots.
        """
        try:
            return self._write(index, data)
        except OSError as exc:
            raise StorageError(f"cannot write snapshot file {self.file_path(index)}: "
                               f"{exc.strerror or exc}") from None

    def _write(self, index: int, data) -> str:
        final = self.file_path(index)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in ([data] if isinstance(data, (bytes, bytearray, memoryview))
                         else data):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(self.path)
        for old in self.indexes()[:-KEEP]:
            os.unlink(self.file_path(old))
        return final

    def incoming_path(self, peer: int) -> str:
        """The file a snapshot from replica `peer` is received into."""
        return os.path.join(self.path, f"incoming-{peer}.part")

    def write_incoming(self, peer: int, offset: int, data: bytes) -> None:
        """Write `data` at `offset` of the incoming file (0: start it afresh).  Blocking;
        not durable (the received file is verified and written as a snapshot)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(self.incoming_path(peer), flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        finally:
            os.close(fd)

    def read_incoming(self, peer: int) -> bytes:
        """The whole incoming file from `peer`.  Blocking."""
        with open(self.incoming_path(peer), "rb") as f:
            return f.read()

    def discard_incoming(self, peer: int) -> None:
        """Delete the incoming file from `peer`, if there is one."""
        try:
            os.unlink(self.incoming_path(peer))
        except FileNotFoundError:
            pass

    def total_bytes(self) -> int:
        """Bytes used by the snapshot files."""
        return sum(os.path.getsize(self.file_path(i)) for i in self.indexes())
