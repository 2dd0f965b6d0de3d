"""The calls a client offers, for any event loop: `ClientCalls`.

`ClientCalls` is the front end of a client: the public methods (put, get, cas, ...,
the bulk calls), turning each call into ops (`cypaxos.clientops.Op`) queued on the
client's `ClientSession`, waiting for room in the queue, parking the caller until
its ops end, and turning how they ended into a result or an exception.  It knows
no event loop: a wiring subclasses it and supplies

* `_now()`: the clock deadlines are in (seconds);
* `await _park(op)`: sleep until `op` is finished or expires (it sets `op.task`,
  which the session's finishing wakes; see `cypaxos.clientops`);
* `await _park_for_room(deadline)`: sleep until queue room may have appeared (the
  wiring wakes these after the session sent something or a caller gave up) or the
  deadline;
* `_kick()`: something was queued (wake the sender; a connection may be needed);
* `_wake_timer()`: a deadline earlier than the timer's next wake-up was armed;
* `_room_freed()`: callers gave up, so queue room may have appeared;
* `await _ask_all(make_request, make_entry, timeout)`: one request to every replica
  on its own short connection (`status`, `snapshot`);
* `_close()`: close the client (`self._session.close()`, then stop its tasks).

The Trio wiring is `cypaxos.client.api.Client`; the simulator's clients
(`cypaxos.testing.simclient`) are another.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional, TypeVar, Union, overload

from .. import clientops as _ops
from .. import commands as _cmd
from .. import wire
from ..addresses import Addresses, parse_addresses
from ..clientops import Op as _Op
from ..errors import ClientError, ClosedError, ConfigError, RequestError
from .session import ClientSession, SessionSettings
from .store import StoreCalls, _as_bytes

__all__ = ["ClientCalls", "Bytes", "COMMAND_BYTES_MAX"]

Bytes = Union[bytes, bytearray, memoryview, str]
"""What keys, values, commands and queries may be given as (str is UTF-8 encoded)."""

# CBOR of ["submit", id, batch] costs at most 1 + 7 + 9 + 5 bytes around the batch; ["read",
# id, [query], stale] a little less.  Rounded up, so the frame can never pass the limit.
_REQUEST_OVERHEAD = 64
COMMAND_BYTES_MAX = (wire.FRAME_BYTES_MAX - _cmd.BATCH_HEADER_BYTES - 4
                     - _REQUEST_OVERHEAD)
"""The largest command (or query) that fits one frame; bigger ones raise RequestError."""

_QUEUED, _SENT, _DONE, _ABANDONED = _ops.QUEUED, _ops.SENT, _ops.DONE, _ops.ABANDONED

_T = TypeVar("_T")
Entry = dict[str, Any]
"""One replica's entry in `status()` or `snapshot()`."""


def fill_entry(entry: Entry, replica_id: int, reply: tuple[Any, ...],
               make_entry: Callable[[Entry, Any], None]) -> None:
    """Fill one replica's `status()`/`snapshot()` entry from its parsed reply (any
    wiring's `_ask_all`: only how it waits differs)."""
    entry["reachable"] = True
    entry["id"] = replica_id
    if reply[0] == "ok":
        make_entry(entry, reply[2])
    elif reply[0] == "error":
        entry["error"] = f"{reply[2]}: {reply[3]}"
    else:
        entry["error"] = f"redirected to {reply[2]}"


def _check_size(payload: bytes, what: str) -> None:
    if len(payload) > COMMAND_BYTES_MAX:
        raise RequestError(f"{what} of {len(payload)} bytes exceeds the limit of "
                           f"{COMMAND_BYTES_MAX} bytes")


def _error_of(op: _Op) -> BaseException:
    """Take `op`'s error off it, to be raised.

    Ops are not tracked by the cyclic GC (there are hundreds of thousands a second):
    an op still holding an exception whose traceback holds the op (through the
    raising frame) would be a cycle nothing collects.
    """
    error: BaseException = op.error
    op.error = None
    return error


def _decode(decoder: Callable[[Any], _T], result: Any) -> _T:
    try:
        return decoder(result)
    except ValueError as exc:
        raise ClientError(f"malformed result from the cluster: {exc}",
                          maybe_applied=True) from None


class ClientCalls(StoreCalls):
    """The public calls of a cypaxos client over a `ClientSession` (see the module doc).

    Many callers may call concurrently: their commands are pipelined and batched.
    Every method takes an optional `timeout=` (seconds, None for the client's
    default) and raises a subclass of `cypaxos.errors.ClientError` on failure.
    """

    def __init__(self, addresses: Addresses, *, timeout: float = 5.0,
                 settings: Optional[SessionSettings] = None,
                 rng: Optional[random.Random] = None) -> None:
        """Parse `addresses` (ConfigError if malformed) and make the session."""
        parsed = parse_addresses(addresses)
        if timeout is None or not timeout > 0:
            raise ConfigError("timeout must be a positive number of seconds")
        self._timeout = float(timeout)
        self._session = ClientSession(parsed, settings, rng=rng)

    # -- what the wiring supplies ----------------------------------------------

    def _now(self) -> float:
        raise NotImplementedError

    async def _park(self, op: _Op) -> None:
        raise NotImplementedError

    async def _park_for_room(self, deadline: float) -> None:
        raise NotImplementedError

    def _kick(self) -> None:
        raise NotImplementedError

    def _wake_timer(self) -> None:
        raise NotImplementedError

    def _room_freed(self) -> None:
        raise NotImplementedError

    async def _ask_all(self, make_request: Callable[[int], list[Any]],
                       make_entry: Callable[[Entry, Any], None],
                       timeout: Optional[float]) -> list[Entry]:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """The replica addresses known to this client (given ones, then learned ones)."""
        return list(self._session.addresses)

    @property
    def closed(self) -> bool:
        """Whether the client has been closed."""
        return self._session.closed

    @property
    def session_id(self) -> Optional[int]:
        """This client's current session id (assigned by the cluster when the client
        registers, before its first write; None until then)."""
        return self._session.session_id

    async def put(self, key: Bytes, value: Bytes, *, timeout: Optional[float] = None) -> None:
        """Set `key` to `value` (replicated, exactly once)."""
        command = _cmd.encode_put(_as_bytes(key, "key"), _as_bytes(value, "value"))
        await self._call(command, True, False, timeout)

    async def delete(self, key: Bytes, *, timeout: Optional[float] = None) -> bool:
        """Remove `key`; True if it existed."""
        result = await self._call(_cmd.encode_delete(_as_bytes(key, "key")), True, False,
                                  timeout)
        existed: bool = _decode(_cmd.decode_bool, result)
        return existed

    async def cas(self, key: Bytes, expected: Optional[Bytes], new: Bytes, *,
                  timeout: Optional[float] = None) -> bool:
        """Set `key` to `new` only if its value is `expected` (None: only if absent).

        Returns True if it swapped.  Atomic: decided by the replicated state machine.
        """
        if expected is not None:
            expected = _as_bytes(expected, "expected")
        command = _cmd.encode_cas(_as_bytes(key, "key"), expected, _as_bytes(new, "new"))
        swapped: bool = _decode(_cmd.decode_bool, await self._call(command, True, False, timeout))
        return swapped

    @overload
    async def get(self, key: Bytes, *, stale: bool = False,
                  with_revision: Literal[False] = False,
                  timeout: Optional[float] = None) -> Optional[bytes]: ...

    @overload
    async def get(self, key: Bytes, *, stale: bool = False,
                  with_revision: Literal[True],
                  timeout: Optional[float] = None) -> tuple[Optional[bytes], int]: ...

    async def get(self, key: Bytes, *, stale: bool = False, with_revision: bool = False,
                  timeout: Optional[float] = None
                  ) -> Union[Optional[bytes], tuple[Optional[bytes], int]]:
        """The value of `key`, or None if absent.

        Linearizable by default (confirmed by the leader with a quorum); `stale=True`
        answers from the connected replica's current state, which may lag.
        `with_revision=True` returns `(value, revision)` instead, `revision` being the
        key's last change (0 if absent).
        """
        if with_revision:
            return await self._get_with_revision(_as_bytes(key, "key"), stale, timeout)
        result = await self._call(_cmd.encode_get(_as_bytes(key, "key")), False, stale,
                                  timeout)
        value: Optional[bytes] = _decode(_cmd.decode_get, result)
        return value

    async def submit(self, command: Bytes, *, timeout: Optional[float] = None) -> bytes:
        """Replicate a raw command for a custom state machine; returns its result bytes.

        Raises CommandError if the state machine raised (the failure is replicated).
        """
        return await self._call(_as_bytes(command, "command"), True, False, timeout)

    async def query(self, query: Bytes, *, stale: bool = False,
                    timeout: Optional[float] = None) -> bytes:
        """Answer a read-only query from the state machine (linearizable unless `stale`)."""
        return await self._call(_as_bytes(query, "query"), False, stale, timeout)

    # -- bulk calls: one wake-up for many commands ------------------------------
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
        values: list[Optional[bytes]] = _decode(_cmd.decode_gets, results)
        return values

    async def query_many(self, queries: Iterable[Bytes], *, stale: bool = False,
                         timeout: Optional[float] = None,
                         return_exceptions: bool = False) -> list[Any]:
        """Answer read-only queries, in order; like `query` for each (see `submit_many`
        for `return_exceptions`)."""
        payloads = [_as_bytes(query, "query") for query in queries]
        return await self._many(payloads, False, stale, timeout, return_exceptions)

    async def status(self, *, timeout: Optional[float] = None) -> list[Entry]:
        """Ask every known replica for its status, each on its own short connection.

        Returns one dict per address, in order: `address`, `reachable`, and when
        reachable the replica's fields (`id`, `role`, `ballot`, `commit_index`,
        `applied_index`, `state_digest`, `leader`, ...); when not, `error`.
        """
        self._check_open()
        return await self._ask_all(wire.status_request, _status_entry, timeout)

    async def snapshot(self, *, timeout: Optional[float] = None) -> list[Entry]:
        """Ask every known replica to take a snapshot now.

        Returns one dict per address: `address`, `reachable`, `id` and `applied_index`
        (the snapshot's index) on success, or `error` (unreachable, or the replica's
        error reply, e.g. if it does not support snapshots).
        """
        self._check_open()
        return await self._ask_all(wire.snapshot_request, _snapshot_entry, timeout)

    def statistics(self) -> dict[str, Any]:
        """Counters of this client's work so far, and its current connection.

        `commands` (writes called), `batches` (client batches formed from them),
        `submit_requests` (submit frames sent, resends included), `resent_batches`,
        `reads`/`stale_reads` (queries called), `read_requests`, `resent_reads`,
        `redirects`, `connections`, `connect_failures`, `retry_results`,
        `busy_replies`, `timeouts`, `session_restarts`, `registrations` (sessions
        registered), `sessions_expired` (sessions the cluster had dropped), `stalls`,
        `fail_fast` (times every replica refused and the pending calls failed at
        once); and `session_id`, `connected_to`, `connected_replica_id`,
        `queued_commands`, `outstanding_batches`, `outstanding_reads`.
        """
        return self._session.statistics()

    # -- calls -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._session.closed:
            raise ClosedError("the client is closed")

    def _deadline(self, timeout: Optional[float]) -> tuple[float, float, float]:
        if timeout is None:
            timeout = self._timeout
        elif not timeout > 0:
            raise ValueError("timeout must be positive")
        start = self._now()
        return start, start + timeout, timeout

    async def _wait_for_room(self, write: bool, stale: bool, size: int,
                             deadline: float) -> bool:
        """Wait until one more call of `size` queue bytes fits; False at the deadline.

        Memory stays bounded however many callers call at once.
        """
        session = self._session
        while not session.has_room(write, stale, size):
            if self._now() >= deadline:
                return False
            await self._park_for_room(deadline)
            self._check_open()
        return True

    async def _call(self, payload: bytes, write: bool, stale: bool,
                    timeout: Optional[float]) -> bytes:
        """Queue one command (`write`) or query, park until it ends; its result bytes."""
        self._check_open()
        if len(payload) > COMMAND_BYTES_MAX:
            _check_size(payload, "command" if write else "query")
        start, deadline, timeout = self._deadline(timeout)
        op = _Op(payload, deadline)
        size = len(payload) + 4
        session = self._session
        try:
            if not session.has_room(write, stale, size):
                if not await self._wait_for_room(write, stale, size, deadline):
                    raise session.expired_error(op, start, deadline)
            if session.queue_one(op, write, stale, size, timeout == self._timeout):
                self._wake_timer()
            self._kick()
            await self._park(op)
        finally:
            state = op.state
            if state == _QUEUED:
                # Never sent: forget it (taking skips abandoned ops), so it can never
                # be applied after its caller was told it was not.
                op.state = _ABANDONED
                session.forget_queued(write, 1, size)
                self._room_freed()
            elif state == _SENT:
                op.state = _ABANDONED   # its batch still goes through; nobody waits
        if op.error is not None:
            raise _error_of(op)
        if op.state == _DONE:
            value: bytes = op.value
            return value
        if not write:
            op.sent = False   # a read never changes anything
        raise session.expired_error(op, start, deadline)

    async def _many(self, payloads: list[bytes], write: bool, stale: bool,
                    timeout: Optional[float], return_exceptions: bool) -> list[Any]:
        """Queue all `payloads` as writes (or reads), park until every one has ended."""
        self._check_open()
        if not payloads:
            return []
        if max(map(len, payloads)) > COMMAND_BYTES_MAX:
            what = "command" if write else "query"
            for payload in payloads:
                _check_size(payload, what)
        start, deadline, timeout = self._deadline(timeout)
        default_timeout = timeout == self._timeout
        session = self._session
        ops = _ops.make_ops(payloads, deadline)
        count = len(ops)
        total_size = sum(map(len, payloads)) + 4 * count
        queued = 0     # ops[:queued] have been queued (and armed)
        try:
            while queued < count:
                # As many as the queue has room for (at least one when it is empty).
                room, room_bytes = session.room(write, stale)
                if queued == 0 and count <= room and total_size <= room_bytes:
                    end, size = count, total_size   # all at once (the common case)
                else:
                    end, size = queued, 0
                    while end < count and end - queued < room:
                        n = len(ops[end].payload) + 4
                        if size + n > room_bytes:
                            break
                        size += n
                        end += 1
                    if end == queued:
                        # No room for even one: wait, unless the queue is empty (a
                        # single command always fits then, however large).
                        size = len(ops[queued].payload) + 4
                        if not session.has_room(write, stale, size):
                            if not await self._wait_for_room(write, stale, size, deadline):
                                break
                            continue
                        end = queued + 1
                chunk = ops if end - queued == count else ops[queued:end]
                if session.queue_many(chunk, write, stale, size, default_timeout):
                    self._wake_timer()
                queued = end
                self._kick()
            # Park on the last unfinished op: in the common case they finish in order
            # and this is the one wake-up.  All share the deadline, so once it has
            # passed none is waited for any longer.
            index = _ops.last_unfinished(ops, queued - 1)
            while index >= 0:
                op = ops[index]
                if op.expired or self._now() >= deadline:
                    break
                await self._park(op)
                index = _ops.last_unfinished(ops, index)
        finally:
            dropped, dropped_bytes = _ops.abandon(ops)
            if dropped:
                session.forget_queued(write, dropped, dropped_bytes)
                self._room_freed()
        done: Optional[list[Any]] = _ops.values_if_all_done(ops)
        if done is not None:
            return done
        results: list[Any] = []
        for op in ops:
            if op.error is not None:
                outcome = _error_of(op)
            elif op.state == _DONE:
                results.append(op.value)
                continue
            else:
                if not write:
                    op.sent = False   # a read never changes anything
                outcome = session.expired_error(op, start, deadline)
            if not return_exceptions:
                raise outcome
            results.append(outcome)
        return results


def _status_entry(entry: Entry, payload: Any) -> None:
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


def _snapshot_entry(entry: Entry, payload: Any) -> None:
    if type(payload) is int:
        entry["applied_index"] = payload
    else:
        entry["error"] = "malformed snapshot reply"

