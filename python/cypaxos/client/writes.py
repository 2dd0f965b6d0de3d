"""The write side of a client's session: the session id, numbering, batches.

Part of `cypaxos.client.session` (no I/O, no clock).  What it keeps and why:

* **Registration.**  Before its first write a client registers a session: a batch
  for session 0 with a random nonce and one empty command, answered with the id the
  cluster assigned (docs/internals.md, "Sessions").  It is resent like any batch; one
  applied twice leaves an unused session, which ages out of the table.
* **Numbering.**  Every write gets the next sequence number of the session; a batch
  carries `acked_seq`, the seq up to which every result has been received, so the
  table may drop those.
* **Batches.**  Queued writes are cut into client batches of at most
  `batch_bytes_max` bytes (a bigger command goes alone) and `batch_commands_max`
  commands (fewer when results have been large, so that replies stay near
  `reply_budget_bytes`); at most `inflight_batches_max` are unanswered at once.  A
  batch's bytes never change: every resend carries them byte for byte, and the
  session table answers a batch it already applied from its cache.
* **Answers.**  "retry" (earlier batches of the session not applied yet) resends the
  batch, and every earlier one, after a short pause; SESSION_EXPIRED (the cluster
  evicted the session) fails the batch's calls with SessionExpiredError and starts a
  new *epoch*: a new session is registered for the calls after them.  A batch the
  cluster refuses ("too_large", "bad_request") was never proposed: it is split in
  halves under the same seqs until the one command to blame fails alone
  (RequestError); its seq is then a hole the session can never pass, so the batches
  after it are renumbered in a new epoch.
"""
from __future__ import annotations

import collections
import random
from typing import Callable, Optional

from .. import clientops as _ops
from .. import commands as _cmd
from .. import wire
from ..clientops import Op
from ..core import REGISTER_SESSION_ID
from ..errors import ClientError, CommandError, RequestError, SessionExpiredError
from .reads import live

__all__ = ["Writes", "Batch"]

_QUEUED, _SENT = _ops.QUEUED, _ops.SENT


class Batch:
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


def _batch_key(batch: Batch):
    return batch.key


class Writes:
    """Queued writes and client batches of one session (see the module doc).

    `register(batch)` is the session's: it gives the batch a request id on the
    current connection.  `stats` is the session's counters; `rng` draws nonces.
    """

    def __init__(self, settings, stats: dict, register: Callable[[Batch], int],
                 rng: random.Random) -> None:
        self._settings = settings
        self._stats = stats
        self._register = register
        self._rng = rng
        # Invariant: _acked_seq < _next_seq, and every seq up to _acked_seq of this
        # epoch has been answered.
        self._epoch = 0
        self.session_id: Optional[int] = None   # until registered
        self._registration: Optional[Batch] = None  # this epoch's, while unanswered
        self._repack: list = []     # op lists (a refused batch's successors) for the
        #                             next session, in order, once it is registered
        self._next_seq = 1
        self._acked_seq = 0
        self._completed: dict = {}  # first_seq -> count, answered above _acked_seq
        # Invariant: queued_count and _queued_bytes count the QUEUED ops of _queue
        # (payload + 4 bytes each); abandoned ones linger until taken or compacted.
        self._queue = collections.deque()
        self.queued_count = 0
        self._queued_bytes = 0
        self.outstanding: dict = {}   # batch.key -> Batch, until answered
        # The largest single result seen lately: sizes batches.  It jumps up at once
        # and decays by 10% a reply, so one big result does not unbatch the client.
        self.result_max = 0.0

    def check_invariants(self) -> None:
        """Assert what the fields promise (the simulator calls this after every step)."""
        queued = [op for op in self._queue if op.state == _QUEUED]
        assert self.queued_count == len(queued), (self.queued_count, len(queued))
        assert self._queued_bytes == sum(len(op.payload) + 4 for op in queued)
        assert 0 <= self._acked_seq < self._next_seq, (self._acked_seq, self._next_seq)
        assert self.session_id is None or self._registration is None
        for key, batch in self.outstanding.items():
            assert key == batch.key and not batch.done
            assert all(op.state != _QUEUED for op in batch.ops)
            if batch.epoch == self._epoch and batch.session_id == self.session_id:
                assert batch.first_seq + len(batch.ops) <= self._next_seq

    # -- callers ---------------------------------------------------------------

    def room(self) -> tuple[int, int]:
        """How many more writes, and bytes of them, the queue takes now."""
        return (self._settings.queue_commands_max - self.queued_count,
                self._settings.queue_bytes_max - self._queued_bytes)

    def has_room(self, size: int) -> bool:
        """Whether one more write of `size` queue bytes fits (always, when none is)."""
        return not self.queued_count or (
            self.queued_count < self._settings.queue_commands_max
            and self._queued_bytes + size <= self._settings.queue_bytes_max)

    def add(self, op: Op, size: int) -> None:
        """Queue one write (the caller marks it QUEUED)."""
        self._queue.append(op)
        self.queued_count += 1
        self._queued_bytes += size
        self._stats["commands"] += 1

    def add_many(self, ops: list, size: int) -> None:
        """Queue many writes (already QUEUED), `size` queue bytes in all."""
        self._queue.extend(ops)
        self.queued_count += len(ops)
        self._queued_bytes += size
        self._stats["commands"] += len(ops)

    def forget(self, count: int, size: int) -> None:
        """`count` queued writes (`size` bytes) were abandoned by their callers."""
        self.queued_count -= count
        self._queued_bytes -= size
        if len(self._queue) > 2 * self.queued_count + 1024:
            # Nothing drains the queue (no connection): drop the dead entries now, or
            # callers retrying in a loop would grow it forever.
            self._queue = live(self._queue)

    def waiting(self) -> bool:
        """Whether a caller waits on a write."""
        if self.queued_count or self._repack:
            return True
        return any(op.state == _SENT for batch in self.outstanding.values()
                   for op in batch.ops)

    def pending(self) -> list:
        """(op, maybe sent) for every op a caller may wait on, then empty the queues.

        Sent batches stay outstanding: their seqs are taken, so a later connection
        sends them again, before anything after them, whether anyone waits or not.
        Repacked ops are not in a batch yet: dropped with their calls.
        """
        pending = [(op, False) for op in self._queue]
        for batch in self.outstanding.values():
            pending += [(op, True) for op in batch.ops]
        pending += [(op, False) for ops in self._repack for op in ops]
        self._queue.clear()
        self.queued_count = self._queued_bytes = 0
        self._repack = []
        return pending

    # -- requests --------------------------------------------------------------

    def _body(self, batch: Batch) -> list:
        batch.request_id = self._register(batch)
        batch.resend_due = False
        self._stats["submit_requests"] += 1
        return wire.submit_request(batch.request_id, batch.data)

    def cap(self) -> int:
        """Commands per batch, so that replies stay near the reply budget."""
        settings = self._settings
        return max(1, min(settings.batch_commands_max,
                          int(settings.reply_budget_bytes // max(1.0, self.result_max))))

    def resend(self, bodies: list, *, only_due: bool) -> None:
        """Append requests resending the outstanding batches (`only_due`: the flagged
        ones), in session order, byte for byte."""
        for batch in sorted(self.outstanding.values(), key=_batch_key):
            if batch.resend_due or not only_due:
                bodies.append(self._body(batch))
                self._stats["resent_batches"] += 1

    def any_resend_due(self) -> bool:
        """Whether a batch waits for its resend (new ones would be answered "retry")."""
        return any(batch.resend_due for batch in self.outstanding.values())

    def _pack(self, epoch, session_id, first_seq, acked_seq, ops) -> Batch:
        """A batch of `ops`; with no ops, a registration (its one command empty)."""
        if ops:
            data = _ops.pack_ops(session_id, first_seq, acked_seq, ops)
        else:
            data = _cmd.pack_client_batch(session_id, first_seq, acked_seq, [b""])
        return Batch(epoch, session_id, first_seq, ops, data)

    def collect(self, bodies: list) -> None:
        """Append requests for queued writes while the window has room: the session's
        registration first, then a refused batch's successors, then new batches."""
        window = self._settings.inflight_batches_max
        if self.session_id is None:
            if (self.queued_count or self._repack) and self._registration is None:
                nonce = self._rng.randrange(1, _cmd.SEQ_LIMIT - 1)
                self._registration = self._pack(self._epoch, REGISTER_SESSION_ID, nonce, 0, [])
                self.outstanding[self._registration.key] = self._registration
                bodies.append(self._body(self._registration))
            return
        while self._repack and len(self.outstanding) < window:
            ops = self._repack.pop(0)
            batch = self._pack(self._epoch, self.session_id, self._next_seq, 0, ops)
            self._next_seq += len(ops)
            self.outstanding[batch.key] = batch
            bodies.append(self._body(batch))
        while self.queued_count and not self._repack and len(self.outstanding) < window:
            ops, size = _ops.take(self._queue, self.cap(), self._settings.batch_bytes_max)
            if not ops:
                break
            self.queued_count -= len(ops)
            self._queued_bytes -= size
            batch = self._pack(self._epoch, self.session_id, self._next_seq,
                               self._acked_seq, ops)
            self._next_seq += len(ops)
            self.outstanding[batch.key] = batch
            self._stats["batches"] += 1
            bodies.append(self._body(batch))

    # -- replies ---------------------------------------------------------------

    def answered(self, batch: Batch, request_id: int, payload) -> Optional[float]:
        """A send of `batch` was answered "ok" with `payload` (packed results).

        Then either `batch.done` (a leader answered: its calls are finished), or the
        pause after which it and every earlier batch go again is returned ("retry"),
        or None (an older send's "retry": the latest send is still out).
        """
        if type(payload) is not bytes:
            raise wire.ProtocolError("submit answered with a non-bytes payload")
        if batch.session_id == REGISTER_SESSION_ID:
            self._registered(batch, payload)
            return None
        if _cmd.all_ok_empty(payload, len(batch.ops)):
            # A batch of puts: nothing to unpack or look at one by one.
            self.result_max *= 0.9
            self._finish(batch, None)
            return None
        try:
            results = _cmd.unpack_results(payload)
        except ValueError as exc:
            raise wire.ProtocolError(f"bad packed results: {exc}") from None
        if len(results) != len(batch.ops):
            raise wire.ProtocolError(f"{len(results)} results for {len(batch.ops)} commands")
        self.result_max = max(max([len(data) for _, data in results]), 0.9 * self.result_max)
        if not any(status == _cmd.RESULT_RETRY for status, _ in results):
            self._finish(batch, results)
            return None
        # Earlier commands of the session are not applied yet (a leader change
        # reordered batches): send this one again once they are in front of it.
        self._stats["retry_results"] += 1
        if request_id != batch.request_id:
            return None
        batch.retries += 1
        # The earlier ones go again too, in order: one of them may have been lost
        # without a word (the connection stayed up), and then nothing else would ever
        # send it.  Duplicates are answered from the cache.
        for other in self.outstanding.values():
            if other.epoch == batch.epoch and other.first_seq < batch.first_seq:
                other.resend_due = True
        batch.resend_due = True
        return min(self._settings.retry_pause_s * 2 ** (batch.retries - 1),
                   self._settings.retry_pause_max_s)

    def _registered(self, batch: Batch, payload: bytes) -> None:
        try:
            (status, data), = _cmd.unpack_results(payload)
        except ValueError:
            raise wire.ProtocolError("a registration answered with other than one result") from None
        if status != _cmd.RESULT_OK or len(data) != 8:
            raise wire.ProtocolError(f"a registration answered with status {status}")
        batch.done = True
        del self.outstanding[batch.key]
        if batch is not self._registration:
            return   # an earlier epoch's, answered late: that session just ages out
        self._registration = None
        self.session_id = int.from_bytes(data, "little")
        self._next_seq = 1
        self._acked_seq = 0
        self._completed = {}
        self._stats["registrations"] += 1

    def _new_session(self) -> None:
        """Start a new epoch: the next write registers a new session first."""
        self._epoch += 1
        self.session_id = None
        self._registration = None
        self._next_seq = 1
        self._acked_seq = 0
        self._completed = {}

    def _finish(self, batch: Batch, results) -> None:
        """Finish a batch's calls with `results` ((status, bytes) per command; None:
        every one OK with no bytes)."""
        batch.done = True
        del self.outstanding[batch.key]
        if batch.epoch == self._epoch:
            self._completed[batch.first_seq] = len(batch.ops)
            completed = self._completed
            while self._acked_seq + 1 in completed:
                self._acked_seq += completed.pop(self._acked_seq + 1)
        if results is None:   # all OK, no result bytes
            _ops.finish_ok_empty(batch.ops)
            return
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
        if results and results[0][0] == _cmd.RESULT_SESSION_EXPIRED and batch.epoch == self._epoch:
            # The session was evicted (the core then answers every command of the batch
            # so): later calls go in a new one.  Batches of the old one still in flight
            # get their own answers.
            self._stats["sessions_expired"] += 1
            self._new_session()

    def refused(self, batch: Batch, code: str, message: str) -> bool:
        """The cluster refused `batch` outright, so it was never proposed; True if
        halves of it are to be sent now."""
        if batch.session_id == REGISTER_SESSION_ID:
            raise wire.ProtocolError(f"the cluster refused a session registration "
                                     f"({code}: {message})")
        del self.outstanding[batch.key]
        batch.done = True
        if len(batch.ops) > 1:
            # Maybe one command is to blame (a replica with a smaller limit than ours):
            # the same seqs in two halves (and so on) isolate it.  Safe: a refused
            # batch was never proposed, so its seqs are still free.
            half = len(batch.ops) // 2
            acked = int.from_bytes(batch.data[16:24], "little")
            for offset, ops in ((0, batch.ops[:half]), (half, batch.ops[half:])):
                part = self._pack(batch.epoch, batch.session_id, batch.first_seq + offset,
                                  acked, ops)
                self.outstanding[part.key] = part
                part.resend_due = True
            return True
        op = batch.ops[0]
        if op.state == _SENT:
            op.finish(error=RequestError(f"the cluster refused the command ({code}: "
                                         f"{message})", maybe_applied=False))
        if batch.epoch != self._epoch:
            return False  # already renumbered by an earlier refusal
        # Its seq is now a hole this session can never pass; every later batch of the
        # session is therefore unapplied (and unappliable).  Renumber them in a new
        # session, in order.
        later = sorted((b for b in self.outstanding.values()
                        if b.epoch == batch.epoch and b.first_seq > batch.first_seq),
                       key=lambda b: b.first_seq)
        self._stats["session_restarts"] += 1
        self._new_session()
        for old in later:   # sent again, in order, once the new session is registered
            del self.outstanding[old.key]
            old.done = True
            self._repack.append(old.ops)
        return False
