"""Logging that cannot flood: a repeated warning is logged once with a count.

`RateLimitedLog` logs the first event of a key (a source address, a kind of fault)
at once, then at most once per `interval_s` for that key, with the number of events
it held back meanwhile.  It keeps no timer: the counts of a key that went quiet are
logged by `flush()`, which its owner calls now and then (the replica does from its
ticker), and by the next event of that key.  Time comes from the injected `clock`
(time.monotonic by default), so tests drive it with a fake one.

The number of keys is bounded (`keys_max`): a flood from many sources must not grow
memory without limit.  When the table is full, keys whose interval has passed are
flushed and forgotten; if it is still full, the event is counted under one shared
overflow key instead of its own.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

__all__ = ["RateLimitedLog", "OVERFLOW_KEY"]

OVERFLOW_KEY = ("cypaxos.logs", "overflow")
"""The key under which events are counted once the table of keys is full."""


class _Entry:
    __slots__ = ("logged_at", "suppressed", "level", "msg", "args")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at   # clock() when this key was last logged
        self.suppressed = 0          # events held back since then
        self.level = logging.WARNING  # the last held-back event, logged by flush()
        self.msg = ""
        self.args: tuple = ()


class RateLimitedLog:
    """Log events by key: the first at once, then at most one line per interval.

    The line that ends a quiet spell says how many events were held back:
    ``"<message> (and 41 more like it in the last 60 s)"``.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic, keys_max: int = 1024) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        if keys_max < 1:
            raise ValueError("keys_max must be >= 1")
        self.logger = logger
        self.interval_s = interval_s
        self.keys_max = keys_max
        self._clock = clock
        # Invariant: len(self._entries) <= keys_max + 1 (the overflow key on top).
        self._entries: dict[Hashable, _Entry] = {}
        self.events = 0      #: events seen in all
        self.lines = 0       #: lines logged in all

    def warning(self, key: Hashable, msg: str, *args) -> bool:
        """`log(logging.WARNING, ...)`."""
        return self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: Hashable, msg: str, *args) -> bool:
        """Count one event of `key`; log it unless `key` was logged less than an interval
        ago.  `msg % args` is the line, as with `logging`.  True if a line was logged.
        """
        now = self._clock()
        self.events += 1
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.keys_max:
                self._forget_quiet(now)
            if len(self._entries) >= self.keys_max:
                key = OVERFLOW_KEY
                entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(now)
            self._emit(level, msg, args, 0, 0.0)
            return True
        if now - entry.logged_at >= self.interval_s:
            self._emit(level, msg, args, entry.suppressed, now - entry.logged_at)
            entry.logged_at = now
            entry.suppressed = 0
            return True
        entry.suppressed += 1
        entry.level, entry.msg, entry.args = level, msg, args
        return False

    def flush(self) -> int:
        """Log the held-back count of every key whose interval has passed, and forget
        those keys (their next event is logged at once).  Returns the lines logged.
        """
        before = self.lines
        self._forget_quiet(self._clock())
        return self.lines - before

    def pending(self, key: Hashable) -> int:
        """Events of `key` held back and not yet reported."""
        entry = self._entries.get(key)
        return entry.suppressed if entry is not None else 0

    def __len__(self) -> int:
        """The number of keys remembered."""
        return len(self._entries)

    def _forget_quiet(self, now: float) -> None:
        quiet = [key for key, entry in self._entries.items()
                 if now - entry.logged_at >= self.interval_s]
        for key in quiet:
            entry = self._entries.pop(key)
            if entry.suppressed:
                self._emit(entry.level, entry.msg, entry.args, entry.suppressed,
                           now - entry.logged_at)

    def _emit(self, level: int, msg: str, args: tuple, suppressed: int,
              elapsed_s: float) -> None:
        self.lines += 1
        if suppressed:
            if not args:
                msg = msg.replace("%", "%%")  # logging formats msg once args are given
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, suppressed, elapsed_s)
        self.logger.log(level, msg, *args)
