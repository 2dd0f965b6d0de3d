"""Serving a backup: the bytes of a snapshot file, chunk by chunk, to one client.

`cypaxos backup` asks the leader for ``["backup", id]``; the node (`ReplicaNode`)
answers with the index of a snapshot taken at a linearizable point (a read-index
round first, then a snapshot at or past it).  The client then pulls that snapshot
file with ``["backup_read", id, index, offset]`` requests, answered here, in the
connection's own task, by ``{"index", "offset", "total", "data"}`` replies of at most
`BACKUP_CHUNK_BYTES`.

Bounded on the replica: the file is read with `pread` in a worker thread one chunk
at a time per connection (the connection's next request is not read before the
chunk is queued), a connection whose unsent replies pass `BACKUP_QUEUED_BYTES_MAX`
is answered ``busy`` instead of with more data, and at most `BACKUPS_MAX` snapshot
files are held open for backups at once.  The file is opened at the first request
for it and held open until the connection ends or asks for another index, so a
newer snapshot pruning it meanwhile (only the two newest are kept) does not cut the
backup short: an unlinked file stays readable while open.  A request for a snapshot
that is already gone is answered ``not_found`` (the client asks for a new backup).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import trio

from .. import wire

if TYPE_CHECKING:
    from .outbox import Conn
    from .server import ReplicaServer

__all__ = ["BackupReader", "BACKUP_CHUNK_BYTES", "BACKUP_QUEUED_BYTES_MAX", "BACKUPS_MAX"]

BACKUP_CHUNK_BYTES = 1 << 20
"""Bytes of snapshot file per backup_read reply (the last one may be shorter)."""
BACKUP_QUEUED_BYTES_MAX = 8 << 20
"""A connection with more reply bytes waiting to be sent than this gets ``busy``."""
BACKUPS_MAX = 8
"""Snapshot files held open for backups at once, over every connection."""


class BackupReader:
    """The snapshot file one client connection is reading for a backup.

    Invariant: ``fd >= 0`` exactly while `index` names the file it reads, and then
    it counts in the server's `backup_files_open`.
    """

    def __init__(self, server: "ReplicaServer") -> None:
        self.server = server
        self.index = 0
        self.total = 0
        self.fd = -1

    async def answer(self, conn: "Conn", request: tuple) -> None:
        """Queue the reply to one ``("backup_read", id, index, offset)`` request."""
        _, request_id, index, offset = request
        reply = self.server.node.transport.reply
        if conn.queued_bytes > BACKUP_QUEUED_BYTES_MAX:   # the writer's share too
            reply(conn, wire.error(request_id, "busy", "replies are waiting to be read"))
            return
        if index != self.index or self.fd < 0:
            refused = await self._open(index)
            if refused is not None:
                reply(conn, wire.error(request_id, *refused))
                return
        if offset > self.total:
            reply(conn, wire.error(request_id, "bad_request",
                                   f"offset {offset} is past the end of snapshot {index} "
                                   f"({self.total} bytes)"))
            return
        length = min(BACKUP_CHUNK_BYTES, self.total - offset)
        fd = self.fd
        try:
            data = await trio.to_thread.run_sync(_pread_all, fd, length, offset)
        except OSError as exc:
            reply(conn, wire.error(request_id, "busy",
                                   f"cannot read snapshot {index}: {exc.strerror or exc}"))
            return
        reply(conn, wire.ok(request_id, {"index": index, "offset": offset,
                                         "total": self.total, "data": data}))

    async def _open(self, index: int) -> Optional[tuple[str, str]]:
        """Open snapshot file `index` in place of the one held; None, or the
        (code, message) of the refusal."""
        self.close()
        server = self.server
        if server.backup_files_open >= BACKUPS_MAX:
            return "busy", f"{BACKUPS_MAX} backups are running; try again later"
        path = server.storage.snapshot_store.file_path(index)
        server.backup_files_open += 1   # counted before the await: no race past the bound
        try:
            fd, total = await trio.to_thread.run_sync(_open_file, path)
        except FileNotFoundError:
            server.backup_files_open -= 1
            return "not_found", f"snapshot {index} is not on this replica (any more)"
        except OSError as exc:
            server.backup_files_open -= 1
            return "busy", f"cannot open snapshot {index}: {exc.strerror or exc}"
        self.fd, self.index, self.total = fd, index, total
        return None

    def close(self) -> None:
        """Let the file go (the connection ended, or asks for another)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.server.backup_files_open -= 1
            os.close(fd)


def _open_file(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset` (the file does not change: a snapshot file is
    written whole before it gets its name)."""
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            raise OSError(f"snapshot file ended {length} bytes early")
        parts.append(data)
        length -= len(data)
        offset += len(data)
    return b"".join(parts)
