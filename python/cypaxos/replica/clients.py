"""Serving one client connection: requests into the node, replies out through the
connection's `Conn` (written by the node's flushes, the rest by a writer task)."""
from __future__ import annotations

import trio

from .. import wire
from .framing import read_frames
from .outbox import Conn

__all__ = ["serve_client", "CLIENT_QUEUE_MAX"]

CLIENT_QUEUE_MAX = 65536  # replies waiting for one client before it is cut off


async def serve_client(server, stream: trio.SocketStream, decoder: wire.FrameDecoder,
                       name: str) -> None:
    """Answer a client's requests until it closes the connection or misbehaves."""
    node = server.node
    flush = node.transport.flush
    conn = Conn(name, CLIENT_QUEUE_MAX)
    conn.put(wire.encode_frame(wire.welcome(server.cluster_id, server.replica_id)))
    failure = None

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
                node.on_client_request(conn, wire.parse_client_request(frame))
                flush()   # replies given at once (redirects, stale reads, ...)
        except (wire.ProtocolError, OSError, trio.BrokenResourceError) as exc:
            # Raised after the nursery, so it is not wrapped in an exception group.
            failure = exc
        finally:
            # Replies already queued still go out (the client may only have
            # half-closed), for at most a second.
            conn.close()
            nursery.cancel_scope.deadline = trio.current_time() + 1
    if failure is not None:
        raise failure
