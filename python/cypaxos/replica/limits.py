"""What one client may cost a replica: the bounds of docs/security.md ("Limits").

Each bound is a `cypaxos serve` flag (`ServerOptions`); the defaults are here, with
why they are what they are.  Where each is enforced:

* queries per read, bytes per reply, reply bytes buffered per connection, snapshot
  requests per minute: the node's read and snapshot paths (`ReplicaNode`, through
  `NodeOptions`: counted in ticks and bytes, no clock);
* frames and bytes buffered per connection (the hard cut-off), idle and
  partial-frame timeouts: the connection's own task (`cypaxos.replica.clients`).

An exhausted bound refuses that client (an error reply, or its connection closed),
never the replica.
"""
from __future__ import annotations

__all__ = ["IDLE_TIMEOUT_S", "FRAME_TIMEOUT_S", "REPLY_BYTES_MAX", "REPLY_BYTES_LIMIT",
           "QUERIES_PER_READ_MAX", "CLIENT_BUFFER_BYTES_MAX",
           "SNAPSHOT_REQUESTS_PER_MINUTE", "CLIENT_QUEUE_MAX", "hard_buffer_bytes",
           "watch_period"]

IDLE_TIMEOUT_S = 300.0
"""A client connection with no request in flight on which nothing arrived and no
reply went out for this long is closed (one that stopped reading a backlog of
replies too: progress is counted per MiB sent).  The project's client keeps its connection open while idle (no
keepalives) and, when a replica closes it, redials at its next call and resends what
was unanswered: an idle close costs it one reconnect, never a failed call.  Five
minutes is long enough that a client calling even once a minute never reconnects,
and short enough that connections of vanished hosts (which send no FIN; TCP
keepalive would take two hours) do not hold a slot of the connection cap for long."""

FRAME_TIMEOUT_S = 30.0
"""A request frame whose first bytes arrived must be complete within this: a 16 MiB
frame needs about 560 KB/s.  Past it the connection is closed (a slow sender holding
a buffer of up to the frame limit, or a half-sent frame never finished)."""

REPLY_BYTES_MAX = 16 << 20
"""A read whose results add up to more than this is refused with ``too_large`` before
the rest are built (the client then asks in halves, down to the one query).  Equal
to the request frame limit, so every value that could be written can be read back
alone; a quarter of the client's reply frame limit (`cypaxos.client.connection.
REPLY_FRAME_BYTES_MAX`, 64 MiB), which leaves room for the encoding of many results."""

REPLY_BYTES_LIMIT = 32 << 20
"""The largest ``--reply-bytes-max`` accepted: half the client's reply frame limit, so
a reply of that many bytes of results plus its encoding still decodes."""

QUERIES_PER_READ_MAX = 4096
"""Queries one read request may carry (``too_large`` past it, checked before any is
answered): the client's own `SessionSettings.batch_commands_max`, so its requests
never hit it; it bounds the work one request frame can ask for (a 16 MiB frame holds
about a million empty queries)."""

CLIENT_BUFFER_BYTES_MAX = 32 << 20
"""Reply bytes queued for one connection that its socket has not taken: past this a
read is answered ``busy`` instead of being evaluated (the client backs off and asks
again), and a connection whose queue passes it by more than one largest reply
(`hard_buffer_bytes`) is cut off.  A client reading at network speed stays far
below it; one that stops reading costs the replica at most this plus one reply."""

SNAPSHOT_REQUESTS_PER_MINUTE = 6
"""``snapshot`` requests (`cypaxos snapshot`) one replica accepts per minute, over all
clients; more are answered ``busy``.  Each may write the whole state to disk."""

CLIENT_QUEUE_MAX = 65536
"""Replies waiting for one client (frames) before it is cut off."""


def hard_buffer_bytes(buffer_bytes_max: int, reply_bytes_max: int) -> int:
    """Unsent reply bytes at which a connection is cut off: reads stop being answered
    at `buffer_bytes_max`, so only the last reply answered below it (at most
    `reply_bytes_max` of results, plus their encoding) and small non-read replies
    may pass it; nor may a backup's reads, which stop at their own bound
    (`replica.backup`), reach it."""
    from .backup import BACKUP_CHUNK_BYTES, BACKUP_QUEUED_BYTES_MAX

    return max(buffer_bytes_max + reply_bytes_max,
               BACKUP_QUEUED_BYTES_MAX + BACKUP_CHUNK_BYTES) + (1 << 20)


def watch_period(idle_timeout_s: float, frame_timeout_s: float) -> float:
    """How often a connection's watchdog looks at its counters: a quarter of the
    shorter timeout, so either fires at most half of that timeout late."""
    return min(idle_timeout_s, frame_timeout_s) / 4
