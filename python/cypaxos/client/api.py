"""The Trio client: `open_client(addresses)` yields a `Client` (under asyncio it
yields the `AsyncioClient` of `cypaxos.client.aio` instead).

`Client` is the Trio wiring of a `ClientSession` (`cypaxos.client.session`: every
protocol decision, no I/O) behind the calls of `ClientCalls`
(`cypaxos.client.calls`: put, get, ..., the bulk calls).  What is left here is
what Trio does for them:

* callers park on their ops with a bare reschedule (`_park`), and on a parking lot
  while the queue has no room;
* one task (`_run`) keeps the connection: it asks the session whether one is needed,
  where to dial and when, dials (`cypaxos.client.connection`: TCP and the
  handshake), and serves the connection with two tasks until it ends: the reader
  feeds each reply to the session; the sender writes what the session says to send,
  then sleeps until something is queued or answered (`_kick`) or until the session's
  next send time;
* one task (`_timer`) tells the session the time when the next deadline comes.

`cypaxos.client.blocking.connect` runs a `Client` in a background thread for plain
code.  docs/internals.md ("Client") has the whole picture.
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Union, cast

import sniffio
import trio

from .. import wire
from ..addresses import Addresses
from ..clientops import Op
from .calls import COMMAND_BYTES_MAX, Bytes, ClientCalls, Entry, fill_entry
from ..security.tls import TLSSettings
from .connection import (
    RECEIVE_BYTES, Connection, Credentials, DialError, credentials, describe, dial,
    request_once,
)
from .session import SessionSettings

if TYPE_CHECKING:
    from .backup import BackupInfo

__all__ = ["Client", "open_client", "Bytes", "COMMAND_BYTES_MAX"]


async def _park(op: Op) -> None:
    """Sleep until `op` finishes or expires (or the caller is cancelled).

    A plain reschedule rather than an Event and a cancel scope per call: at tens of
    thousands of calls a second those were most of the client's CPU time.
    """
    op.task = trio.lowlevel.current_task()

    def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
        op.task = None
        return trio.lowlevel.Abort.SUCCEEDED
    await trio.lowlevel.wait_task_rescheduled(abort)


class Client(ClientCalls):
    """A connection to a cypaxos cluster for Trio code; get one from `open_client()`.

    Many tasks may call its methods concurrently: their commands are pipelined and
    batched over one connection to the leader.  Every method takes an optional
    `timeout=` (seconds, None for the client's default) and raises a subclass of
    `cypaxos.errors.ClientError` on failure.
    """

    def __init__(self, addresses: Addresses, *, timeout: float = 5.0,
                 settings: Optional[SessionSettings] = None,
                 tls: Optional[TLSSettings] = None,
                 token: Union[bytes, str, None] = None,
                 checked: Optional[Credentials] = None) -> None:
        """Prepare a client; it only runs inside `open_client()` (which calls `_run`).

        `checked`: credentials made already (by `connection.credentials`), instead of
        `tls` and `token`."""
        super().__init__(addresses, timeout=timeout, settings=settings)
        # The SSLContext, built once for every dial of this client.
        self._credentials = checked if checked is not None else credentials(tls=tls,
                                                                            token=token)
        self._nursery: Optional[trio.Nursery] = None
        self._kick_event = trio.Event()   # wakes the sender
        self._need_conn = trio.Event()    # wakes the idle connection loop
        self._timer_wake = trio.Event()
        self._room = trio.lowlevel.ParkingLot()  # callers waiting for queue room

    async def aclose(self) -> None:
        """Close the client: pending calls fail with ClosedError, the connection closes."""
        self._close()
        await trio.lowlevel.checkpoint()

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
        return await backup_to_file(list(self._session.addresses), os.fspath(path),
                                    timeout=self._timeout if timeout is None else timeout,
                                    credentials=self._credentials)

    # -- what ClientCalls needs ------------------------------------------------

    _now = staticmethod(trio.current_time)
    _park = staticmethod(_park)

    async def _park_for_room(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._room.park()

    def _kick(self) -> None:
        self._kick_event.set()
        self._need_conn.set()

    def _wake_timer(self) -> None:
        self._timer_wake.set()

    def _room_freed(self) -> None:
        self._room.unpark_all()

    def _close(self) -> None:
        if self._session.closed:
            return
        self._session.close()
        self._room.unpark_all()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _ask_all(self, make_request: Callable[[int], list[Any]],
                       make_entry: Callable[[Entry, Any], None],
                       timeout: Optional[float]) -> list[Entry]:
        _, deadline, _ = self._deadline(timeout)
        addresses = list(self._session.addresses)
        entries: list[Entry] = [{} for _ in addresses]

        async def ask(index: int, address: str) -> None:
            entry: Entry = {"address": address, "reachable": False}
            try:
                replica_id, reply = await request_once(address, make_request, deadline,
                                                         self._credentials)
            except (DialError, trio.TooSlowError) as exc:
                entry["error"] = describe(exc)
            else:
                fill_entry(entry, replica_id, reply, make_entry)
            entries[index] = entry

        async with trio.open_nursery() as nursery:
            for index, address in enumerate(addresses):
                nursery.start_soon(ask, index, address)
        return entries

    # -- the tasks -------------------------------------------------------------

    async def _run(self) -> None:
        """The connection loop: dial where the session says, serve it, go again."""
        session = self._session
        first = True
        while True:
            after_idle = False
            if not first and not session.wants_connection():
                # Idle: no reconnect storm against a cluster nobody is waiting for.
                while not session.wants_connection():
                    self._need_conn = trio.Event()
                    await self._need_conn.wait()
                after_idle = True
            first = False
            address, at = session.next_dial(trio.current_time(), after_idle=after_idle)
            if at > trio.current_time():
                await trio.sleep_until(at)
            try:
                conn = await dial(address, timeout_s=session.settings.connect_timeout_s,
                                  credentials=self._credentials)
            except DialError as exc:
                session.connection_failed(address, exc.reason, trio.current_time(),
                                          definitive=exc.definitive, reachable=exc.reachable)
                self._room.unpark_all()   # failing fast empties the queues
                continue
            if session.connection_made(address, conn.cluster_id, conn.replica_id,
                                       trio.current_time()) is not None:
                await conn.aclose()
                self._room.unpark_all()
                continue
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, conn, nursery.cancel_scope)
                    nursery.start_soon(self._sender, conn, nursery.cancel_scope)
            finally:
                session.connection_lost(trio.current_time())
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    async def _reader(self, conn: Connection, scope: trio.CancelScope) -> None:
        """Feed the connection's replies to the session until it ends."""
        session = self._session
        decoder = conn.decoder
        reason = ""
        try:
            while True:
                now = trio.current_time()
                answered = False
                while (obj := decoder.next_frame()) is not None:
                    session.reply_received(wire.parse_reply(obj), now)
                    answered = True
                if session.disconnect is not None:
                    break
                if answered:
                    self._kick_event.set()   # window room, resends, a registration...
                data = await conn.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    reason = "connection closed by the replica"
                    break
                decoder.feed(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = describe(exc)
        except wire.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            if "exceeds the limit" in str(exc):
                session.reply_too_large()
        session.connection_lost(trio.current_time(), reason)
        scope.cancel()

    async def _sender(self, conn: Connection, scope: trio.CancelScope) -> None:
        """Write what the session says to send; sleep until there may be more."""
        session = self._session
        stream = conn.stream
        reason = ""
        try:
            while True:
                # Collect first, then wait: a sender cancelled between taking a wake-up
                # and acting on it (its connection died) must not strand queued calls,
                # so every sender starts by asking the session.  Resetting the event
                # before asking means nothing queued after the reset is missed.
                self._kick_event = trio.Event()
                bodies = session.requests_to_send(trio.current_time())
                if session.disconnect is not None:
                    break
                if bodies:
                    self._room.unpark_all()   # callers waiting for queue room
                    await stream.send_all(wire.encode_frames(bodies))
                if not self._kick_event.is_set():
                    with trio.move_on_at(session.next_send_at()):
                        await self._kick_event.wait()
                # Let every task that is about to call join this round's batch.  With
                # nothing in flight nobody is about to be woken by a reply: go at once
                # (one call at a time is then one scheduling pass faster).
                if session.has_requests_in_flight():
                    await trio.lowlevel.checkpoint()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = describe(exc)
        session.connection_lost(trio.current_time(), reason)
        scope.cancel()

    async def _timer(self) -> None:
        """Tell the session the time at each deadline (its callers then raise)."""
        session = self._session
        while True:
            self._timer_wake = trio.Event()
            at = session.expire(trio.current_time())
            with trio.move_on_at(at):
                await self._timer_wake.wait()


@asynccontextmanager
async def open_client(addresses: Addresses, *, timeout: float = 5.0,
                      settings: Optional[SessionSettings] = None,
                      tls: Optional[TLSSettings] = None,
                      token: Union[bytes, str, None] = None) -> AsyncIterator[Client]:
    """Open a `Client` to the cluster at `addresses`; close it on exit.

    Under Trio it is a `Client`; under asyncio an `AsyncioClient`
    (`cypaxos.client.aio`), with the same methods and meaning.

    `addresses`: a comma-separated "host:port" string or a list of them, any replicas
    of the cluster.  `timeout`: the default deadline of every call, in seconds.
    `settings`: limits and timings (`cypaxos.client.SessionSettings`; rarely needed).
    `tls`: dial with TLS: a `cypaxos.TLS` (the CA, and the client's certificate and
    key if the cluster wants one) or an `ssl.SSLContext` of `ssl.PROTOCOL_TLS_CLIENT`,
    used as given; the replica's certificate must name the host dialed.  `token`: a
    client token (bytes or str, the first key of a ``--token-file``), proved without
    sending it.  Raises `ConfigError` at once for malformed addresses, TLS files that
    cannot be used or a malformed token; unreachable ones surface as
    `UnavailableError` from the calls.  Leaving the block fails pending calls with
    `ClosedError`; an exception raised in the block leaves it as itself.
    """
    if sniffio.current_async_library() == "asyncio":
        from .aio import open_asyncio_client
        async with open_asyncio_client(addresses, timeout=timeout, settings=settings,
                                       tls=tls, token=token) as aio_client:
            # The same methods as a Client (typed so for the caller's code).
            yield cast(Client, aio_client)
        return
    async with running(lambda: Client(addresses, timeout=timeout, settings=settings,
                                      tls=tls, token=token)) as client:
        yield client


@asynccontextmanager
async def running(make_client: Callable[[], Client]) -> AsyncIterator[Client]:
    """`open_client` for a `Client` made by `make_client()` (in the event loop); what
    the blocking client uses to hand over credentials it has checked already."""
    client = make_client()
    failure = None
    async with trio.open_nursery() as nursery:
        client._nursery = nursery
        nursery.start_soon(client._run)
        nursery.start_soon(client._timer)
        try:
            yield client
        except BaseException as exc:
            # Raised again below, outside the nursery: the caller's own exception must
            # not reach its `except` clauses wrapped in an exception group.
            failure = exc
        finally:
            client._close()
    if failure is not None:
        raise failure
