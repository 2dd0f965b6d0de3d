"""The client's protocol, without I/O: `ClientSession`.

Theory of operation
-------------------
A `ClientSession` is everything a client decides, in the manner of h11's
`Connection`: the wiring around it (the Trio `Client` of `cypaxos.client.api`, the
simulator's clients in `cypaxos.testing.simclient`) owns the sockets and the clock,
feeds it inputs and carries out its outputs.  It does no I/O and reads no clock:
every input is told `now`, in seconds of the wiring's clock (the one the calls'
deadlines are in); its randomness comes from an injected generator.

Inputs:

* calls: `queue_one` / `queue_many` (ops callers wait on, with their deadlines),
  `forget_queued` (callers that gave up before their ops were sent);
* the connection: `connection_made`, `connection_failed`, `connection_lost`, and
  each reply on it, parsed (`reply_received`; `reply_too_large` when the frame
  decoder refused one);
* time: `expire(now)` at the deadlines, and `now` with everything else.

Outputs:

* `requests_to_send(now)`: request bodies (`wire.submit_request`,
  `wire.read_request`) to write on the connection now, and `next_send_at()`: when
  to ask again if no other input comes;
* `wants_connection()` and `next_dial(now)`: whether a connection is needed, to
  which address and from when; `disconnect`: why the current one should be closed
  (a redirect, a replica shutting down, requests stalled);
* finished calls: each op is finished (`Op.finish`), which wakes the caller parked
  on it (`cypaxos.clientops`); `expired_error` is the error of a call past its
  deadline.

The parts, each a small class of its own module, and what the session itself owns:

* `Writes` (`cypaxos.client.writes`): the session id and its registration, sequence
  numbers, batches, the in-flight window, what "retry", SESSION_EXPIRED and a refusal
  mean;
* `Reads` (`cypaxos.client.reads`): queued queries and read requests;
* `Deadlines` (`cypaxos.client.deadlines`): when calls give up;
* `Router` (`cypaxos.client.routing`): which replica to dial and when, failing fast
  when every replica refuses, and what the errors say;
* here: the connection (request ids, resending everything unanswered byte for byte
  on a new one, redirects, stalls), "busy" answers, failing or closing everything
  pending, and `maybe_applied`: a write that never left the client was certainly not
  applied, one that was sent may have been, a read never changes anything.

docs/internals.md ("Client") has the whole picture; the per-op loops the parts drive
are compiled (`cypaxos.clientops`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from .. import clientops as _ops
from .. import wire
from ..clientops import Op
from ..errors import ClientError, ClosedError, TimeoutError, UnavailableError
from .deadlines import Deadlines
from .reads import Read, Reads
from .routing import Router
from .writes import Batch, Writes

__all__ = ["ClientSession", "SessionSettings"]

_QUEUED, _SENT = _ops.QUEUED, _ops.SENT


@dataclass(frozen=True)
class SessionSettings:
    """A client's limits and timings (seconds); the defaults are the client's."""

    batch_bytes_max: int = 1 << 20
    """A batch is cut once its payload would pass this (a bigger command goes alone)."""
    batch_commands_max: int = 4096
    """Commands (or queries) per request, at most."""
    inflight_batches_max: int = 64
    """Client batches sent and not yet answered; more writes wait in the queue."""
    inflight_reads_max: int = 64
    """Read requests sent and not yet answered; more reads wait in their queue."""
    queue_commands_max: int = 65536
    """Calls queued and not yet sent, per queue; more callers wait for room."""
    queue_bytes_max: int = 64 << 20
    """Bytes of queued writes not yet sent; more writers wait for room."""
    reply_budget_bytes: int = 8 << 20
    """Requests are cut so that their replies should stay under this, judging by the
    largest single result seen lately."""
    backoff_min_s: float = 0.02
    """The first pause after a round of failed dials, or before resending a batch
    answered "busy"; it doubles..."""
    backoff_max_s: float = 0.5
    """...up to this, and resets once a leader answers."""
    retry_pause_s: float = 0.005
    """Before resending a batch answered "retry" (doubling per retry)..."""
    retry_pause_max_s: float = 0.2
    """...up to this."""
    connect_timeout_s: float = 2.0
    """A dial and its handshake (for the wiring: the session never waits)."""
    stall_timeout_s: float = 2.0
    """Requests pending and no reply this long: leave that replica for another."""

    def __post_init__(self) -> None:
        for name in ("batch_bytes_max", "batch_commands_max", "inflight_batches_max",
                     "inflight_reads_max", "queue_commands_max", "queue_bytes_max",
                     "reply_budget_bytes"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int")
        for name in ("backoff_min_s", "backoff_max_s", "retry_pause_s", "retry_pause_max_s",
                     "connect_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")


_STAT_NAMES = (
    "commands", "batches", "submit_requests", "resent_batches", "reads", "stale_reads",
    "read_requests", "resent_reads", "redirects", "connections", "connect_failures",
    "retry_results", "busy_replies", "timeouts", "session_restarts", "registrations",
    "sessions_expired", "stalls", "fail_fast")


class ClientSession:
    """The protocol side of one client (see the module doc): no I/O, no clock.

    `addresses`: the replicas given (parsed); `settings`: limits and timings;
    `rng`: the randomness of the first address and the registration nonces.
    """

    def __init__(self, addresses: list[str], settings: Optional[SessionSettings] = None, *,
                 rng: Optional[random.Random] = None) -> None:
        self.settings = settings = settings if settings is not None else SessionSettings()
        rng = rng if rng is not None else random.SystemRandom()
        self.router = Router(addresses, backoff_min_s=settings.backoff_min_s,
                             backoff_max_s=settings.backoff_max_s, rng=rng)
        self.closed = False
        self._stats = dict.fromkeys(_STAT_NAMES, 0)
        self._writes = Writes(settings, self._stats, self._register, rng)
        self._reads = Reads(settings, self._stats, self._register)
        self._deadlines = Deadlines()
        self._resend_at = math.inf  # when flagged batches and reads go out again
        self._request_id = 0

        # The connection (one at a time).  Invariant: _requests is empty while not
        # connected; it maps the request ids sent on this one to their batch or read.
        self._connected = False
        self._address: Optional[str] = None
        self._replica_id: Optional[int] = None
        self._requests: dict[int, Union[Batch, Read]] = {}
        self._resend_all = False    # a new connection: everything unanswered goes again
        self._last_progress = 0.0   # a reply, or requests sent after none were pending
        self._answered = False      # got at least one "ok" on this connection
        self._redirected = False
        self._hint: Optional[str] = None
        self.disconnect: Optional[str] = None
        """Why the current connection should be closed (None: it should not)."""

    # -- facts ---------------------------------------------------------------

    @property
    def session_id(self) -> Optional[int]:
        """The session id the cluster assigned (None until registered)."""
        return self._writes.session_id

    @property
    def addresses(self) -> list[str]:
        """The replicas known: the ones given, then the ones redirects named."""
        return self.router.addresses

    @property
    def connected_to(self) -> Optional[str]:
        """The address of the current connection, if any."""
        return self._address if self._connected else None

    def statistics(self) -> dict[str, Any]:
        """Counters (see `cypaxos.client.Client.statistics`) and the current state."""
        stats = {
            "session_id": self.session_id,
            "connected_to": self.connected_to,
            "connected_replica_id": self._replica_id if self._connected else None,
            "queued_commands": self._writes.queued_count,
            "outstanding_batches": len(self._writes.outstanding),
            "outstanding_reads": len(self._reads.inflight),
        }
        stats.update(self._stats)
        return stats

    def check_invariants(self) -> None:
        """Assert what the fields promise (the simulator calls this after every step)."""
        assert self._connected or not self._requests, "requests without a connection"
        assert self._connected or self.disconnect is None
        for request_id, target in self._requests.items():
            assert 0 < request_id <= self._request_id
        self._writes.check_invariants()

    # -- calls ---------------------------------------------------------------

    def room(self, write: bool, stale: bool = False) -> tuple[int, float]:
        """How many more calls (and bytes of writes) the queue takes now."""
        if write:
            return self._writes.room()
        return self._reads.room(stale), math.inf

    def has_room(self, write: bool, stale: bool, size: int) -> bool:
        """Whether one more call of `size` queue bytes fits (a write always does when
        none is queued)."""
        if write:
            return self._writes.has_room(size)
        return self._reads.room(stale) > 0

    def queue_one(self, op: Op, write: bool, stale: bool, size: int,
                  default_timeout: bool) -> bool:
        """Queue one call's op (`size`: payload + 4 bytes) and watch its deadline;
        True if the wiring must call `expire` earlier than it planned to."""
        if write:
            self._writes.add(op, size)
        else:
            self._reads.add(op, stale)
        op.state = _QUEUED
        return self._deadlines.arm(op, default_timeout)

    def queue_many(self, ops: list[Op], write: bool, stale: bool, size: int,
                   default_timeout: bool) -> bool:
        """`queue_one` for a bulk call's ops (one deadline; `size` bytes in all)."""
        _ops.mark(ops, _QUEUED)
        if write:
            self._writes.add_many(ops, size)
        else:
            self._reads.add_many(ops, stale)
        return self._deadlines.arm_all(ops, default_timeout)

    def forget_queued(self, write: bool, count: int, size: int) -> None:
        """Account for `count` queued ops (`size` bytes) whose callers gave up.

        They were never sent (taking skips abandoned ops), so they can never be
        applied after their callers were told they were not.
        """
        if write:
            self._writes.forget(count, size)
        else:
            self._reads.forget(count)

    def expire(self, now: float) -> float:
        """Mark ops past their deadline expired (waking their callers); the next
        deadline (inf if none).  The wiring calls this again by then, and sooner when
        queuing a call returned True."""
        return self._deadlines.expire(now)

    def expired_error(self, op: Op, start: float, deadline: float) -> ClientError:
        """The error for a call that began at `start` and is past its `deadline`."""
        self._stats["timeouts"] += 1
        waited = deadline - start
        router = self.router
        # Unreachable: no connection now, and not one word from any replica since the
        # call began (a connection that was up then but died silently does not count).
        # A connection that is up but silent (a frozen replica) is a plain timeout.
        if not self._connected and router.last_contact < start:
            return UnavailableError(f"no replica reachable within {waited:.3g} s "
                                    f"({router.last_error})", maybe_applied=op.sent)
        if router.last_leader_ok < start and router.last_no_leader >= start:
            return UnavailableError(
                f"no leader within {waited:.3g} s: no quorum, or an election in "
                f"progress ({router.no_leader_detail})", maybe_applied=op.sent)
        if self._connected:
            where = f" (connected to {self._address})"
        else:
            where = f" (not connected; last error: {router.last_error})"
        return TimeoutError(f"no answer within {waited:.3g} s{where}", maybe_applied=op.sent)

    def close(self) -> None:
        """Fail every pending call with ClosedError (a sent write: maybe applied)."""
        if self.closed:
            return
        self.closed = True
        self._fail_pending(lambda sent: ClosedError(
            "the client was closed before the call completed", maybe_applied=sent))

    def _fail_pending(self, make_error: Callable[[bool], ClientError]) -> None:
        """Finish every op a caller waits on with `make_error(sent)`; empty the queues."""
        pending = self._writes.pending()
        pending += [(op, False) for op in self._reads.pending()]
        for op, maybe_applied in pending:
            if op.state == _QUEUED or op.state == _SENT:
                op.finish(error=make_error(maybe_applied))

    # -- the connection --------------------------------------------------------

    def wants_connection(self) -> bool:
        """Whether any caller waits on something a connection would carry (calls
        abandoned by callers that timed out do not count, nor linger)."""
        return self._writes.waiting() or self._reads.waiting()

    def next_dial(self, now: float, *, after_idle: bool = False) -> tuple[str, float]:
        """The address to connect to next and the time to do it (see `Router`)."""
        return self.router.next_dial(now, after_idle=after_idle)

    def connection_failed(self, address: str, reason: str, now: float, *,
                          definitive: bool = False, reachable: bool = False) -> None:
        """A dial of `address` failed (`definitive`, `reachable`: see `Router.dial_failed`).

        When every replica has now failed definitively, the pending calls fail at
        once with UnavailableError.
        """
        self._stats["connect_failures"] += 1
        everywhere = self.router.dial_failed(address, reason, now, definitive=definitive,
                                             reachable=reachable)
        if everywhere is not None and self.wants_connection():
            self._stats["fail_fast"] += 1
            self._fail_pending(lambda sent: UnavailableError(
                f"no replica reachable: {everywhere}", maybe_applied=sent))

    def connection_made(self, address: str, cluster_id: str, replica_id: int,
                        now: float) -> Optional[str]:
        """The handshake with `address` succeeded: None, or why the connection must be
        closed unused (a replica of another cluster; counted as a failed dial)."""
        refusal = self.router.welcomed(address, cluster_id, now)
        if refusal is not None:
            self.connection_failed(address, refusal, now, definitive=True, reachable=True)
            return refusal
        self._stats["connections"] += 1
        self._connected = True
        self._address = address
        self._replica_id = replica_id
        self._resend_all = True
        self._last_progress = now
        self._answered = self._redirected = False
        self._hint = None
        self.disconnect = None
        return None

    def connection_lost(self, now: float, reason: str = "") -> None:
        """The current connection ended (closed by either side, or `disconnect`)."""
        if not self._connected:
            return
        self._connected = False
        self._requests.clear()
        self.router.connection_ended(
            self._address or "", now, reason=self.disconnect or reason,
            answered=self._answered, redirected=self._redirected, hint=self._hint)
        self.disconnect = None
        self._hint = None

    def _end(self, reason: str) -> None:
        if self.disconnect is None:
            self.disconnect = reason

    def _register(self, target: Union[Batch, Read]) -> int:
        """A request id on the current connection for `target` (a batch or a read)."""
        self._request_id += 1
        self._requests[self._request_id] = target
        return self._request_id

    # -- replies ---------------------------------------------------------------

    def reply_too_large(self) -> None:
        """The frame decoder refused a reply as too big: one command or query per
        request from now on (many large results batched together), or it repeats."""
        self._writes.result_max = self._reads.result_max = float(wire.FRAME_BYTES_MAX)

    def reply_received(self, reply: tuple[Any, ...], now: float) -> None:
        """A reply on the current connection (checked by `wire.parse_reply`).

        Raises `wire.ProtocolError` if it makes no sense for its request (then the
        wiring closes the connection).
        """
        self.router.last_contact = now
        target = self._requests.pop(reply[1], None)
        if target is None or target.done:
            return   # an answer to an earlier send of something already answered
        self._last_progress = now
        kind = reply[0]
        if kind == "ok":
            if isinstance(target, Batch):
                # Any send's answer will do: every send carried the same bytes.
                pause = self._writes.answered(target, reply[1], reply[2])
                self._answered = True
                if target.done:
                    self.router.leader_answered(now)
                    self._deadlines.sweep(now)   # drops finished heads
                elif pause is not None:
                    self._resend_at = min(self._resend_at, now + pause)
            elif reply[1] == target.request_id:
                # Only the latest send's: a resend may carry fewer queries (pruned).
                self._reads.answered(target, reply[2])
                self._answered = True
                if not target.stale:
                    self.router.leader_answered(now)
                self._deadlines.sweep(now)
        elif kind == "redirect":
            self._stats["redirects"] += 1
            hint = reply[2]
            if self.disconnect is None:
                self._redirected = True
                if hint is None or hint == self._address:
                    self.router.no_leader(self._address or "", now)
                    self._end("no leader known")
                else:
                    self._hint = hint
                    self._end(f"redirected to {hint}")
        else:
            self._on_error(target, reply[1], reply[2], reply[3], now)

    def _on_error(self, target: Union[Batch, Read], request_id: int, code: str, message: str,
                  now: float) -> None:
        if code == "shutting_down":
            # This replica is going away: go elsewhere; everything gets resent there.
            self._end(f"replica shutting down ({message})")
            return
        if code in ("too_large", "bad_request"):
            if not isinstance(target, Batch):
                self._reads.refused(target, code, message)
            elif self._writes.refused(target, code, message):
                self._resend_at = now   # its halves
            return
        # "busy", or a code newer than this client: assume it is transient and resend
        # after a backoff (nothing was applied, so retrying is safe).
        self._stats["busy_replies"] += 1
        if request_id == target.request_id:
            pause = min(self.settings.backoff_min_s * 2 ** target.retries,
                        self.settings.backoff_max_s)
            target.retries += 1
            target.resend_due = True
            self._resend_at = min(self._resend_at, now + pause)

    # -- sending ---------------------------------------------------------------

    def has_requests_in_flight(self) -> bool:
        """Whether requests on the current connection await their replies."""
        return bool(self._requests)

    def next_send_at(self) -> float:
        """When `requests_to_send` has something to do even if no input comes."""
        at = self._resend_at
        if self._requests:
            at = min(at, self._last_progress + self.settings.stall_timeout_s)
        return at

    def requests_to_send(self, now: float) -> list[list[Any]]:
        """The request bodies to send on the connection now (in order); maybe none.

        Sets `disconnect` instead if requests have been pending without any reply
        for `stall_timeout_s`.
        """
        if not self._connected or self.disconnect is not None:
            return []
        bodies: list[list[Any]] = []
        if self._resend_all:
            # A new connection: everything unanswered goes again, batches in session
            # order and byte for byte (the session table makes them exactly-once).
            self._resend_all = False
            self._writes.resend(bodies, only_due=False)
            self._reads.resend(bodies, only_due=False)
            self._resend_at = math.inf
        if self._requests and now >= self._last_progress + self.settings.stall_timeout_s:
            self._stats["stalls"] += 1
            self._end(f"no reply for {self.settings.stall_timeout_s:g} s")
            return []
        if not self._requests:
            self._last_progress = now
        held = False
        if now >= self._resend_at:
            self._resend_at = math.inf
            self._writes.resend(bodies, only_due=True)
            self._reads.resend(bodies, only_due=True)
        elif self._resend_at < math.inf:
            # New batches would only be answered "retry" behind a batch waiting to be
            # resent: hold them until it goes.
            held = self._writes.any_resend_due()
        self._reads.collect(bodies)
        if not held:
            self._writes.collect(bodies)
        return bodies
