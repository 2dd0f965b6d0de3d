"""Serving one client connection: requests into the node, replies out through the
connection's `Conn` (written by the node's flushes, the rest by a writer task)."""
from __future__ import annotations

import trio

from .. import wire
from .backup import BackupReader
from .framing import read_frames
from .outbox import Conn

__all__ = ["serve_client", "CLIENT_QUEUE_MAX"]

CLIENT_QUEUE_MAX = 65536  # replies waiting for one client before it is cut off


async def serve_client(server, stream: trio.abc.Stream, decoder: wire.FrameDecoder,
                       name: str) -> None:
    """Answer a client's requests until it closes the connection or misbehaves."""
    node = server.node
    flush = node.transport.flush
    conn = Conn(name, CLIENT_QUEUE_MAX)   # the welcome went out with the handshake
    failure = None
    backup = None   # a BackupReader, once the client reads a backup

    async def write_replies():
        try:
            await conn.run_writer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            conn.closed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_replies)
        try:
            async for frame in read_frames(stream, decoder):
                if conn.closed:
                    break
                request = wire.parse_client_request(frame)
                if request[0] == "backup_read":   # file I/O: the shell's, not the node's
                    backup = backup or BackupReader(server)
                    await backup.answer(conn, request)
                else:
                    node.on_client_request(conn, request)
                flush()   # replies given at once (redirects, stale reads, ...)
        except (wire.ProtocolError, OSError, trio.BrokenResourceError) as exc:
            # Raised after the nursery, so it is not wrapped in an exception group.
            failure = exc
        finally:
            if backup is not None:
                backup.close()
            # Replies already queued still go out (the client may only have
            # half-closed), for at most a second.
            conn.close()
            nursery.cancel_scope.deadline = trio.current_time() + 1
    if failure is not None:
        raise failure
