"""The Trio client: finds the leader, pipelines and batches commands, retries safely.

`open_client(addresses)` is an async context manager yielding a `Client`;
`cypaxos.client.blocking.connect` runs one in a background thread for plain code.

Still one big module (about 1,300 lines, over the ~600 the layout aims for): the
connection handling, the session's batches and the call front end share the Client's
state and move into connection/session modules of their own in a later step.

How a `Client` works (docs/internals.md, "Slot values and client batches" and "Wire"):

- It keeps ONE connection, to the leader.  It dials the addresses starting at a random
  one, follows `["redirect", id, address]` replies, and on connection loss reconnects
  with a short backoff (20 ms doubling to 500 ms), cycling through the addresses.
- Before its first write the client registers a session: a batch for session 0 with a
  random nonce and one empty command, whose result is the session id the cluster
  assigned (once per session: nothing per command).  A registration that was applied
  but not answered is sent again; at worst that leaves an unused session, which ages
  out of the table.
- Every write (put, delete, cas, submit) gets the next sequence number of this client's
  session.  A sender task takes whatever writes are queued (up to
  1 MiB or 4096 commands) into one client batch and sends `["submit", id, batch]`; at most
  64 batches are in flight, and further calls wait (every queue is bounded).  Reads
  (get, query) are batched likewise into one `["read", id, [query, ...], stale]`.
- After a reconnect every outstanding batch is resent byte for byte, in sequence order:
  the replicas' session table answers a batch it already applied from its cache, so a
  retried write is applied exactly once.  A session evicted from the table (it holds
  `max_sessions` clients, least recently used go) answers SESSION_EXPIRED instead:
  those calls raise `SessionExpiredError` (`maybe_applied=True`), and the client
  registers a new session for the calls after them.
- A call has a deadline (`timeout`); past it the call raises `cypaxos.TimeoutError`
  (or `UnavailableError` if no replica could be reached, or none led, the whole time),
  whose `maybe_applied` says whether the command ever left the client.
"""
from __future__ import annotations

import collections
import heapq
import math
import os
import random
import secrets
from contextlib import asynccontextmanager
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Union

import trio

from .. import clientops as _ops
from ..core import REGISTER_SESSION_ID
from .. import commands as _cmd
from .. import wire
from ..addresses import Addresses, parse_addresses, split_address
from ..clientops import Op as _Op
from ..errors import (
    ClientError, ClosedError, CommandError, ConfigError, RequestError,
    SessionExpiredError, TimeoutError, UnavailableError,
)
from ..groups import leaves

if TYPE_CHECKING:
    from .backup import BackupInfo

__all__ = ["Client", "open_client", "Bytes", "COMMAND_BYTES_MAX"]

Bytes = Union[bytes, bytearray, memoryview, str]
"""What keys, values, commands and queries may be given as (str is UTF-8 encoded)."""

# ---------------------------------------------------------------------------
# Limits and timings

BATCH_BYTES_MAX = 1 << 20
"""A client batch is cut once its payload would pass this many bytes (a bigger single
command travels alone)."""
BATCH_COMMANDS_MAX = 4096
"""At most this many commands (or queries) per request."""
INFLIGHT_BATCHES_MAX = 64
"""Client batches sent and not yet answered; more writes wait in the queue."""
INFLIGHT_READS_MAX = 64
"""Read requests sent and not yet answered; more reads wait in their queue."""
QUEUE_COMMANDS_MAX = 65536
"""Calls queued and not yet sent, per queue; more calls wait for room (bounded memory)."""
QUEUE_BYTES_MAX = 64 << 20
"""Bytes of queued writes not yet sent; more writes wait for room."""

# CBOR of ["submit", id, batch] costs at most 1 + 7 + 9 + 5 bytes around the batch; ["read",
# id, [query], stale] a little less.  Rounded up, so the frame can never pass the limit.
_REQUEST_OVERHEAD = 64
COMMAND_BYTES_MAX = (wire.FRAME_BYTES_MAX - _cmd.BATCH_HEADER_BYTES - 4
                     - _REQUEST_OVERHEAD)
"""The largest command (or query) that fits one frame; bigger ones raise RequestError."""

# Replies are the cluster's, so they are trusted more than requests are: a read batch of
# several large values may legitimately come back bigger than one request frame.
_REPLY_FRAME_BYTES_MAX = 4 * wire.FRAME_BYTES_MAX
# Requests are cut so that their replies should stay under this, judging by the largest
# single result seen lately (see Client._request_cap).
_REPLY_BUDGET = 8 << 20

BACKOFF_MIN = 0.02
"""First pause (seconds) before redialling after a failure; it doubles..."""
BACKOFF_MAX = 0.5
"""...up to this, and resets once a leader answers."""
_RETRY_PAUSE = 0.005        # before resending a batch answered "retry" (doubles, <= 0.2 s)
_RETRY_PAUSE_MAX = 0.2
_CONNECT_TIMEOUT = 2.0      # TCP connect + hello/welcome of one attempt
_STALL_TIMEOUT = 2.0        # requests pending and no reply this long: try another replica
_RECEIVE_BYTES = 1 << 16

# Op states.
_NEW, _QUEUED, _SENT, _DONE, _ABANDONED = (
    _ops.NEW, _ops.QUEUED, _ops.SENT, _ops.DONE, _ops.ABANDONED)


def _as_bytes(value: Bytes, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


# ---------------------------------------------------------------------------
# Internal records

def _error_of(op: _Op) -> BaseException:
    """Take `op`'s error off it, to be raised.

    Ops are not tracked by the cyclic GC (there are hundreds of thousands a second):
    an op still holding an exception whose traceback holds the op (through the
    raising frame) would be a cycle nothing collects.
    """
    error, op.error = op.error, None
    return error


async def _park(op: _Op) -> None:
    """Sleep until `op` finishes or expires (or the caller is cancelled).

    A plain reschedule rather than an Event and a cancel scope per call: at tens of
    thousands of calls a second those were most of the client's CPU time.
    """
    op.task = trio.lowlevel.current_task()

    def abort(raise_cancel):
        op.task = None
        return trio.lowlevel.Abort.SUCCEEDED
    await trio.lowlevel.wait_task_rescheduled(abort)


class _Batch:
    """A client batch in flight: its exact bytes are what every resend carries."""

    __slots__ = ("epoch", "session_id", "first_seq", "ops", "data", "request_id",
                 "resend_due", "retries", "done")

    def __init__(self, epoch, session_id, first_seq, ops, data):
        self.epoch = epoch
        self.session_id = session_id
        self.first_seq = first_seq
        self.ops = ops
        self.data = data
        self.request_id = 0    # of its latest send (older sends' answers may still come)
        self.resend_due = False
        self.retries = 0
        self.done = False

    @property
    def key(self):
        # A registration (session 0, first_seq a nonce) goes before its session's batches.
        return (self.epoch, self.first_seq if self.session_id != REGISTER_SESSION_ID else 0)


class _Read:
    """A read request in flight (queries are idempotent: resent under fresh ids)."""

    __slots__ = ("ops", "stale", "request_id", "resend_due", "retries", "done")

    def __init__(self, ops, stale):
        self.ops = ops
        self.stale = stale
        self.request_id = 0
        self.resend_due = False
        self.retries = 0
        self.done = False


class _Conn:
    """One connection to a replica and the requests sent on it."""

    __slots__ = ("address", "stream", "replica_id", "requests", "last_progress", "scope",
                 "ending", "redirect", "hint", "reason", "answered")

    def __init__(self, address, stream, replica_id):
        self.address = address
        self.stream = stream
        self.replica_id = replica_id
        self.requests = {}          # request id -> _Batch or _Read
        self.last_progress = trio.current_time()
        self.scope: Optional[trio.CancelScope] = None   # the connection's tasks', once running
        self.ending = False
        self.redirect = False       # ended by a redirect
        self.hint = None            # the leader address it named
        self.reason = ""            # why it ended, for error messages
        self.answered = False       # got at least one "ok"

    def cancel(self) -> None:
        """End the connection's tasks (nothing to end before they started)."""
        if self.scope is not None:
            self.scope.cancel()


# ---------------------------------------------------------------------------
# The Trio client

class Client:
    """A connection to a cypaxos cluster for Trio code; get one from `open_client()`.

    Many tasks may call its methods concurrently: their commands are pipelined and
    batched over one connection to the leader.  Every method takes an optional
    `timeout=` (seconds, None for the client's default) and raises a subclass of
    `cypaxos.errors.ClientError` on failure.
    """

    def __init__(self, addresses: Addresses, *, timeout: float = 5.0) -> None:
        """Prepare a client; it only runs inside `open_client()` (which calls `_run`)."""
        self._addresses = parse_addresses(addresses)
        if timeout is None or not timeout > 0:
            raise ConfigError("timeout must be a positive number of seconds")
        self._timeout = float(timeout)
        self._nursery: Optional[trio.Nursery] = None
        self._closed = False
        self._rr = random.randrange(len(self._addresses)) - 1  # round robin, random start
        self._hint = None           # leader address from the last redirect

        # Session: registered before the first write (None until then); every write
        # gets the next seq.  After a permanent refusal (a hole the session could never
        # get past) or SESSION_EXPIRED a new session ("epoch") takes over.
        self._epoch = 0
        self._session_id: Optional[int] = None
        # this epoch's registration _Batch while unanswered
        self._registration: Optional[_Batch] = None
        self._repack: list[list[_Op]] = []  # op lists (a refused batch's successors) for the
        #                             next session, in order, once it is registered
        self._next_seq = 1
        self._acked_seq = 0
        self._completed: dict[int, int] = {}  # first_seq -> count, answered above _acked_seq

        self._queue: collections.deque[_Op] = collections.deque()  # write _Ops not yet in a batch
        self._queued_count = 0
        self._queued_bytes = 0
        self._reads: collections.deque[_Op] = collections.deque()  # linearizable, not yet sent
        self._stale_reads: collections.deque[_Op] = collections.deque()
        # (ops, stale): halves of a refused read
        self._split_reads: collections.deque[tuple[list[_Op], bool]] = collections.deque()
        self._dead_reads = 0        # abandoned reads left in the queues (at most)
        self._room = trio.lowlevel.ParkingLot()  # callers waiting for queue room
        self._outstanding: dict[tuple[int, int], _Batch] = {}   # batch.key -> _Batch
        self._inflight_reads: list[_Read] = []
        # The largest single result seen lately, for writes [0] and reads [1]: sizes
        # requests.  It jumps up at once and decays by 10% a reply, so one big result
        # does not unbatch the client for good.
        self._result_max = [0.0, 0.0]
        self._resend_at = math.inf  # when flagged batches/reads go out again
        self._request_id = 0

        self._kick = trio.Event()       # wakes the sender
        self._need_conn = trio.Event()  # wakes the idle connection loop
        self._conn: Optional[_Conn] = None
        self._last_contact = -math.inf  # last welcome or reply from any replica
        self._last_leader_ok = -math.inf  # last "ok" from a leader
        self._last_no_leader = -math.inf  # last "redirect, leader unknown"
        self._last_error = "not connected yet"
        self._cluster_id = None         # from the first welcome; others must match
        self._backoff = 0.0
        self._redirect_streak = 0   # redirects followed since the last "ok"

        self._stats: collections.Counter[str] = collections.Counter()
        # _Ops with the default timeout, by deadline
        self._fifo: collections.deque[_Op] = collections.deque()
        # (deadline, order, _Op) with other timeouts
        self._heap: list[tuple[float, int, _Op]] = []
        self._order = 0
        self._timer_at = math.inf
        self._timer_wake = trio.Event()

    # -- public API ----------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """The replica addresses known to this client (given ones, then learned ones)."""
        return list(self._addresses)

    @property
    def session_id(self) -> Optional[int]:
        """This client's current session id (assigned by the cluster when the client
        registers, before its first write; None until then)."""
        return self._session_id

    async def put(self, key: Bytes, value: Bytes, *, timeout: Optional[float] = None) -> None:
        """Set `key` to `value` (replicated, exactly once)."""
        command = _cmd.encode_put(_as_bytes(key, "key"), _as_bytes(value, "value"))
        await self._write(command, timeout)

    async def delete(self, key: Bytes, *, timeout: Optional[float] = None) -> bool:
        """Remove `key`; True if it existed."""
        result = await self._write(_cmd.encode_delete(_as_bytes(key, "key")), timeout)
        return self._decode(_cmd.decode_bool, result)

    async def cas(self, key: Bytes, expected: Optional[Bytes], new: Bytes, *,
                  timeout: Optional[float] = None) -> bool:
        """Set `key` to `new` only if its value is `expected` (None: only if absent).

        Returns True if it swapped.  Atomic: decided by the replicated state machine.
        """
        if expected is not None:
            expected = _as_bytes(expected, "expected")
        command = _cmd.encode_cas(_as_bytes(key, "key"), expected, _as_bytes(new, "new"))
        return self._decode(_cmd.decode_bool, await self._write(command, timeout))

    async def get(self, key: Bytes, *, stale: bool = False,
                  timeout: Optional[float] = None) -> Optional[bytes]:
        """The value of `key`, or None if absent.

        Linearizable by default (confirmed by the leader with a quorum); `stale=True`
        answers from the connected replica's current state, which may lag.
        """
        result = await self._read(_cmd.encode_get(_as_bytes(key, "key")), stale, timeout)
        return self._decode(_cmd.decode_get, result)

    async def submit(self, command: Bytes, *, timeout: Optional[float] = None) -> bytes:
        """Replicate a raw command for a custom state machine; returns its result bytes.

        Raises CommandError if the state machine raised (the failure is replicated).
        """
        return await self._write(_as_bytes(command, "command"), timeout)

    async def query(self, query: Bytes, *, stale: bool = False,
                    timeout: Optional[float] = None) -> bytes:
        """Answer a read-only query from the state machine (linearizable unless `stale`)."""
        return await self._read(_as_bytes(query, "query"), stale, timeout)

    # -- bulk calls: one wake-up for many commands ----------------------------
    #
    # A call that awaits one command costs the client a task park and wake-up each
    # time (several microseconds, more than everything else it does per command).  The
    # bulk calls queue all their commands at once and park once, so a loop that has
    # many commands at hand pays that per call, not per command.

    async def put_many(self, items: Iterable[tuple[Bytes, Bytes]], *,
                       timeout: Optional[float] = None) -> None:
        """Set each `(key, value)` of `items`, in order (each replicated, exactly once).

        Equivalent to awaiting `put` for each item in turn, but pipelined and batched
        together.  If any fails, raises the first failure (in `items` order) once all
        have ended; the others may still have been applied (see `maybe_applied`).
        """
        if type(items) is not list:
            items = list(items)
        try:
            commands = _cmd.encode_puts(items)
        except TypeError:   # str, bytearray, ... (or a wrong type: said per item)
            commands = [_cmd.encode_put(_as_bytes(key, "key"), _as_bytes(value, "value"))
                        for key, value in items]
        await self._many(commands, True, False, timeout, False)

    async def submit_many(self, commands: Iterable[Bytes], *,
                          timeout: Optional[float] = None,
                          return_exceptions: bool = False) -> list[Any]:
        """Replicate raw commands in order; their results, in order.

        Each command is applied exactly once, in the given order (one session).  If any
        fails, raises the first failure (in order) once all have ended, unless
        `return_exceptions` is true: then a failed command's entry in the list is its
        exception (`CommandError`, `TimeoutError`, ...) instead of its result bytes.
        """
        payloads = [_as_bytes(command, "command") for command in commands]
        return await self._many(payloads, True, False, timeout, return_exceptions)

    async def get_many(self, keys: Iterable[Bytes], *, stale: bool = False,
                       timeout: Optional[float] = None) -> list[Optional[bytes]]:
        """The values of `keys` (None where absent), in order; like `get` for each.

        Linearizable by default: every value is at least as new as any write that
        completed before this call began.
        """
        if type(keys) is not list:
            keys = list(keys)
        try:
            queries = _cmd.encode_gets(keys)
        except TypeError:   # str, bytearray, ... (or a wrong type: said per key)
            queries = [_cmd.encode_get(_as_bytes(key, "key")) for key in keys]
        results = await self._many(queries, False, stale, timeout, False)
        try:
            return _cmd.decode_gets(results)
        except ValueError as exc:
            raise ClientError(f"malformed result from the cluster: {exc}",
                              maybe_applied=True) from None

    async def query_many(self, queries: Iterable[Bytes], *, stale: bool = False,
                         timeout: Optional[float] = None,
                         return_exceptions: bool = False) -> list[Any]:
        """Answer read-only queries, in order; like `query` for each (see `submit_many`
        for `return_exceptions`)."""
        payloads = [_as_bytes(query, "query") for query in queries]
        return await self._many(payloads, False, stale, timeout, return_exceptions)

    async def status(self, *, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        """Ask every known replica for its status, each on its own short connection.

        Returns one dict per address, in order: `address`, `reachable`, and when
        reachable the replica's fields (`id`, `role`, `ballot`, `commit_index`,
        `applied_index`, `state_digest`, `leader`, ...); when not, `error`.
        """
        return await self._ask_all(wire.status_request, self._status_entry, timeout)

    async def snapshot(self, *, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        """Ask every known replica to take a snapshot now.

        Returns one dict per address: `address`, `reachable`, `id` and `applied_index`
        (the snapshot's index) on success, or `error` (unreachable, or the replica's
        error reply, e.g. if it does not support snapshots).
        """
        return await self._ask_all(wire.snapshot_request, self._snapshot_entry, timeout)

    async def backup(self, path: Union[str, "os.PathLike[str]"], *,
                     timeout: Optional[float] = None) -> "BackupInfo":
        """Write a consistent copy of the cluster's state to the file `path`.

        The leader snapshots its state at a linearizable point (every write
        acknowledged before this call is in it) and streams the snapshot file, which is
        checked (CRC32C) as it arrives, written to a temporary file, synced and renamed
        to `path` (replacing it).  `timeout` bounds each step, not the whole transfer.
        Returns a `BackupInfo`; `cypaxos restore` seeds a new cluster from the file.
        """
        self._check_open()
        from .backup import backup_to_file
        return await backup_to_file(list(self._addresses), os.fspath(path),
                                    timeout=self._timeout if timeout is None else timeout)

    def statistics(self) -> dict[str, Any]:
        """Counters of this client's work so far, and its current connection.

        `commands` (writes called), `batches` (client batches formed from them),
        `submit_requests` (submit frames sent, resends included), `resent_batches`,
        `reads`/`stale_reads` (queries called), `read_requests`, `resent_reads`,
        `redirects`, `connections`, `connect_failures`, `retry_results`,
        `busy_replies`, `timeouts`, `session_restarts`, `registrations` (sessions
        registered), `sessions_expired` (sessions the cluster had dropped), `stalls`; and
        `session_id`, `connected_to`, `connected_replica_id`, `queued_commands`,
        `outstanding_batches`, `outstanding_reads`.
        """
        stats = {
            "session_id": self._session_id,
            "connected_to": self._conn.address if self._conn else None,
            "connected_replica_id": self._conn.replica_id if self._conn else None,
            "queued_commands": self._queued_count,
            "outstanding_batches": len(self._outstanding),
            "outstanding_reads": len(self._inflight_reads),
        }
        for name in ("commands", "batches", "submit_requests", "resent_batches", "reads",
                     "stale_reads", "read_requests", "resent_reads", "redirects",
                     "connections", "connect_failures", "retry_results", "busy_replies",
                     "timeouts", "session_restarts", "registrations", "sessions_expired",
                     "stalls"):
            stats[name] = self._stats[name]
        return stats

    async def aclose(self) -> None:
        """Close the client: pending calls fail with ClosedError, the connection closes."""
        self._close()
        await trio.lowlevel.checkpoint()

    # -- calls ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the client is closed")

    def _deadline(self, timeout):
        if timeout is None:
            timeout = self._timeout
        elif not timeout > 0:
            raise ValueError("timeout must be positive")
        start = trio.current_time()
        return start, start + timeout, timeout

    @staticmethod
    def _decode(decoder, result):
        try:
            return decoder(result)
        except ValueError as exc:
            raise ClientError(f"malformed result from the cluster: {exc}",
                              maybe_applied=True) from None

    async def _write(self, command: bytes, timeout) -> bytes:
        self._check_open()
        _check_size(command, "command")
        start, deadline, timeout = self._deadline(timeout)
        op = _Op(command, deadline)
        size = len(command) + 4
        try:
            if (self._queued_count >= QUEUE_COMMANDS_MAX
                    or self._queued_bytes + size > QUEUE_BYTES_MAX) and self._queued_count:
                # Wait for room: memory stays bounded however many tasks call at once.
                with trio.move_on_at(deadline):
                    while (self._queued_count >= QUEUE_COMMANDS_MAX
                           or self._queued_bytes + size > QUEUE_BYTES_MAX) \
                            and self._queued_count:
                        await self._room.park()
                        self._check_open()
                if trio.current_time() >= deadline:
                    raise self._expired(op, start, deadline)
            self._queue.append(op)
            op.state = _QUEUED
            self._queued_count += 1
            self._queued_bytes += size
            self._stats["commands"] += 1
            self._wake()
            self._arm(op, timeout)
            await _park(op)
        finally:
            if op.state == _QUEUED:
                # Never sent: forget it (the sender skips abandoned ops), so it can never
                # be applied after its caller was told it was not.
                op.state = _ABANDONED
                self._forget_queued_writes(1, size)
            elif op.state == _SENT:
                op.state = _ABANDONED   # its batch still goes through; nobody waits
        if op.error is not None:
            raise _error_of(op)
        if op.state == _DONE:
            return op.value
        raise self._expired(op, start, deadline)

    async def _read(self, query: bytes, stale: bool, timeout) -> bytes:
        self._check_open()
        _check_size(query, "query")
        start, deadline, timeout = self._deadline(timeout)
        op = _Op(query, deadline)
        try:
            if len(self._queue_of(stale)) >= QUEUE_COMMANDS_MAX:
                with trio.move_on_at(deadline):
                    while len(self._queue_of(stale)) >= QUEUE_COMMANDS_MAX:
                        await self._room.park()
                        self._check_open()
                if trio.current_time() >= deadline:
                    raise self._expired(op, start, deadline)
            self._queue_of(stale).append(op)
            op.state = _QUEUED
            self._stats["stale_reads" if stale else "reads"] += 1
            self._wake()
            self._arm(op, timeout)
            await _park(op)
        finally:
            if op.state in (_QUEUED, _SENT):
                queued = op.state == _QUEUED
                op.state = _ABANDONED   # skipped when packed or resent
                if queued:
                    self._forget_queued_reads(1)
        if op.error is not None:
            raise _error_of(op)
        if op.state == _DONE:
            return op.value
        op.sent = False   # a read never changes anything
        raise self._expired(op, start, deadline)

    async def _many(self, payloads: list[bytes], write: bool, stale: bool, timeout,
                    return_exceptions: bool) -> list[Any]:
        """Queue all `payloads` as writes (or reads), park until every one has ended."""
        self._check_open()
        if not payloads:
            return []
        if max(map(len, payloads)) > COMMAND_BYTES_MAX:
            what = "command" if write else "query"
            for payload in payloads:
                _check_size(payload, what)
        start, deadline, timeout = self._deadline(timeout)
        ops = _ops.make_ops(payloads, deadline)
        count = len(ops)
        total_size = sum(map(len, payloads)) + 4 * count
        queued = 0     # ops[:queued] have been queued (and armed)
        try:
            while queued < count:
                # As many as the queue has room for (at least one when it is empty).
                if write:
                    room = QUEUE_COMMANDS_MAX - self._queued_count
                    room_bytes: float = QUEUE_BYTES_MAX - self._queued_bytes
                    queue = self._queue
                else:
                    queue = self._queue_of(stale)
                    room = QUEUE_COMMANDS_MAX - len(queue)
                    room_bytes = math.inf
                end = queued
                size = 0
                if queued == 0 and count <= room and total_size <= room_bytes:
                    end = count    # all at once (the common case)
                    size = total_size
                while end < count and end - queued < room:
                    n = len(ops[end].payload) + 4
                    if size + n > room_bytes and end > queued:
                        break
                    size += n
                    end += 1
                if end == queued and (queue if not write else self._queued_count):
                    with trio.move_on_at(deadline):
                        await self._room.park()
                    self._check_open()
                    if trio.current_time() >= deadline:
                        break
                    continue
                if end == queued:
                    end = queued + 1
                    size = len(ops[queued].payload) + 4
                chunk = ops[queued:end]
                _ops.mark(chunk, _QUEUED)
                queue.extend(chunk)
                if write:
                    self._queued_count += len(chunk)
                    self._queued_bytes += size
                self._stats["commands" if write else
                            "stale_reads" if stale else "reads"] += len(chunk)
                if timeout == self._timeout:
                    self._fifo.extend(chunk)
                    if deadline < self._timer_at:
                        self._timer_wake.set()
                else:
                    for op in chunk:
                        self._arm(op, timeout)
                queued = end
                self._wake()
            # Park on the last unfinished op: in the common case they finish in order
            # and this is the one wake-up.  All share the deadline, so once it has
            # passed none is waited for any longer.
            index = _ops.last_unfinished(ops, queued - 1)
            while index >= 0:
                op = ops[index]
                if op.expired or trio.current_time() >= deadline:
                    break
                await _park(op)
                index = _ops.last_unfinished(ops, index)
        finally:
            dropped, dropped_bytes = _ops.abandon(ops)
            if dropped:
                if write:
                    self._forget_queued_writes(dropped, dropped_bytes)
                else:
                    self._room.unpark_all()
                    self._forget_queued_reads(dropped)
        results = _ops.values_if_all_done(ops)
        if results is not None:
            return results
        results = []
        for op in ops:
            if op.error is not None:
                outcome = _error_of(op)
            elif op.state == _DONE:
                results.append(op.value)
                continue
            else:
                if not write:
                    op.sent = False   # a read never changes anything
                outcome = self._expired(op, start, deadline)
            if not return_exceptions:
                raise outcome
            results.append(outcome)
        return results

    def _forget_queued_writes(self, count: int, size: int) -> None:
        """Account for `count` queued writes (`size` bytes) whose callers gave up.

        They were never sent (the sender skips abandoned ops), so they can never be
        applied after their callers were told they were not.
        """
        self._queued_count -= count
        self._queued_bytes -= size
        self._room.unpark_all()
        if len(self._queue) > 2 * self._queued_count + 1024:
            # Nothing is draining the queue (no connection): drop the dead entries
            # now, or callers retrying in a loop would grow it forever.
            self._queue = _live(self._queue)

    def _forget_queued_reads(self, count: int) -> None:
        """Account for `count` queued reads whose callers gave up (see above).

        The read queues are compacted once abandoned reads could be half of them
        (amortized O(1)).
        """
        self._dead_reads += count
        if (self._dead_reads > 1024 and
                2 * self._dead_reads > len(self._reads) + len(self._stale_reads)):
            self._reads = _live(self._reads)
            self._stale_reads = _live(self._stale_reads)
            self._dead_reads = 0

    # -- deadlines -----------------------------------------------------------
    #
    # Calls with the default timeout expire in the order they began, so they wait in
    # a FIFO whose head alone can be due: arming is an append.  Calls with their own
    # timeout go in a heap.  The timer task sleeps until the earliest deadline.

    def _arm(self, op: _Op, timeout: float) -> None:
        if timeout == self._timeout:
            self._fifo.append(op)
        else:
            self._order += 1
            heapq.heappush(self._heap, (op.deadline, self._order, op))
        if op.deadline < self._timer_at:
            self._timer_wake.set()

    def _sweep(self, now: float) -> float:
        """Expire due ops, drop finished ones at the heads; the next deadline (or inf)."""
        next_at = _ops.sweep_fifo(self._fifo, now)
        heap = self._heap
        while heap:
            deadline, _, op = heap[0]
            if op.state == _DONE or op.state == _ABANDONED or op.expired:
                heapq.heappop(heap)
            elif deadline <= now:
                heapq.heappop(heap)
                op.expired = True
                op.wake()
            else:
                next_at = min(next_at, deadline)
                break
        return next_at

    async def _timer(self) -> None:
        """Wake callers whose deadline passed (their call then raises)."""
        while True:
            self._timer_wake = trio.Event()
            self._timer_at = self._sweep(trio.current_time())
            with trio.move_on_at(self._timer_at):
                await self._timer_wake.wait()

    def _queue_of(self, stale: bool):
        return self._stale_reads if stale else self._reads

    def _expired(self, op: _Op, start: float, deadline: float) -> ClientError:
        """The error for a call past its deadline: unavailable, or a plain timeout."""
        self._stats["timeouts"] += 1
        waited = deadline - start
        # Unreachable: no connection now, and not one word from any replica since the
        # call began (a connection that was up when it began but then died silently
        # does not count).  A connection that is up but silent (a frozen replica) is a
        # plain timeout.
        if self._conn is None and self._last_contact < start:
            return UnavailableError(
                f"no replica reachable within {waited:.3g} s ({self._last_error})",
                maybe_applied=op.sent)
        if self._last_leader_ok < start and self._last_no_leader >= start:
            return UnavailableError(
                f"no replica was leading within {waited:.3g} s (election in progress or "
                f"no quorum)", maybe_applied=op.sent)
        if self._conn is not None:
            where = f" (connected to {self._conn.address})"
        else:
            where = f" (not connected; last error: {self._last_error})"
        return TimeoutError(f"no answer within {waited:.3g} s{where}",
                            maybe_applied=op.sent)

    def _wake(self) -> None:
        self._kick.set()
        self._need_conn.set()

    # -- one-shot requests to every replica ----------------------------------

    async def _ask_all(self, make_request, make_entry, timeout) -> list[dict[str, Any]]:
        self._check_open()
        _, deadline, _ = self._deadline(timeout)
        addresses = list(self._addresses)
        entries: list[dict[str, Any]] = [{} for _ in addresses]

        async def ask(index, address):
            entry = {"address": address, "reachable": False}
            try:
                replica_id, reply = await self._one_shot(address, make_request, deadline)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError,
                    ValueError) as exc:   # wire.ProtocolError is a ValueError
                entry["error"] = _describe(exc)
            else:
                entry["reachable"] = True
                entry["id"] = replica_id
                if reply[0] == "ok":
                    make_entry(entry, reply[2])
                elif reply[0] == "error":
                    entry["error"] = f"{reply[2]}: {reply[3]}"
                else:
                    entry["error"] = f"redirected to {reply[2]}"
            entries[index] = entry

        async with trio.open_nursery() as nursery:
            for index, address in enumerate(addresses):
                nursery.start_soon(ask, index, address)
        return entries

    @staticmethod
    def _status_entry(entry, payload):
        if type(payload) is not dict:
            entry["error"] = "malformed status reply"
            return
        replica_address = entry["address"]
        entry.update(payload)
        # The address this client dialed identifies the entry; the replica's own view
        # of its address (if it sends one) is kept aside.
        if payload.get("address", replica_address) != replica_address:
            entry["advertised_address"] = payload["address"]
        entry["address"] = replica_address
        entry["reachable"] = True

    @staticmethod
    def _snapshot_entry(entry, payload):
        if type(payload) is int:
            entry["applied_index"] = payload
        else:
            entry["error"] = "malformed snapshot reply"

    async def _one_shot(self, address, make_request, deadline):
        """Dial `address`, say hello, send one request; return (replica_id, reply)."""
        with trio.move_on_at(deadline):
            host, port = split_address(address)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                decoder = wire.FrameDecoder(_REPLY_FRAME_BYTES_MAX)
                await stream.send_all(wire.encode_frame(wire.client_hello()))
                _, replica_id = wire.parse_welcome(await _receive_frame(stream, decoder))
                await stream.send_all(wire.encode_frame(make_request(1)))
                while True:
                    reply = wire.parse_reply(await _receive_frame(stream, decoder))
                    if reply[1] == 1:
                        return replica_id, reply
        raise trio.TooSlowError("no answer before the deadline")

    # -- lifecycle -----------------------------------------------------------

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Writes in a sent batch may have been applied; queued ones and reads were not.
        pending = [(op, False) for op in self._queue]
        pending += [(op, False) for op in self._reads]
        pending += [(op, False) for op in self._stale_reads]
        pending += [(op, False) for ops, _ in self._split_reads for op in ops]
        for batch in self._outstanding.values():
            pending += [(op, True) for op in batch.ops]
        pending += [(op, False) for ops in self._repack for op in ops]
        for read in self._inflight_reads:
            pending += [(op, False) for op in read.ops]
        for op, maybe_applied in pending:
            if op.state in (_QUEUED, _SENT):
                op.finish(error=ClosedError("the client was closed before the call completed",
                                            maybe_applied=maybe_applied))
        self._queue.clear()
        self._queued_count = self._queued_bytes = 0
        self._reads.clear()
        self._stale_reads.clear()
        self._split_reads.clear()
        self._room.unpark_all()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _has_work(self) -> bool:
        """Whether any caller waits on something a connection would carry."""
        if self._queued_count or self._repack:
            return True
        # Reads abandoned by callers that timed out do not count (nor linger).
        self._reads = _live(self._reads)
        self._stale_reads = _live(self._stale_reads)
        self._dead_reads = 0
        self._split_reads = collections.deque(
            (ops, stale) for ops, stale in self._split_reads
            if any(op.state == _SENT for op in ops))
        if self._reads or self._stale_reads or self._split_reads:
            return True
        for batch in self._outstanding.values():
            for op in batch.ops:
                if op.state == _SENT:
                    return True
        for read in self._inflight_reads:
            for op in read.ops:
                if op.state == _SENT:
                    return True
        return False

    async def _run(self) -> None:
        """The connection loop: dial, serve one connection, pick the next, back off."""
        delay = 0.0
        first = True
        while True:
            if not first and not self._has_work():
                # Idle: no reconnect storm against a cluster nobody is waiting for.
                while not self._has_work():
                    self._need_conn = trio.Event()
                    await self._need_conn.wait()
                delay = 0.0
            first = False
            if delay:
                await trio.sleep(delay)
            address = self._next_address()
            conn = await self._dial(address)
            if conn is None:
                self._hint = None
                delay = self._bump_backoff()
                continue
            self._stats["connections"] += 1
            self._conn = conn
            self._last_contact = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    conn.scope = nursery.cancel_scope
                    nursery.start_soon(self._reader, conn)
                    nursery.start_soon(self._sender, conn)
            finally:
                self._conn = None
                conn.requests.clear()
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(conn.stream)
            if conn.hint is not None:
                # Straight to the leader, unless redirects keep bouncing without an
                # answer (stale hints during an election): then back off.
                self._hint = conn.hint
                self._redirect_streak += 1
                delay = (0.0 if self._redirect_streak <= 2 * len(self._addresses)
                         else self._bump_backoff())
            else:
                if conn.reason:
                    self._last_error = f"{conn.address}: {conn.reason}"
                self._hint = None
                # A connection that worked and then died (a leader crash) is replaced at
                # once; a fruitless one (no leader known, stalled) backs off.
                delay = 0.0 if conn.answered and not conn.redirect else self._bump_backoff()

    def _bump_backoff(self) -> float:
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
        return self._backoff

    def _next_address(self) -> str:
        hint = self._hint
        self._hint = None
        if hint is not None:
            if hint not in self._addresses:
                self._addresses.append(hint)   # a replica the caller did not list
            self._rr = self._addresses.index(hint)
            return hint
        # Always move on: the last address failed, redirected without a hint, or died.
        self._rr = (self._rr + 1) % len(self._addresses)
        return self._addresses[self._rr]

    async def _dial(self, address: str) -> Optional[_Conn]:
        """Connect and exchange hello/welcome; None (and _last_error set) on failure."""
        try:
            host, port = split_address(address)   # maybe a redirect's: the cluster's word
        except ConfigError:
            self._last_error = f"{address}: bad address"
            return None
        stream = None
        if self._last_error == "not connected yet":
            self._last_error = f"{address}: still connecting"   # e.g. slow DNS
        try:
            with trio.fail_after(_CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(wire.encode_frame(wire.client_hello()))
                decoder = wire.FrameDecoder(_REPLY_FRAME_BYTES_MAX)
                cluster_id, replica_id = wire.parse_welcome(
                    await _receive_frame(stream, decoder))
                if decoder.buffered:
                    raise wire.ProtocolError("unexpected bytes after the welcome")
                # Addresses of two clusters mixed up must not send writes to both.
                if self._cluster_id is None:
                    self._cluster_id = cluster_id
                elif cluster_id != self._cluster_id:
                    raise wire.ProtocolError(f"replica of cluster {cluster_id!r}, not "
                                             f"{self._cluster_id!r}")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError,
                wire.ProtocolError) as exc:
            self._stats["connect_failures"] += 1
            self._last_error = f"{address}: {_describe(exc)}"
            if stream is not None:
                await trio.aclose_forcefully(stream)
            return None
        return _Conn(address, stream, replica_id)

    # -- reading replies -----------------------------------------------------

    async def _reader(self, conn: _Conn) -> None:
        decoder = wire.FrameDecoder(_REPLY_FRAME_BYTES_MAX)
        try:
            while not conn.ending:
                data = await conn.stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    conn.reason = "connection closed by the replica"
                    break
                decoder.feed(data)
                while (obj := decoder.next_frame()) is not None:
                    self._on_reply(conn, wire.parse_reply(obj))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            conn.reason = _describe(exc)
        except wire.ProtocolError as exc:
            conn.reason = f"protocol error: {exc}"
            if "exceeds the limit" in str(exc):
                # A reply too big even for us (many large results batched together):
                # from now on one command or query per request, or this would repeat.
                self._result_max = [float(wire.FRAME_BYTES_MAX)] * 2
        conn.ending = True
        conn.cancel()

    def _on_reply(self, conn: _Conn, reply: tuple[Any, ...]) -> None:
        now = trio.current_time()
        self._last_contact = now
        target = conn.requests.pop(reply[1], None)
        if target is None or target.done:
            return   # an answer to an earlier send of something already answered
        conn.last_progress = now
        kind = reply[0]
        if kind == "redirect":
            self._stats["redirects"] += 1
            hint = reply[2]
            if not conn.ending:
                conn.ending = True
                conn.redirect = True
                if hint is None or hint == conn.address:
                    self._last_no_leader = trio.current_time()
                    conn.reason = "no leader known"
                else:
                    conn.hint = hint
            return
        if kind == "error":
            self._on_error_reply(conn, target, reply[1], reply[2], reply[3])
            return
        payload = reply[2]
        if type(target) is _Batch:
            # Any send's answer will do: every send carried the same bytes.
            self._on_batch_ok(conn, target, reply[1], payload)
        elif reply[1] == target.request_id:
            # Only the latest send's: a resend may carry fewer queries (pruned).
            self._on_read_ok(conn, target, payload)

    def _on_batch_ok(self, conn, batch: _Batch, request_id, payload) -> None:
        if type(payload) is not bytes:
            raise wire.ProtocolError("submit answered with a non-bytes payload")
        conn.answered = True
        if batch.session_id == REGISTER_SESSION_ID:
            self._on_registered(batch, payload)
            return
        if _cmd.all_ok_empty(payload, len(batch.ops)):
            # A batch of puts: nothing to unpack or look at one by one.
            self._result_max[0] *= 0.9
            self._last_leader_ok = trio.current_time()
            self._backoff = 0.0
            self._redirect_streak = 0
            self._finish_batch(batch, None)
            return
        try:
            results = _cmd.unpack_results(payload)
        except ValueError as exc:
            raise wire.ProtocolError(f"bad packed results: {exc}") from None
        if len(results) != len(batch.ops):
            raise wire.ProtocolError(f"{len(results)} results for {len(batch.ops)} commands")
        self._result_max[0] = max(max([len(data) for _, data in results]),
                                  0.9 * self._result_max[0])
        if any(status == _cmd.RESULT_RETRY for status, _ in results):
            # Earlier commands of the session are not applied yet (a leader change
            # reordered batches): send this one again once they are in front of it.
            self._stats["retry_results"] += 1
            if request_id == batch.request_id:
                pause = min(_RETRY_PAUSE * 2 ** batch.retries, _RETRY_PAUSE_MAX)
                batch.retries += 1
                # The earlier ones go again too, in order: one of them may have been
                # lost without a word (the connection stayed up), and then nothing
                # else would ever send it.  Duplicates are answered from the cache.
                for other in self._outstanding.values():
                    if other.epoch == batch.epoch and other.first_seq < batch.first_seq:
                        other.resend_due = True
                self._flag(batch, pause)
            return
        self._last_leader_ok = trio.current_time()
        self._backoff = 0.0
        self._redirect_streak = 0
        self._finish_batch(batch, results)

    def _on_registered(self, batch: _Batch, payload: bytes) -> None:
        try:
            (status, data), = _cmd.unpack_results(payload)
        except ValueError:
            raise wire.ProtocolError("a registration answered with other than one result") from None
        if status != _cmd.RESULT_OK or len(data) != 8:
            raise wire.ProtocolError(f"a registration answered with status {status}")
        batch.done = True
        del self._outstanding[batch.key]
        if batch is not self._registration:
            return   # an earlier epoch's, answered late: that session just ages out
        self._registration = None
        self._session_id = int.from_bytes(data, "little")
        self._next_seq = 1
        self._acked_seq = 0
        self._completed = {}
        self._stats["registrations"] += 1
        self._last_leader_ok = trio.current_time()
        self._backoff = 0.0
        self._redirect_streak = 0
        self._kick.set()

    def _new_session(self) -> None:
        """Start a new epoch: the next write registers a new session first."""
        self._epoch += 1
        self._session_id = None
        self._registration = None
        self._next_seq = 1
        self._acked_seq = 0
        self._completed = {}

    def _finish_batch(self, batch: _Batch, results) -> None:
        """Finish a batch's calls with `results` ((status, bytes) per command; None:
        every one OK with no bytes)."""
        batch.done = True
        del self._outstanding[batch.key]
        if batch.epoch == self._epoch:
            self._completed[batch.first_seq] = len(batch.ops)
            completed = self._completed
            while self._acked_seq + 1 in completed:
                self._acked_seq += completed.pop(self._acked_seq + 1)
        if results is None:   # all OK, no result bytes
            _ops.finish_ok_empty(batch.ops)
            results = ()
        for op, (status, data) in zip(batch.ops, results):
            if op.state != _SENT:
                continue   # its caller gave up
            if status == _cmd.RESULT_OK:
                op.finish(data)
            elif status == _cmd.RESULT_ERROR:
                op.finish(error=CommandError(data.decode("utf-8", "replace")))
            elif status == _cmd.RESULT_SESSION_EXPIRED:
                op.finish(error=SessionExpiredError(
                    "the cluster dropped this client's session; the command may have "
                    "been applied", maybe_applied=True))
            else:
                op.finish(error=ClientError(f"unknown result status {status}",
                                            maybe_applied=True))
        if (results and results[0][0] == _cmd.RESULT_SESSION_EXPIRED
                and batch.epoch == self._epoch):
            # The session was evicted (the core then answers every command of the batch
            # so): later calls go in a new one.  Batches of the old one still in flight
            # get their own answers.
            self._stats["sessions_expired"] += 1
            self._new_session()
        self._sweep(trio.current_time())
        self._kick.set()   # window room

    def _on_read_ok(self, conn, read: _Read, payload) -> None:
        if type(payload) is not list or len(payload) != len(read.ops):
            raise wire.ProtocolError("read answered with a bad payload")
        conn.answered = True
        self._result_max[1] = max(max(map(len, payload)), 0.9 * self._result_max[1])
        if not read.stale:
            self._last_leader_ok = trio.current_time()
            self._backoff = 0.0
            self._redirect_streak = 0
        read.done = True
        self._inflight_reads.remove(read)
        _ops.finish_values(read.ops, payload)
        self._sweep(trio.current_time())
        self._kick.set()

    def _on_error_reply(self, conn, target, request_id, code, message) -> None:
        if code == "shutting_down":
            # This replica is going away: go elsewhere; everything gets resent there.
            if not conn.ending:
                conn.ending = True
                conn.reason = f"replica shutting down ({message})"
            return
        if code in ("too_large", "bad_request"):
            if type(target) is _Batch:
                self._refused_batch(target, code, message)
            else:
                self._refused_read(target, code, message)
            return
        # "busy", or a code newer than this client: assume it is transient and resend
        # after a backoff (nothing was applied, so retrying is safe).
        self._stats["busy_replies"] += 1
        if request_id == target.request_id:
            pause = min(BACKOFF_MIN * 2 ** target.retries, BACKOFF_MAX)
            target.retries += 1
            self._flag(target, pause)

    def _flag(self, target, pause: float) -> None:
        target.resend_due = True
        self._resend_at = min(self._resend_at, trio.current_time() + pause)
        self._kick.set()

    def _refused_batch(self, batch: _Batch, code: str, message: str) -> None:
        """The cluster refused a batch outright, so it was never proposed."""
        if batch.session_id == REGISTER_SESSION_ID:
            raise wire.ProtocolError(f"the cluster refused a session registration "
                                     f"({code}: {message})")
        if len(batch.ops) > 1:
            # Maybe one command is to blame (a replica with a smaller limit than ours):
            # the same seqs in two halves (and so on) isolate it.  Safe: a refused
            # batch was never proposed, so its seqs are still free.
            del self._outstanding[batch.key]
            batch.done = True
            half = len(batch.ops) // 2
            acked = _acked_of(batch.data)
            for offset, ops in ((0, batch.ops[:half]), (half, batch.ops[half:])):
                part = self._pack(batch.epoch, batch.session_id, batch.first_seq + offset,
                                  acked, ops)
                self._outstanding[part.key] = part
                part.resend_due = True
            self._resend_at = trio.current_time()
            self._kick.set()
            return
        op = batch.ops[0]
        del self._outstanding[batch.key]
        batch.done = True
        if op.state == _SENT:
            op.finish(error=RequestError(f"the cluster refused the command ({code}: "
                                         f"{message})", maybe_applied=False))
        # Its seq is now a hole this session can never pass; every later batch of the
        # session is therefore unapplied (and unappliable).  Renumber them in a new
        # session, in order.
        later = sorted((b for b in self._outstanding.values()
                        if b.epoch == batch.epoch and b.first_seq > batch.first_seq),
                       key=lambda b: b.first_seq)
        if batch.epoch != self._epoch:
            return  # already renumbered by an earlier refusal
        self._stats["session_restarts"] += 1
        self._new_session()
        for old in later:   # sent again, in order, once the new session is registered
            del self._outstanding[old.key]
            old.done = True
            self._repack.append(old.ops)
        self._kick.set()

    def _refused_read(self, read: _Read, code: str, message: str) -> None:
        read.done = True
        self._inflight_reads.remove(read)
        if len(read.ops) > 1:
            # One bad query must not fail its neighbours: ask again in halves, which
            # isolates it in about 2 * log2(len) requests.
            half = len(read.ops) // 2
            self._split_reads.append((read.ops[:half], read.stale))
            self._split_reads.append((read.ops[half:], read.stale))
        else:
            op = read.ops[0]
            if op.state == _SENT:
                op.finish(error=RequestError(f"the cluster refused the query ({code}: "
                                             f"{message})", maybe_applied=False))
        self._kick.set()

    # -- sending -------------------------------------------------------------

    def _new_request_id(self) -> int:
        self._request_id += 1
        return self._request_id

    def _pack(self, epoch, session_id, first_seq, acked_seq, ops) -> _Batch:
        """A batch of `ops`; with no ops, a registration (its one command empty)."""
        if ops:
            data = _ops.pack_ops(session_id, first_seq, acked_seq, ops)
        else:
            data = _cmd.pack_client_batch(session_id, first_seq, acked_seq, [b""])
        return _Batch(epoch, session_id, first_seq, ops, data)

    def _submit_frame(self, conn: _Conn, batch: _Batch) -> bytes:
        request_id = self._new_request_id()
        batch.request_id = request_id
        batch.resend_due = False
        conn.requests[request_id] = batch
        self._stats["submit_requests"] += 1
        return wire.encode_frame(wire.submit_request(request_id, batch.data))

    def _read_frame(self, conn: _Conn, read: _Read) -> bytes:
        request_id = self._new_request_id()
        read.request_id = request_id
        read.resend_due = False
        conn.requests[request_id] = read
        self._stats["read_requests"] += 1
        return wire.encode_frame(wire.read_request(
            request_id, [op.payload for op in read.ops], read.stale))

    async def _sender(self, conn: _Conn) -> None:
        try:
            # A new connection: everything unanswered goes again, batches in session
            # order and byte for byte (the session table makes them exactly-once).
            frames = []
            for batch in sorted(self._outstanding.values(), key=lambda b: b.key):
                if not batch.done:
                    frames.append(self._submit_frame(conn, batch))
                    self._stats["resent_batches"] += 1
            self._resend_reads(conn, list(self._inflight_reads), frames)
            self._resend_at = math.inf
            if frames:
                await conn.stream.send_all(b"".join(frames))
            while True:
                # Collect first, then wait: a sender cancelled between taking a wake-up
                # and acting on it (its connection died) must not strand queued calls,
                # so every sender starts by looking at the queues.  Resetting the event
                # before collecting means nothing queued after the reset is missed.
                self._kick = trio.Event()
                now = trio.current_time()
                if conn.requests and now >= conn.last_progress + _STALL_TIMEOUT:
                    self._stats["stalls"] += 1
                    conn.reason = f"no reply for {_STALL_TIMEOUT} s"
                    conn.ending = True
                    conn.cancel()
                    return
                if not conn.requests:
                    conn.last_progress = now
                data = self._collect(conn, now)
                if data:
                    await conn.stream.send_all(data)
                if not self._kick.is_set():
                    wake_at = self._resend_at
                    if conn.requests:
                        wake_at = min(wake_at, conn.last_progress + _STALL_TIMEOUT)
                    with trio.move_on_at(wake_at):
                        await self._kick.wait()
                # Let every task that is about to call join this round's batch.  With
                # nothing in flight nobody is about to be woken by a reply: go at once
                # (one call at a time is then one scheduling pass faster).
                if conn.requests:
                    await trio.lowlevel.checkpoint()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            conn.reason = _describe(exc)
            conn.ending = True
            conn.cancel()

    def _request_cap(self, reads: bool) -> int:
        """Commands or queries per request, so that replies stay about _REPLY_BUDGET."""
        return max(1, min(BATCH_COMMANDS_MAX,
                          int(_REPLY_BUDGET // max(1.0, self._result_max[reads]))))

    def _resend_reads(self, conn: _Conn, reads: list[_Read], frames: list[bytes]) -> None:
        """Append frames resending `reads` (live queries only, in requests of the cap)."""
        cap = self._request_cap(True)
        for read in reads:
            if not self._prune_read(read):
                continue
            self._stats["resent_reads"] += 1
            if len(read.ops) <= cap:
                frames.append(self._read_frame(conn, read))
                continue
            read.done = True
            self._inflight_reads.remove(read)
            for i in range(0, len(read.ops), cap):
                part = _Read(read.ops[i:i + cap], read.stale)
                self._inflight_reads.append(part)
                frames.append(self._read_frame(conn, part))

    def _prune_read(self, read: _Read) -> bool:
        """Drop abandoned queries from a read; False (and forgotten) if none is left."""
        live = [op for op in read.ops if op.state == _SENT]
        if not live:
            read.done = True
            self._inflight_reads.remove(read)
            return False
        read.ops = live
        return True

    def _collect(self, conn: _Conn, now: float) -> bytes:
        """Everything the sender should write now, as one chunk of frames."""
        frames = []
        held = False
        if now >= self._resend_at:
            self._resend_at = math.inf
            for batch in sorted(self._outstanding.values(), key=lambda b: b.key):
                if batch.resend_due:
                    frames.append(self._submit_frame(conn, batch))
                    self._stats["resent_batches"] += 1
            self._resend_reads(conn, [r for r in self._inflight_reads if r.resend_due],
                               frames)
        else:
            # New batches would only be answered "retry" behind a batch waiting to be
            # resent: hold them until it goes.
            held = any(b.resend_due for b in self._outstanding.values())

        # Reads: linearizable ones in one request, stale ones in another.
        for queue, stale in ((self._reads, False), (self._stale_reads, True)):
            while queue and len(self._inflight_reads) < INFLIGHT_READS_MAX:
                ops, _ = _ops.take(queue, self._request_cap(True), BATCH_BYTES_MAX)
                if not ops:
                    break
                read = _Read(ops, stale)
                self._inflight_reads.append(read)
                frames.append(self._read_frame(conn, read))
        while self._split_reads and len(self._inflight_reads) < INFLIGHT_READS_MAX:
            ops, stale = self._split_reads.popleft()
            ops = [op for op in ops if op.state == _SENT]
            if ops:
                read = _Read(ops, stale)
                self._inflight_reads.append(read)
                frames.append(self._read_frame(conn, read))

        # Writes: one batch per ~1 MiB, consecutive seqs of the session, once it is
        # registered (a refused batch's successors first).
        if not held and self._session_id is None:
            if (self._queued_count or self._repack) and self._registration is None:
                self._registration = self._pack(
                    self._epoch, REGISTER_SESSION_ID, secrets.randbelow(_cmd.SEQ_LIMIT - 2) + 1,
                    0, [])
                self._outstanding[self._registration.key] = self._registration
                frames.append(self._submit_frame(conn, self._registration))
        elif not held:
            while self._repack and len(self._outstanding) < INFLIGHT_BATCHES_MAX:
                ops = self._repack.pop(0)
                batch = self._pack(self._epoch, self._session_id, self._next_seq, 0, ops)
                self._next_seq += len(ops)
                self._outstanding[batch.key] = batch
                frames.append(self._submit_frame(conn, batch))
            while (self._queued_count and not self._repack
                   and len(self._outstanding) < INFLIGHT_BATCHES_MAX):
                ops, size = _ops.take(self._queue, self._request_cap(False), BATCH_BYTES_MAX)
                if not ops:
                    break
                self._queued_count -= len(ops)
                self._queued_bytes -= size
                batch = self._pack(self._epoch, self._session_id, self._next_seq,
                                   self._acked_seq, ops)
                self._next_seq += len(ops)
                self._outstanding[batch.key] = batch
                self._stats["batches"] += 1
                frames.append(self._submit_frame(conn, batch))
        if frames:
            self._room.unpark_all()   # calls waiting for queue room
        return b"".join(frames)


def _check_size(payload: bytes, what: str) -> None:
    if len(payload) > COMMAND_BYTES_MAX:
        raise RequestError(f"{what} of {len(payload)} bytes exceeds the limit of "
                           f"{COMMAND_BYTES_MAX} bytes")


def _live(queue):
    """A copy of a queue without its abandoned ops."""
    return collections.deque(op for op in queue if op.state == _QUEUED)


def _acked_of(batch_data: bytes) -> int:
    return int.from_bytes(batch_data[16:24], "little")


async def _receive_frame(stream, decoder):
    while True:
        obj = decoder.next_frame()
        if obj is not None:
            return obj
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            raise trio.BrokenResourceError("connection closed by the replica")
        decoder.feed(data)


def _describe(exc: BaseException) -> str:
    """A short reason for a failed connection: "connection refused", "timed out"..."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    # trio.open_tcp_stream raises OSError("all attempts ... failed") from a group of
    # the per-address errors: the first of those says more.
    cause = exc.__cause__
    if cause is not None:
        cause = leaves(cause)[0]
    if isinstance(exc, OSError) and exc.errno is None and isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def open_client(addresses: Addresses, *, timeout: float = 5.0) -> AsyncIterator[Client]:
    """Open a `Client` to the cluster at `addresses` (Trio); close it on exit.

    `addresses`: a comma-separated "host:port" string or a list of them, any replicas
    of the cluster.  `timeout`: the default deadline of every call, in seconds.
    Raises `ConfigError` at once for malformed addresses; unreachable ones surface as
    `UnavailableError` from the calls.  The client's tasks live in a nursery of this
    context; leaving it fails pending calls with `ClosedError`.
    """
    client = Client(addresses, timeout=timeout)
    async with trio.open_nursery() as nursery:
        client._nursery = nursery
        nursery.start_soon(client._run)
        nursery.start_soon(client._timer)
        try:
            yield client
        finally:
            client._close()
