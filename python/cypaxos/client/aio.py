"""The asyncio client: what `open_client(addresses)` yields under asyncio.

`AsyncioClient` is the asyncio wiring of the same `ClientSession`
(`cypaxos.client.session`) behind the same calls (`ClientCalls`,
`cypaxos.client.calls`) as the Trio `Client` of `cypaxos.client.api`; only what the
event loop does for them differs:

* callers park on a future per call (`_park`), woken by the session finishing their
  op; callers waiting for queue room park on futures woken when room may appear;
* the sender is a callback, not a task: a call that queues something schedules one
  flush with `loop.call_soon`, so every task that runs in this loop iteration joins
  the same batch (as the Trio sender's checkpoint does), and the flush writes what
  the session says to send with one `transport.write`.  A timer handle calls it
  again at the session's next send time (resends, stalls);
* replies are handled in the protocol's `data_received` (`AioConnection`,
  `cypaxos.client.aioconnection`): each read goes to the frame decoder and every
  reply to the session, then a flush is scheduled;
* one task (`_run`) keeps the connection: dial where the session says, when it says,
  and wait until the connection ends; idle while no call needs one;
* a timer handle tells the session the time at its next deadline.

`backup` runs the Trio backup in a worker thread (see `AsyncioClient.backup`).
"""
from __future__ import annotations

import asyncio
import functools
import math
import os
from contextlib import asynccontextmanager
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Union

from .. import wire
from ..addresses import Addresses
from ..clientops import Op
from ..security.tls import TLSSettings
from .aioconnection import AioConnection, describe, dial, request_once
from .calls import ClientCalls, Entry, fill_entry
from .connection import Credentials, credentials
from .dialing import DialError
from .session import SessionSettings

if TYPE_CHECKING:
    from .backup import BackupInfo

__all__ = ["AsyncioClient", "open_asyncio_client"]


def _resolve(future: "asyncio.Future[None]") -> None:
    # A caller cancelled in this loop iteration has a cancelled future already.
    if not future.done():
        future.set_result(None)


class AsyncioClient(ClientCalls):
    """A connection to a cypaxos cluster for asyncio code; `open_client()` yields one
    when called under asyncio.

    The same methods as `cypaxos.Client` (the Trio client), with the same meaning:
    many tasks may call them concurrently, their commands pipelined and batched over
    one connection to the leader.
    """

    def __init__(self, addresses: Addresses, *, timeout: float = 5.0,
                 settings: Optional[SessionSettings] = None,
                 tls: Optional[TLSSettings] = None,
                 token: Union[bytes, str, None] = None,
                 checked: Optional[Credentials] = None) -> None:
        """Prepare a client; it only runs inside `open_client()` (which starts `_run`)."""
        super().__init__(addresses, timeout=timeout, settings=settings)
        self._credentials = checked if checked is not None else credentials(tls=tls,
                                                                            token=token)
        self._loop = loop = asyncio.get_running_loop()
        self._now = loop.time   # type: ignore[method-assign]
        self._conn: Optional[AioConnection] = None
        self._flush_pending = False
        self._send_timer: Optional[asyncio.TimerHandle] = None
        self._expire_timer: Optional[asyncio.TimerHandle] = None
        self._expire_pending = False
        self._idle: Optional[asyncio.Future[None]] = None   # the idle connection loop
        self._room: list[asyncio.Future[None]] = []          # callers waiting for room
        self._task: Optional[asyncio.Task[None]] = None
        self._failure: Optional[BaseException] = None   # raised when the block ends

    async def aclose(self) -> None:
        """Close the client: pending calls fail with ClosedError, the connection closes."""
        self._close()
        await asyncio.sleep(0)

    async def backup(self, path: Union[str, "os.PathLike[str]"], *,
                     timeout: Optional[float] = None) -> "BackupInfo":
        """Write a consistent copy of the cluster's state to the file `path` (as
        `cypaxos.Client.backup`).

        The transfer runs in a worker thread (the Trio backup, on its own
        connections), so the event loop goes on meanwhile; cancelling the call stops
        waiting for it, not the transfer, which still ends within its timeouts.
        """
        self._check_open()
        import trio

        from .backup import backup_to_file

        addresses = list(self._session.addresses)   # taken here, not in the thread
        seconds = self._timeout if timeout is None else timeout

        def run() -> "BackupInfo":
            return trio.run(lambda: backup_to_file(addresses, os.fspath(path),
                                                   timeout=seconds,
                                                   credentials=self._credentials))
        return await asyncio.to_thread(run)

    # -- what ClientCalls needs ------------------------------------------------

    async def _park(self, op: Op) -> None:
        future = self._loop.create_future()
        op.task = functools.partial(_resolve, future)
        try:
            await future
        finally:
            op.task = None

    async def _park_for_room(self, deadline: float) -> None:
        future = self._loop.create_future()
        self._room.append(future)
        handle = self._loop.call_at(deadline, _resolve, future)
        try:
            await future
        finally:
            handle.cancel()

    def _kick(self) -> None:
        if not self._flush_pending and self._conn is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush)
        idle = self._idle
        if idle is not None:
            self._idle = None
            _resolve(idle)

    def _wake_timer(self) -> None:
        if not self._expire_pending:
            self._expire_pending = True
            self._loop.call_soon(self._expire)

    def _room_freed(self) -> None:
        if self._room:
            room, self._room = self._room, []
            for future in room:
                _resolve(future)

    def _close(self) -> None:
        if self._session.closed:
            return
        self._session.close()
        self._room_freed()
        for timer in (self._send_timer, self._expire_timer):
            if timer is not None:
                timer.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _ask_all(self, make_request: Callable[[int], list[Any]],
                       make_entry: Callable[[Entry, Any], None],
                       timeout: Optional[float]) -> list[Entry]:
        _, deadline, _ = self._deadline(timeout)

        async def ask(address: str) -> Entry:
            entry: Entry = {"address": address, "reachable": False}
            try:
                replica_id, reply = await request_once(address, make_request, deadline,
                                                         self._credentials)
            except (DialError, asyncio.TimeoutError) as exc:
                entry["error"] = describe(exc)
            else:
                fill_entry(entry, replica_id, reply, make_entry)
            return entry

        return list(await asyncio.gather(*(ask(a) for a in list(self._session.addresses))))

    # -- the sender, the reader and the timer (callbacks) -----------------------

    def _flush(self) -> None:
        """Write what the session says to send; plan the next flush."""
        self._flush_pending = False
        try:
            self._send()
        except Exception as exc:
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        """A bug in a callback of the client's: its calls fail (ClosedError) rather
        than wait for their deadline, and `exc` leaves the `open_client` block (the
        event loop would only have logged it)."""
        if self._failure is None:
            self._failure = exc
        self._close()

    def _send(self) -> None:
        conn = self._conn
        if conn is None or conn.paused:
            return   # resume_writing flushes again
        session = self._session
        bodies = session.requests_to_send(self._loop.time())
        if session.disconnect is not None:
            self._drop(conn, session.disconnect)
            return
        if bodies:
            self._room_freed()   # callers waiting for queue room
            conn.write(wire.encode_frames(bodies))
        at = session.next_send_at()
        timer = self._send_timer
        if at == math.inf:
            if timer is not None:
                timer.cancel()
                self._send_timer = None
        elif timer is None or timer.cancelled() or timer.when() > at:
            # An earlier timer is kept: firing early only flushes, which plans again.
            if timer is not None:
                timer.cancel()
            self._send_timer = self._loop.call_at(at, self._timed_flush)

    def _timed_flush(self) -> None:
        self._send_timer = None
        self._flush()

    def _on_data(self, data: bytes) -> None:
        """Feed what was read to the decoder, and the replies to the session."""
        try:
            self._receive(data)
        except Exception as exc:
            self._crash(exc)

    def _receive(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        session = self._session
        decoder = conn.decoder
        now = self._loop.time()
        answered = False
        try:
            decoder.feed(data)
            while (obj := decoder.next_frame()) is not None:
                session.reply_received(wire.parse_reply(obj), now)
                answered = True
        except wire.ProtocolError as exc:
            if "exceeds the limit" in str(exc):
                session.reply_too_large()
            self._drop(conn, f"protocol error: {exc}")
            return
        if session.disconnect is not None:
            self._drop(conn, session.disconnect)
        elif answered and not self._flush_pending:
            # Window room, resends, a registration...: after the callers just woken
            # have run (and queued what they call next).
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _on_lost(self, reason: str) -> None:
        conn = self._conn
        if conn is not None:
            self._drop(conn, reason)

    def _drop(self, conn: AioConnection, reason: str) -> None:
        """End the connection `conn` (`reason`: why, for the session)."""
        if self._conn is conn:
            self._conn = None
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            self._session.connection_lost(self._loop.time(), reason)
        conn.close()
        if not conn.closed.done():
            conn.closed.set_result(None)

    def _expire(self) -> None:
        """Tell the session the time (its callers past their deadline then raise)."""
        self._expire_pending = False
        if self._session.closed:
            return
        try:
            self._expire_now()
        except Exception as exc:
            self._crash(exc)

    def _expire_now(self) -> None:
        at = self._session.expire(self._loop.time())
        timer = self._expire_timer
        if timer is not None:
            timer.cancel()
        self._expire_timer = None if at == math.inf else self._loop.call_at(at, self._expire)

    # -- the connection loop ---------------------------------------------------

    async def _run(self) -> None:
        """Dial where the session says, serve the connection until it ends, again."""
        session = self._session
        loop = self._loop
        first = True
        while True:
            after_idle = False
            if not first and not session.wants_connection():
                # Idle: no reconnect storm against a cluster nobody is waiting for.
                while not session.wants_connection():
                    self._idle = loop.create_future()
                    await self._idle
                after_idle = True
            first = False
            address, at = session.next_dial(loop.time(), after_idle=after_idle)
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            try:
                conn = await dial(address, timeout_s=session.settings.connect_timeout_s,
                                  credentials=self._credentials)
            except DialError as exc:
                session.connection_failed(address, exc.reason, loop.time(),
                                          definitive=exc.definitive, reachable=exc.reachable)
                self._room_freed()   # failing fast empties the queues
                continue
            assert conn.cluster_id is not None and conn.replica_id is not None
            if session.connection_made(address, conn.cluster_id, conn.replica_id,
                                       loop.time()) is not None:
                conn.close()
                self._room_freed()
                continue
            self._conn = conn
            conn.on_resume = self._kick
            try:
                # What came with the welcome, then what came before this.
                self._on_data(conn.attach(self._on_data, self._on_lost))
                if self._conn is conn:
                    self._kick()   # what was queued while there was no connection
                await conn.closed
            finally:
                self._drop(conn, "")


@asynccontextmanager
async def open_asyncio_client(addresses: Addresses, *, timeout: float = 5.0,
                              settings: Optional[SessionSettings] = None,
                              tls: Optional[TLSSettings] = None,
                              token: Union[bytes, str, None] = None
                              ) -> AsyncIterator[AsyncioClient]:
    """`cypaxos.open_client` under asyncio (which calls this): an `AsyncioClient`,
    closed on exit.  An exception raised in the block leaves it as itself."""
    client = AsyncioClient(addresses, timeout=timeout, settings=settings, tls=tls,
                           token=token)
    task = client._task = asyncio.get_running_loop().create_task(client._run())

    def crashed(task: "asyncio.Task[None]") -> None:
        # A bug in the connection loop: the calls fail (ClosedError) rather than hang;
        # the exception is raised when the block ends.
        if not task.cancelled() and task.exception() is not None:
            if client._failure is None:
                client._failure = task.exception()
            client._close()
    task.add_done_callback(crashed)
    try:
        yield client
    finally:
        client._close()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise   # the caller's own cancellation
        except Exception:
            pass   # client._failure: raised below
        if client._failure is not None:
            raise client._failure
