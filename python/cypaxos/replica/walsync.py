"""Trio's side of the WAL's fsync thread: group commit from the event loop.

`cypaxos.storage.wal.Wal` has no event loop: `submit_sync()` hands an fdatasync to its
native thread, and someone must wait for `sync_fileno()` to become readable and call
`finish_sync()`.  `WalSync` is that someone for Trio: a system task per fsync in
flight, an `on_sync` callback when it ends, and `sync_async()` for tasks that want to
wait for durability.  Everything runs in the Trio thread.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import trio

from ..storage.wal import Wal
from .counters import FSYNC_BUCKETS_S, Histogram

__all__ = ["WalSync"]


class WalSync:
    """Drive one `Wal`'s fsyncs from a Trio run; close the Wal through `close()`."""

    __slots__ = ("wal", "on_sync", "_event", "sync_seconds", "started_at")

    def __init__(self, wal: Wal, sync_seconds: Optional[Histogram] = None) -> None:
        self.wal = wal
        #: Called in the Trio thread after every fsync started by `start_sync` or
        #: `sync_async` ends, with None or the error (the Wal is then unusable).
        self.on_sync: Optional[Callable[[Optional[BaseException]], None]] = None
        #: How long each fsync took, from its start to the Trio thread hearing of it.
        self.sync_seconds = sync_seconds if sync_seconds is not None else \
            Histogram(FSYNC_BUCKETS_S)
        #: time.monotonic() when the fsync in flight started (0.0: none in flight).
        self.started_at = 0.0
        # Set while an fsync we started runs in the sync thread; set() when it ends.
        # Invariant: not None exactly while wal.sync_in_flight (every fsync of the
        # Wal is started here).
        self._event: Optional[trio.Event] = None

    @property
    def sync_in_flight(self) -> bool:
        """Whether an fsync started by `start_sync` has not ended yet."""
        return self._event is not None

    def start_sync(self) -> bool:
        """Begin making every record appended so far durable; don't wait for it.

        At most one fsync is in flight: if one is, nothing starts and False is
        returned (call again once it ends; `on_sync` says when).  With
        ``fsync=False`` the records are durable (flushed) on return.  Returns True if
        an fsync started.  See `Wal.submit_sync`.
        """
        if not self.wal.submit_sync():
            return False
        self.started_at = time.monotonic()
        self._event = trio.Event()
        trio.lowlevel.spawn_system_task(self._await_sync, name="cypaxos.wal.fsync")
        return True

    async def _await_sync(self) -> None:
        """Wait for the fsync thread's answer, then finish the sync (a system task)."""
        wal = self.wal
        try:
            await trio.lowlevel.wait_readable(wal.sync_fileno())
            error = wal.finish_sync()
        except (trio.Cancelled, trio.ClosedResourceError, ValueError):
            return  # the run is ending, or close() stopped the thread: nobody waits
        except BaseException as exc:  # a system task must not raise: report it
            error = exc
            wal.abandon_sync(error)
        self._ended(error)

    def _ended(self, error: Optional[BaseException]) -> None:
        if error is None:
            self.sync_seconds.observe(time.monotonic() - self.started_at)
        self.started_at = 0.0
        event, self._event = self._event, None
        if event is not None:
            event.set()
        if self.on_sync is not None and not self.wal.closed:
            self.on_sync(error)

    async def sync_async(self) -> int:
        """Make every record appended before this call durable; return ``durable_seq``.

        Group commit through `start_sync`: callers that arrive while an fsync runs
        wait for it to end, then one of them starts the next, which covers them all.
        A cancelled caller leaves the fsync running (it completes on its own).
        """
        wal = self.wal
        wal.check_usable()
        target = wal.last_seq
        if wal.durable_seq >= target:
            await trio.lowlevel.checkpoint()
        while wal.durable_seq < target:
            wal.check_usable()  # a failed fsync is final: never retry it
            if self._event is None:
                self.start_sync()
            event = self._event
            if event is not None:
                await event.wait()
            else:
                await trio.lowlevel.checkpoint()
        if wal.failure is not None:
            wal.check_usable()
        return wal.durable_seq

    def close(self) -> None:
        """Close the Wal (flush, sync, release the lock); waiters find it closed.

        Idempotent.  If an fsync is in flight, waits for it to end first.
        """
        wal = self.wal
        if wal.closed:
            return
        if self._event is not None:
            try:
                trio.lowlevel.notify_closing(wal.sync_fileno())
            except (RuntimeError, ValueError):
                pass  # not inside a Trio run: nobody can be waiting on it
        try:
            wal.close()
        finally:
            event, self._event = self._event, None
            if event is not None:
                event.set()   # its waiters find the Wal closed
