"""The blocking client: a `Client` for plain (threaded) code, from `connect()`.

It runs a `Client` on a Trio event loop in a background thread (anyio's blocking
portal); every method blocks until its call completes.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import functools
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, Optional, ParamSpec, TypeVar, Union, overload

import trio

from ..addresses import Addresses, parse_addresses
from ..errors import ClosedError
from ..security.tls import TLSSettings
from .api import Bytes, Client, running
from .backup import BackupInfo
from .connection import credentials
from .store import Compare, KeyValue, Op, TxnResult, items_list

__all__ = ["BlockingClient", "connect"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class BlockingClient:
    """A `Client` for ordinary (threaded) code; get one from `connect()`.

    Runs a Trio event loop in a background thread (anyio's blocking portal) and a
    `Client` in it.  Every method blocks until its call completes; any number of threads
    may call concurrently, and their commands are pipelined like a Trio client's.
    Use it as a context manager, or call `close()`.
    """

    def __init__(self, addresses: Addresses, timeout: float = 5.0, *,
                 tls: Optional[TLSSettings] = None,
                 token: Union[bytes, str, None] = None) -> None:
        """Start the event loop thread and open the client (fails fast on bad addresses,
        TLS files or token)."""
        import anyio.from_thread

        parse_addresses(addresses)   # in the caller's thread: a clear error, no thread
        checked = credentials(tls=tls, token=token)   # the same: files read here, once
        _close_at_exit()
        self._closed = False
        self._portal_cm = anyio.from_thread.start_blocking_portal(backend="trio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._client_cm = self._portal.wrap_async_context_manager(
                running(lambda: Client(addresses, timeout=timeout, checked=checked)))
            self._client: Client = self._client_cm.__enter__()
            self._token = self._portal.call(trio.lowlevel.current_trio_token)
        except BaseException:
            self._portal_cm.__exit__(*sys.exc_info())
            raise
        _open_blocking_clients.add(self)

    def _call(self, method: Callable[_P, Awaitable[_T]], *args: _P.args,
              **kwargs: _P.kwargs) -> _T:
        """Run `method` in the loop thread and wait for it (the hot path).

        anyio's portal.call costs ~0.3 ms a call (< 5,000 calls a second however many
        threads call); handing the call over with TrioToken.run_sync_soon, as a task
        in the client's nursery, and waiting on a concurrent Future is ~10x cheaper.
        """
        if self._closed:
            raise ClosedError("the client is closed")
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        client = self._client

        async def run() -> None:
            try:
                result = await method(*args, **kwargs)
            except trio.Cancelled:
                future.set_exception(ClosedError("the client was closed"))
                raise
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def start() -> None:
            # In the loop thread.  Must not raise: an error here would crash the loop.
            try:
                nursery = client._nursery
                if client.closed or nursery is None:
                    raise ClosedError("the client is closed")
                nursery.start_soon(run)
            except BaseException as exc:
                future.set_exception(exc if isinstance(exc, ClosedError)
                                     else ClosedError("the client is closed"))
        try:
            self._token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise ClosedError("the client is closed") from None
        return future.result()

    def _portal_call(self, method: Callable[_P, Awaitable[_T]], *args: _P.args,
                     **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise ClosedError("the client is closed")
        result: _T = self._portal.call(functools.partial(method, *args, **kwargs))
        return result

    def put(self, key: Bytes, value: Bytes, *, timeout: Optional[float] = None) -> None:
        """Set `key` to `value` (see `Client.put`)."""
        return self._call(self._client.put, key, value, timeout=timeout)

    @overload
    def get(self, key: Bytes, *, stale: bool = False, with_revision: Literal[False] = False,
            timeout: Optional[float] = None) -> Optional[bytes]: ...

    @overload
    def get(self, key: Bytes, *, stale: bool = False, with_revision: Literal[True],
            timeout: Optional[float] = None) -> tuple[Optional[bytes], int]: ...

    def get(self, key: Bytes, *, stale: bool = False, with_revision: bool = False,
            timeout: Optional[float] = None
            ) -> Union[Optional[bytes], tuple[Optional[bytes], int]]:
        """The value of `key` or None; `(value, revision)` with `with_revision=True`
        (see `Client.get`)."""
        if with_revision:
            return self._call(self._client.get, key, stale=stale, with_revision=True,
                              timeout=timeout)
        return self._call(self._client.get, key, stale=stale, timeout=timeout)

    def range(self, start: Optional[Bytes] = None, end: Optional[Bytes] = None, *,
              prefix: Optional[Bytes] = None, limit: Optional[int] = None,
              revision: Optional[int] = None,
              timeout: Optional[float] = None) -> list[KeyValue]:
        """The keys in `[start, end)` or with `prefix`, in key order, as `KeyValue`s
        (see `Client.range`)."""
        return self._call(self._client.range, start, end, prefix=prefix, limit=limit,
                          revision=revision, timeout=timeout)

    def txn(self, compare: Optional[Iterable[Compare]] = None,
            success: Optional[Iterable[Op]] = None,
            failure: Optional[Iterable[Op]] = None, *,
            timeout: Optional[float] = None) -> TxnResult:
        """An atomic transaction: `success` if every `compare` holds, else `failure`
        (see `Client.txn`)."""
        # Lists, made here: a generator must not be consumed in the loop's thread.
        return self._call(self._client.txn, items_list(compare, "compare"),
                          items_list(success, "success"), items_list(failure, "failure"),
                          timeout=timeout)

    def delete(self, key: Bytes, *, timeout: Optional[float] = None) -> bool:
        """Remove `key`; True if it existed (see `Client.delete`)."""
        return self._call(self._client.delete, key, timeout=timeout)

    def cas(self, key: Bytes, expected: Optional[Bytes], new: Bytes, *,
            timeout: Optional[float] = None) -> bool:
        """Compare-and-set; True if it swapped (see `Client.cas`)."""
        return self._call(self._client.cas, key, expected, new, timeout=timeout)

    def submit(self, command: Bytes, *, timeout: Optional[float] = None) -> bytes:
        """Replicate a raw command; its result (see `Client.submit`)."""
        return self._call(self._client.submit, command, timeout=timeout)

    def query(self, query: Bytes, *, stale: bool = False,
              timeout: Optional[float] = None) -> bytes:
        """Answer a read-only query (see `Client.query`)."""
        return self._call(self._client.query, query, stale=stale, timeout=timeout)

    def put_many(self, items: Iterable[tuple[Bytes, Bytes]], *,
                 timeout: Optional[float] = None) -> None:
        """Set many keys in one call (see `Client.put_many`)."""
        return self._call(self._client.put_many, list(items), timeout=timeout)

    def submit_many(self, commands: Iterable[Bytes], *, timeout: Optional[float] = None,
                    return_exceptions: bool = False) -> list[Any]:
        """Replicate many raw commands in one call (see `Client.submit_many`)."""
        return self._call(self._client.submit_many, list(commands), timeout=timeout,
                          return_exceptions=return_exceptions)

    def get_many(self, keys: Iterable[Bytes], *, stale: bool = False,
                 timeout: Optional[float] = None) -> list[Optional[bytes]]:
        """Many values in one call (see `Client.get_many`)."""
        return self._call(self._client.get_many, list(keys), stale=stale, timeout=timeout)

    def query_many(self, queries: Iterable[Bytes], *, stale: bool = False,
                   timeout: Optional[float] = None, return_exceptions: bool = False) -> list[Any]:
        """Answer many read-only queries in one call (see `Client.query_many`)."""
        return self._call(self._client.query_many, list(queries), stale=stale,
                          timeout=timeout, return_exceptions=return_exceptions)

    def status(self, *, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        """Every known replica's status (see `Client.status`)."""
        return self._portal_call(self._client.status, timeout=timeout)

    def snapshot(self, *, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        """Ask every replica to snapshot (see `Client.snapshot`)."""
        return self._portal_call(self._client.snapshot, timeout=timeout)

    def backup(self, path: Union[str, "os.PathLike[str]"], *,
               timeout: Optional[float] = None) -> BackupInfo:
        """Write a consistent copy of the cluster's state to `path` (see `Client.backup`)."""
        return self._portal_call(self._client.backup, path, timeout=timeout)

    def statistics(self) -> dict[str, Any]:
        """The client's counters (see `Client.statistics`)."""
        if self._closed:
            raise ClosedError("the client is closed")
        return self._portal.call(self._client.statistics)

    def close(self) -> None:
        """Close the client and stop its thread; pending calls fail with ClosedError."""
        if self._closed:
            return
        self._closed = True
        _open_blocking_clients.discard(self)
        try:
            self._client_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Strong references: an unclosed client's thread runs on whether or not anyone holds it.
_open_blocking_clients: set[BlockingClient] = set()
_exit_hook_registered = False


def _close_at_exit() -> None:
    """Close forgotten BlockingClients when the interpreter exits.

    Their event loop runs in a worker thread that interpreter shutdown joins *before*
    atexit handlers run, so a script that never called close() would hang on exit.
    threading's own exit hooks run first (latest registered first, so after the
    concurrent.futures import this one precedes its joining of worker threads).
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    _exit_hook_registered = True
    import concurrent.futures.thread  # noqa: F401 - its hook must be registered first

    def close_all() -> None:
        for client in list(_open_blocking_clients):
            try:
                client.close()
            except Exception:  # exiting anyway; one client must not keep others open
                pass
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(close_all)
            return
        except RuntimeError:   # already shutting down
            return
    atexit.register(close_all)


def connect(addresses: Addresses, timeout: float = 5.0, *,
            tls: Optional[TLSSettings] = None,
            token: Union[bytes, str, None] = None) -> BlockingClient:
    """Open a `BlockingClient` to the cluster at `addresses` (see `open_client`, also
    for `tls` and `token`)."""
    return BlockingClient(addresses, timeout=timeout, tls=tls, token=token)
