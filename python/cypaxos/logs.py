"""Logging: how a process's log lines look, and logging that cannot flood.

`configure(level, log_format)` sets up the root logger of a cypaxos process (a
replica, `cypaxos local`): lines on stderr, either text
(``2026-05-01 12:00:00,123 cypaxos.server[4242] INFO ...``) or JSON, one object per
line (`JsonFormatter`: ``time``, ``level``, ``logger``, ``message``, ``pid`` and every
structured field the log call passed with ``extra=``).  The level and the format come
from the arguments, else from CYPAXOS_LOG_LEVEL and CYPAXOS_LOG_FORMAT, else INFO and
text; level names are accepted in any case.

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

import datetime
import json
import logging
import os
import sys
import time
from typing import Callable, Hashable, Mapping, Optional, TextIO, Union

from .errors import ConfigError

__all__ = [
    "RateLimitedLog", "OVERFLOW_KEY", "configure", "parse_level", "parse_format",
    "JsonFormatter", "TEXT_FORMAT", "LEVELS", "FORMATS", "LEVEL_ENV", "FORMAT_ENV",
]

LEVELS = ("debug", "info", "warning", "error", "critical")
"""The log level names `--log-level` and CYPAXOS_LOG_LEVEL take, in any case."""
FORMATS = ("text", "json")
"""The values of `--log-format` and CYPAXOS_LOG_FORMAT."""
LEVEL_ENV = "CYPAXOS_LOG_LEVEL"
FORMAT_ENV = "CYPAXOS_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
"""The line of the text format."""


def parse_level(text: str, source: str = "--log-level") -> int:
    """A level name in any case -> its `logging` number; ConfigError naming `source`."""
    name = text.strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"{source} {text!r} is not one of {', '.join(LEVELS)}")
    return logging.getLevelName(name.upper())


def parse_format(text: str, source: str = "--log-format") -> str:
    """``text`` or ``json`` in any case; ConfigError naming `source`."""
    name = text.strip().lower()
    if name not in FORMATS:
        raise ConfigError(f"{source} {text!r} is not one of {', '.join(FORMATS)}")
    return name


# The attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, ``pid``, the fields the call passed with ``extra=`` and,
    with an exception, ``exception`` (its formatted traceback).

    A field whose value JSON cannot hold is written as its ``str()`` (bytes as hex).
    A field named like one of the five above is written as ``extra.NAME``.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                out[f"extra.{name}" if name in out else name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False)


def _json_default(value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


class _Handler(logging.StreamHandler):
    """The handler `configure` installs (so that calling it again replaces it)."""


def configure(level: Union[str, int, None] = None, log_format: Optional[str] = None, *,
              stream: Optional[TextIO] = None,
              environ: Mapping[str, str] = os.environ) -> None:
    """Set up this process's log lines on the root logger (on stderr by default).

    `level` is a name (any case) or a `logging` number; None takes CYPAXOS_LOG_LEVEL,
    else INFO.  `log_format` is ``text`` or ``json``; None takes CYPAXOS_LOG_FORMAT,
    else text.  A bad name raises ConfigError saying where it came from.  Calling it
    again replaces what an earlier call installed; other handlers are left alone.
    """
    if level is None:
        level = parse_level(environ[LEVEL_ENV], LEVEL_ENV) if environ.get(LEVEL_ENV) \
            else logging.INFO
    elif isinstance(level, str):
        level = parse_level(level)
    if log_format is None:
        log_format = parse_format(environ[FORMAT_ENV], FORMAT_ENV) \
            if environ.get(FORMAT_ENV) else "text"
    else:
        log_format = parse_format(log_format)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

OVERFLOW_KEY = ("cypaxos.logs", "overflow")
"""The key under which events are counted once the table of keys is full."""


class _Entry:
    __slots__ = ("logged_at", "suppressed", "level", "msg", "args", "extra")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at   # clock() when this key was last logged
        self.suppressed = 0          # events held back since then
        self.level = logging.WARNING  # the last held-back event, logged by flush()
        self.msg = ""
        self.args: tuple = ()
        self.extra: Optional[dict] = None


class RateLimitedLog:
    """Log events by key: the first at once, then at most one line per interval.

    The line that ends a quiet spell says how many events were held back:
    ``"<message> (and 41 more like it in the last 60 s)"``; it carries the count as
    the structured field ``suppressed`` too (see `JsonFormatter`).
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

    def warning(self, key: Hashable, msg: str, *args: object,
                extra: Optional[dict] = None, exc_info: bool = False) -> bool:
        """`log(logging.WARNING, ...)`."""
        return self.log(logging.WARNING, key, msg, *args, extra=extra, exc_info=exc_info)

    def info(self, key: Hashable, msg: str, *args: object,
             extra: Optional[dict] = None) -> bool:
        """`log(logging.INFO, ...)`."""
        return self.log(logging.INFO, key, msg, *args, extra=extra)

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            extra: Optional[dict] = None, exc_info: bool = False) -> bool:
        """Count one event of `key`; log it unless `key` was logged less than an interval
        ago.  `msg % args` is the line and `extra` its structured fields, as with
        `logging`.  True if a line was logged.

        `exc_info=True` (inside an ``except`` block) adds the traceback to a line
        logged now; a held-back event's traceback is dropped with it (the first one of
        a key always has its own).
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
            self._emit(level, msg, args, extra, 0, 0.0, exc_info)
            return True
        if now - entry.logged_at >= self.interval_s:
            self._emit(level, msg, args, extra, entry.suppressed, now - entry.logged_at,
                       exc_info)
            entry.logged_at = now
            entry.suppressed = 0
            return True
        entry.suppressed += 1
        entry.level, entry.msg, entry.args, entry.extra = level, msg, args, extra
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
                self._emit(entry.level, entry.msg, entry.args, entry.extra,
                           entry.suppressed, now - entry.logged_at)

    def _emit(self, level: int, msg: str, args: tuple, extra: Optional[dict],
              suppressed: int, elapsed_s: float, exc_info: bool = False) -> None:
        self.lines += 1
        if suppressed:
            if not args:
                msg = msg.replace("%", "%%")  # logging formats msg once args are given
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, suppressed, elapsed_s)
            extra = {**(extra or {}), "suppressed": suppressed}
        self.logger.log(level, msg, *args, extra=extra, exc_info=exc_info or None)
