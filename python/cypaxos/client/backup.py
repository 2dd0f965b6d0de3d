"""`Client.backup(path)`: a consistent copy of a cluster's state, streamed to a file.

1. Ask a replica for ``["backup", id]`` on a connection of its own, following
   redirects to the leader.  The leader confirms a linearizable read (so every write
   acknowledged before now is applied) and answers with the index of a snapshot file
   taken at or past that point.
2. Pull the file with ``["backup_read", id, index, offset]``, a few chunks in flight,
   writing each one as it arrives to a temporary file beside `path` (the client never
   holds more than those chunks) and checking it as it goes: the snapshot file
   format's magic, its body length, and the CRC32C of the body.
3. fsync the temporary file, rename it to `path` (replacing a file there), fsync the
   directory.  A failure leaves `path` as it was and no temporary file behind.

If the snapshot is pruned on the replica before the first chunk was read (two newer
snapshots in between), the backup starts over, a few times at most.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

import google_crc32c
import trio

from .. import wire
from ..errors import ClientError, RequestError, StorageError, UnavailableError
from ..storage import snapshots
from ..storage.files import fsync_dir
from .connection import PLAIN, Credentials, DialError, describe, dial

__all__ = ["BackupInfo", "backup_to_file", "BACKUP_WINDOW"]

BACKUP_WINDOW = 4
"""backup_read requests in flight at once."""
_RESTARTS_MAX = 3          # a pruned snapshot starts the backup over, this often at most
_BACKOFF_S = (0.05, 0.5)   # between tries of a replica that knows no leader
_RECEIVE_BYTES = 1 << 16


@dataclass(frozen=True)
class BackupInfo:
    """A backup `backup_to_file` wrote."""

    path: str          #: the file, absolute
    index: int         #: the slot the state is at
    size_bytes: int    #: the file's size
    cluster_id: str    #: the cluster it was taken of
    replica_id: int    #: the replica (the leader) that sent it


class _Gone(Exception):
    """The snapshot was pruned before its first byte was read: start over."""


class _Link:
    """One connection to a replica, after the welcome."""

    def __init__(self, address: str, stream: trio.abc.Stream, cluster_id: str,
                 replica_id: int, decoder: wire.FrameDecoder) -> None:
        self.address = address
        self.stream = stream
        self.cluster_id = cluster_id
        self.replica_id = replica_id
        self.decoder = decoder
        self.next_id = 1

    async def send(self, body: list[Any]) -> int:
        request_id = self.next_id
        self.next_id += 1
        body[1] = request_id
        await self.stream.send_all(wire.encode_frame(body))
        return request_id

    async def receive(self) -> tuple[Any, ...]:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                reply: tuple[Any, ...] = wire.parse_reply(frame)
                return reply
            data = await self.stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("the replica closed the connection")
            self.decoder.feed(data)


async def _dial(address: str, credentials: Credentials) -> _Link:
    # The client's one connection layer (TCP, TLS, the handshake); the caller bounds
    # the time.
    conn = await dial(address, timeout_s=math.inf, credentials=credentials)
    return _Link(address, conn.stream, conn.cluster_id, conn.replica_id, conn.decoder)


def _why(exc: BaseException) -> str:
    if isinstance(exc, (trio.TooSlowError, DialError, trio.BrokenResourceError)):
        return describe(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError) or isinstance(
            getattr(exc, "__cause__", None), ConnectionRefusedError):
        return "connection refused"
    return " ".join(str(exc).split()) or type(exc).__name__


async def _find_leader_snapshot(addresses: list[str], timeout: float,
                                credentials: Credentials) -> tuple[_Link, int]:
    """A link to the leader and the index of its snapshot at a linearizable point."""
    deadline = trio.current_time() + timeout
    order = list(addresses)
    start = random.randrange(len(order))
    order = order[start:] + order[:start]
    pending = list(order)
    tried: set[str] = set()   # this round's: a redirect back to one waits for the next
    problems: dict[str, str] = {}
    pause = _BACKOFF_S[0]
    while True:
        if not pending:
            if trio.current_time() + pause >= deadline:
                break
            await trio.sleep(pause)
            pause = min(pause * 2, _BACKOFF_S[1])
            pending = list(order)
            tried.clear()
        address = pending.pop(0)
        tried.add(address)
        link = None
        try:
            with trio.fail_after(max(0.0, deadline - trio.current_time())):
                link = await _dial(address, credentials)
                request_id = await link.send(wire.backup_request(0))
                while True:
                    reply = await link.receive()
                    if reply[1] == request_id:
                        break
        except (DialError, OSError, trio.BrokenResourceError, trio.TooSlowError,
                ValueError) as exc:
            problems[address] = _why(exc)   # wire.ProtocolError is a ValueError
            if link is not None:
                await trio.aclose_forcefully(link.stream)
            if trio.current_time() >= deadline:
                break
            continue
        if reply[0] == "ok":
            if type(reply[2]) is not int:
                await trio.aclose_forcefully(link.stream)
                raise ClientError(f"{address} answered a backup with {type(reply[2]).__name__}")
            if reply[2] < 1:
                await trio.aclose_forcefully(link.stream)
                raise RequestError("the cluster has applied nothing yet: there is nothing "
                                   "to back up")
            return link, reply[2]
        await trio.aclose_forcefully(link.stream)
        if reply[0] == "redirect":
            problems[address] = f"redirected to {reply[2]}" if reply[2] else "no leader"
            if reply[2] and reply[2] not in tried:
                if reply[2] in pending:
                    pending.remove(reply[2])
                pending.insert(0, reply[2])   # the leader it names is tried next
            continue
        code, message = reply[2], reply[3]
        if code == "busy":
            problems[address] = f"busy: {message}"
            continue
        raise RequestError(f"{address} refused the backup: {code}: {message}")
    detail = "; ".join(f"{a}: {why}" for a, why in problems.items())
    raise UnavailableError(f"no leader answered the backup within {timeout:g} s"
                           + (f" ({detail})" if detail else ""))


async def _stream(link: _Link, index: int, out: BinaryIO, name: str, timeout: float) -> int:
    """Pull snapshot `index` into the file object `out` (file `name`), checked;
    returns its size."""
    header_size = snapshots.HEADER.size
    head = b""
    crc = 0
    written = 0
    total: Optional[int] = None
    chunk = 0
    inflight: dict[int, int] = {}    # request id -> offset asked
    next_offset = 0
    arrived: dict[int, bytes] = {}   # offset -> data that came ahead of its turn

    async def ask() -> None:
        nonlocal next_offset
        request_id = await link.send(wire.backup_read_request(0, index, next_offset))
        inflight[request_id] = next_offset
        next_offset += chunk

    await ask()   # the first reply says the total and the chunk size
    while inflight:
        with trio.fail_after(timeout):
            reply = await link.receive()
        offset = inflight.pop(reply[1], None)
        if offset is None:
            continue
        if reply[0] != "ok":
            if reply[0] == "error" and reply[2] == "not_found" and written == 0:
                raise _Gone()
            what = f"{reply[2]}: {reply[3]}" if reply[0] == "error" else "a redirect"
            raise ClientError(f"{link.address} stopped the backup at byte {offset}: {what}",
                              maybe_applied=False)
        payload = reply[2]
        if (type(payload) is not dict or payload.get("index") != index
                or payload.get("offset") != offset or type(payload.get("data")) is not bytes
                or type(payload.get("total")) is not int):
            raise ClientError(f"{link.address} sent a malformed backup chunk")
        data = payload["data"]
        if total is None:
            total = payload["total"]
            chunk = len(data)
            if total < header_size or (chunk == 0 and total > 0):
                raise StorageError(f"snapshot {index} from {link.address} is truncated "
                                   f"({total} bytes)")
            next_offset = chunk
        elif payload["total"] != total:
            raise ClientError(f"{link.address} changed the backup's size mid-way")
        if len(data) != min(chunk, total - offset):
            raise ClientError(f"{link.address} sent a short backup chunk at byte {offset}")
        arrived[offset] = data
        while written in arrived:
            piece = arrived.pop(written)
            if written < header_size:
                head += piece[:header_size - written]
                body = piece[header_size - written:]
            else:
                body = piece
            crc = google_crc32c.extend(crc, body)
            await _file_op(name, out.write, piece)
            written += len(piece)
        while next_offset < total and len(inflight) < BACKUP_WINDOW:
            await ask()
    if total is None or written != total:
        raise ClientError(f"the backup from {link.address} ended at byte {written} of {total}")
    magic, want_crc, length = snapshots.HEADER.unpack(head)
    if magic != snapshots.MAGIC or length != total - header_size or crc != want_crc:
        raise StorageError(f"the backup from {link.address} fails its checks (magic, "
                           "length or CRC32C): nothing was written")
    return total


async def _file_op(name: str, op: Callable[..., object], *args: Any) -> None:
    """`op(*args)` in a worker thread; an OSError becomes a StorageError naming `name`."""
    try:
        await trio.to_thread.run_sync(op, *args)
    except OSError as exc:
        raise StorageError(f"cannot write backup file {name}: {exc.strerror or exc}") from None


async def backup_to_file(addresses: list[str], path: str, *, timeout: float,
                         credentials: Credentials = PLAIN) -> BackupInfo:
    """Back the cluster at `addresses` up to `path` (see the module doc).

    `timeout` bounds each step (finding the leader and its snapshot, each chunk), not
    the whole transfer; `credentials` are the client's (TLS, token).  Raises UnavailableError (no leader answered), ClientError or
    RequestError (the replica stopped or refused the backup), StorageError (the file
    cannot be written, or what arrived fails its checks).
    """
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    for _ in range(_RESTARTS_MAX + 1):
        link, index = await _find_leader_snapshot(addresses, timeout, credentials)
        try:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                           suffix=".tmp", dir=directory)
            except OSError as exc:
                raise StorageError(f"cannot write a backup in {directory}: "
                                   f"{exc.strerror or exc}") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    size = await _stream(link, index, out, tmp, timeout)
                    await _file_op(tmp, out.flush)
                    await _file_op(tmp, os.fsync, out.fileno())
                await _file_op(target, os.replace, tmp, target)
                await _file_op(directory, fsync_dir, directory)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except _Gone:
            continue
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError) as exc:
            raise ClientError(f"the backup from {link.address} failed: {_why(exc)}") from None
        finally:
            await trio.aclose_forcefully(link.stream)
        return BackupInfo(target, index, size, link.cluster_id, link.replica_id)
    raise UnavailableError(f"the leader's snapshot was replaced {_RESTARTS_MAX + 1} times "
                           "before it could be read; try again")

