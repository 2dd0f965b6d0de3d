"""A Trio loop in a background thread, for servers that tests of another event loop's
client talk to (the client's loop may then be asyncio, or a Trio loop of its own).

`TrioThread()` starts the loop; `run(afn, *args)` runs `await afn(*args)` there and
returns its result; `nursery` is a nursery of that loop (for `nursery.start` inside an
`afn`); `close()` cancels everything in it and joins the thread.
"""
from __future__ import annotations

import threading
from typing import Any, Awaitable, Callable

import trio


class TrioThread:
    """A Trio event loop running in a daemon thread (see the module doc)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Trio thread did not start")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`await afn(*args)` in the thread's loop; its result."""
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(30)
