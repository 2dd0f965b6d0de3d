"""Small durable-file helpers shared by the data dir, the WAL and the snapshots.

Plain blocking system calls: callers decide which thread runs them.
"""
from __future__ import annotations

import fcntl
import os

__all__ = ["O_DIR", "fsync_dir", "fsync_path", "lock_dir", "write_all"]

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
"""Flags that open a directory for fsync or flock."""


def fsync_dir(path: str) -> None:
    """fsync the directory `path` (makes its entries' creations and renames durable)."""
    fd = os.open(path, O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """fsync the file at `path` through a read-only fd of its own."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_dir(path: str) -> int | None:
    """Open ``path`` and take an exclusive flock on it; None if someone holds it.

    flock locks belong to the open file description, so this excludes other
    processes and also a second opener in this process.
    """
    fd = os.open(path, O_DIR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of `data` to `fd` (short writes are continued)."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])  # short writes are legal: go on
