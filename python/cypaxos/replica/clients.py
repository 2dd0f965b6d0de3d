"""Serving one client connection: requests into the node, replies out through the
connection's `Conn` (written by the node's flushes, the rest by a writer task).

Bounded (`cypaxos.replica.limits`, docs/security.md "Limits"): the `Conn` holds at
most `CLIENT_QUEUE_MAX` frames and `limits.hard_buffer_bytes` bytes of unsent
replies (past either the client is cut off), and a watchdog task closes the
connection once it has been idle (no request in flight, nothing received, no reply
bytes sent) for `client_idle_timeout_s`, or once a request frame has been incomplete for
`frame_timeout_s`.  The watchdog wakes a few times per timeout and compares
counters the reading loop bumps: the hot path reads no clock.
"""
from __future__ import annotations

import math

import trio

from .. import wire
from .backup import BackupReader
from .framing import RECEIVE_BYTES
from .limits import CLIENT_QUEUE_MAX, hard_buffer_bytes, watch_period
from .outbox import Conn

__all__ = ["serve_client", "CLIENT_QUEUE_MAX"]


class _Reading:
    """What the reading loop tells the watchdog: counters, never a clock."""

    __slots__ = ("received", "waiting", "expired")

    def __init__(self) -> None:
        self.received = 0      # reads that returned bytes
        self.waiting = False   # in receive_some: whatever the decoder holds is a torn frame
        self.expired = ""      # why the watchdog closed the connection ("idle", "frame")


async def _watch(conn: Conn, decoder: wire.FrameDecoder, reading: _Reading,
                 idle_s: float, frame_s: float, reader: trio.CancelScope) -> None:
    """Cancel `reader` once the connection was idle for `idle_s` or a frame has been
    incomplete for `frame_s` (each noticed within half the shorter timeout), or once
    the connection was closed under it (a client cut off)."""
    period = watch_period(idle_s, frame_s)
    now = trio.current_time()
    seen = (-1, -1, -1)       # the activity counters at their last change
    quiet_since = now
    torn_at = -1              # requests read when the torn frame was first seen
    torn_since = math.inf
    while True:
        await trio.sleep(period)
        if conn.closed:
            # Cut off (it did not read its replies) or its socket failed: the reader
            # may be waiting for bytes that never come.
            reading.expired = "cut_off" if conn.cut_off else ""
            reader.cancel()
            return
        now = trio.current_time()
        if reading.waiting and decoder.buffered:
            if torn_at != conn.requests:
                torn_at, torn_since = conn.requests, now
            elif now - torn_since >= frame_s:
                reading.expired = "frame"
                reader.cancel()
                return
        else:
            torn_at, torn_since = -1, math.inf
        # Bytes in, replies queued, or queued replies going out (a slow reader
        # draining a backlog is not idle; one that stopped reading is).
        activity = (reading.received, conn.replies, conn.queued_bytes)
        if activity != seen:
            seen, quiet_since = activity, now
        elif conn.requests <= conn.replies and now - quiet_since >= idle_s:
            reading.expired = "idle"
            reader.cancel()
            return


async def serve_client(server, stream: trio.abc.Stream, decoder: wire.FrameDecoder,
                       name: str) -> None:
    """Answer a client's requests until it closes the connection, misbehaves, or
    exhausts one of its bounds."""
    node = server.node
    options = server.options
    flush = node.transport.flush
    # The welcome went out with the handshake.
    conn = Conn(name, CLIENT_QUEUE_MAX,
        hard_buffer_bytes(options.client_buffer_bytes_max, options.reply_bytes_max))
    failure = None
    backup = None   # a BackupReader, once the client reads a backup
    reading = _Reading()

    async def write_replies():
        try:
            await conn.run_writer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            conn.closed = True

    reader = trio.CancelScope()
    watcher = trio.CancelScope()

    async def watch():
        with watcher:
            await _watch(conn, decoder, reading, options.client_idle_timeout_s,
                         options.frame_timeout_s, reader)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_replies)
        nursery.start_soon(watch)
        try:
            with reader:
                while not conn.closed:
                    # Frames that arrived with an earlier read (a hello and the first
                    # request in one packet, say) come out before we wait for more.
                    while (frame := decoder.next_frame()) is not None:
                        if conn.closed:
                            break
                        conn.requests += 1
                        request = wire.parse_client_request(frame)
                        if request[0] == "backup_read":   # file I/O: the shell's, not the node's
                            backup = backup or BackupReader(server)
                            await backup.answer(conn, request)
                        else:
                            node.on_client_request(conn, request)
                        flush()   # replies given at once (redirects, stale reads, ...)
                    if conn.closed:
                        break
                    reading.waiting = True
                    data = await stream.receive_some(RECEIVE_BYTES)
                    reading.waiting = False
                    if not data:
                        if decoder.buffered:
                            raise wire.ProtocolError(
                                "connection closed in the middle of a frame")
                        break
                    reading.received += 1
                    decoder.feed(data)
        except (wire.ProtocolError, OSError, trio.BrokenResourceError) as exc:
            # Raised after the nursery, so it is not wrapped in an exception group.
            failure = exc
        finally:
            watcher.cancel()
            if backup is not None:
                backup.close()
            # Replies already queued still go out (the client may only have
            # half-closed), for at most a second.
            conn.close()
            nursery.cancel_scope.deadline = trio.current_time() + 1
    if failure is not None:
        raise failure
    why = reading.expired or ("cut_off" if conn.cut_off else "")
    if why:
        _expired(server, name, why)


def _expired(server, name: str, why: str) -> None:
    """Count and log (once a minute per host and kind) a connection the watchdog
    closed."""
    host = name.rpartition(":")[0] or name
    options = server.options
    if why == "cut_off":   # counted as client_drops where it was cut off
        server.limited_log.warning(("client_cut_off", host),
                                   "dropped client connection %s: it did not read its "
                                   "replies (%d frames or --client-buffer-bytes-max bytes "
                                   "were waiting)", name, CLIENT_QUEUE_MAX)
    elif why == "idle":
        server.node.stats["client_idle_timeouts"] += 1
        server.limited_log.info(("client_idle", host),
                                "closed client connection %s: idle for %g s "
                                "(--client-idle-timeout-s)", name,
                                options.client_idle_timeout_s)
    else:
        server.node.stats["client_frame_timeouts"] += 1
        server.limited_log.warning(("client_frame_timeout", host),
                                   "dropped client connection %s: a request frame was not "
                                   "complete within %g s (--frame-timeout-s)", name,
                                   options.frame_timeout_s)
