"""The read side of a client's session: queued queries, read requests, splits.

Part of `cypaxos.client.session` (no I/O, no clock).  Queries never change anything,
so reads need no numbering: linearizable and stale ones wait in queues of their own,
go out batched (`["read", id, [query, ...], stale]`, at most
`inflight_reads_max` requests unanswered), and are resent after a reconnect under
fresh request ids, without the queries whose callers gave up.  A read the cluster
refuses ("too_large", "bad_request") is asked again in halves, which isolates one bad
query in about 2 * log2(n) requests; the query alone fails with RequestError.
"""
from __future__ import annotations

import collections
from typing import Callable

from .. import clientops as _ops
from .. import wire
from ..clientops import Op
from ..errors import RequestError

__all__ = ["Reads"]

_QUEUED, _SENT = _ops.QUEUED, _ops.SENT


def live(queue):
    """A copy of a queue of ops without its abandoned ones."""
    return collections.deque(op for op in queue if op.state == _QUEUED)


class Read:
    """A read request in flight (queries are idempotent: resent under fresh ids)."""

    __slots__ = ("ops", "stale", "request_id", "resend_due", "retries", "done")

    def __init__(self, ops, stale):
        self.ops = ops
        self.stale = stale
        self.request_id = 0
        self.resend_due = False
        self.retries = 0
        self.done = False


class Reads:
    """Queued and in-flight reads of one session.

    `register(read)` is the session's: it gives the read a request id on the current
    connection (and remembers which request it is).  `stats` is the session's counters.
    """

    def __init__(self, settings, stats: dict, register: Callable[[Read], int]) -> None:
        self._settings = settings
        self._stats = stats
        self._register = register
        self._queue = collections.deque()        # linearizable read ops not yet sent
        self._stale_queue = collections.deque()
        self._split = collections.deque()        # (ops, stale): halves of a refused read
        self._dead = 0          # abandoned reads left in the queues (at most)
        self.inflight: list = []   # Read, sent and unanswered
        # The largest single result seen lately: sizes requests.  It jumps up at once
        # and decays by 10% a reply, so one big result does not unbatch reads for good.
        self.result_max = 0.0

    # -- callers ---------------------------------------------------------------

    def room(self, stale: bool) -> int:
        """How many more queries the queue takes now."""
        return self._settings.queue_commands_max - len(
            self._stale_queue if stale else self._queue)

    def add(self, op: Op, stale: bool) -> None:
        """Queue one query (the caller marks it QUEUED)."""
        (self._stale_queue if stale else self._queue).append(op)
        self._stats["stale_reads" if stale else "reads"] += 1

    def add_many(self, ops: list, stale: bool) -> None:
        """Queue many queries (already QUEUED)."""
        (self._stale_queue if stale else self._queue).extend(ops)
        self._stats["stale_reads" if stale else "reads"] += len(ops)

    def forget(self, count: int) -> None:
        """`count` queued queries were abandoned by their callers.

        The queues are compacted once abandoned reads could be half of them
        (amortized O(1)).
        """
        self._dead += count
        if self._dead > 1024 and 2 * self._dead > len(self._queue) + len(self._stale_queue):
            self._queue = live(self._queue)
            self._stale_queue = live(self._stale_queue)
            self._dead = 0

    def waiting(self) -> bool:
        """Whether a caller waits on a read (abandoned ones are dropped on the way)."""
        self._queue = live(self._queue)
        self._stale_queue = live(self._stale_queue)
        self._dead = 0
        self._split = collections.deque(
            (ops, stale) for ops, stale in self._split if any(op.state == _SENT for op in ops))
        if self._queue or self._stale_queue or self._split:
            return True
        return any(op.state == _SENT for read in self.inflight for op in read.ops)

    def pending(self) -> list:
        """Every op a caller may wait on (to fail them all), then forget the queues."""
        ops = list(self._queue) + list(self._stale_queue)
        ops += [op for part, _ in self._split for op in part]
        ops += [op for read in self.inflight for op in read.ops]
        self._queue.clear()
        self._stale_queue.clear()
        self._split.clear()
        self._dead = 0
        return ops

    # -- requests --------------------------------------------------------------

    def cap(self) -> int:
        """Queries per request, so that replies stay near the reply budget."""
        settings = self._settings
        return max(1, min(settings.batch_commands_max,
                          int(settings.reply_budget_bytes // max(1.0, self.result_max))))

    def _body(self, read: Read) -> list:
        read.request_id = self._register(read)
        read.resend_due = False
        self._stats["read_requests"] += 1
        return wire.read_request(read.request_id, [op.payload for op in read.ops], read.stale)

    def resend(self, bodies: list, *, only_due: bool) -> None:
        """Append requests resending the reads in flight (`only_due`: those flagged):
        live queries only, in requests of the cap."""
        cap = self.cap()
        for read in [r for r in self.inflight if r.resend_due or not only_due]:
            live_ops = [op for op in read.ops if op.state == _SENT]
            if not live_ops:
                read.done = True
                self.inflight.remove(read)
                continue
            read.ops = live_ops
            self._stats["resent_reads"] += 1
            if len(live_ops) <= cap:
                bodies.append(self._body(read))
                continue
            read.done = True
            self.inflight.remove(read)
            for i in range(0, len(live_ops), cap):
                part = Read(live_ops[i:i + cap], read.stale)
                self.inflight.append(part)
                bodies.append(self._body(part))

    def collect(self, bodies: list) -> None:
        """Append requests for queued queries, while the window has room: linearizable
        ones in one request, stale ones in another, then halves of refused ones."""
        limit = self._settings.inflight_reads_max
        for queue, stale in ((self._queue, False), (self._stale_queue, True)):
            while queue and len(self.inflight) < limit:
                ops, _ = _ops.take(queue, self.cap(), self._settings.batch_bytes_max)
                if not ops:
                    break
                read = Read(ops, stale)
                self.inflight.append(read)
                bodies.append(self._body(read))
        while self._split and len(self.inflight) < limit:
            ops, stale = self._split.popleft()
            ops = [op for op in ops if op.state == _SENT]
            if ops:
                read = Read(ops, stale)
                self.inflight.append(read)
                bodies.append(self._body(read))

    # -- replies ---------------------------------------------------------------

    def answered(self, read: Read, payload) -> None:
        """The latest send of `read` was answered "ok" with `payload`."""
        if type(payload) is not list or len(payload) != len(read.ops):
            raise wire.ProtocolError("read answered with a bad payload")
        self.result_max = max(max(map(len, payload)), 0.9 * self.result_max)
        read.done = True
        self.inflight.remove(read)
        _ops.finish_values(read.ops, payload)

    def refused(self, read: Read, code: str, message: str) -> None:
        """The cluster refused `read` outright: halves again, or the one query fails."""
        read.done = True
        self.inflight.remove(read)
        if len(read.ops) > 1:
            half = len(read.ops) // 2
            self._split.append((read.ops[:half], read.stale))
            self._split.append((read.ops[half:], read.stale))
            return
        op = read.ops[0]
        if op.state == _SENT:
            op.finish(error=RequestError(f"the cluster refused the query ({code}: "
                                         f"{message})", maybe_applied=False))
