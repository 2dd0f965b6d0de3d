"""Key material on disk: files created with their final mode, durable once written."""
from __future__ import annotations

import os

__all__ = ["write_file", "fsync_directory", "warn_if_exposed"]


def fsync_directory(path: str) -> None:
    """Make the entries of directory `path` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes, mode: int, *, replace: bool) -> None:
    """Write `data` as the file `path` with permission bits exactly `mode`.

    The bytes go to a temporary file in the same directory, created (O_EXCL) with
    `mode` already applied, so a key is never readable by anyone else, not even for
    an instant, and whatever mode an old file had does not matter.  It is fsynced,
    then renamed over `path` (`replace=True`) or linked to it (`replace=False`: raises
    FileExistsError if `path` exists, atomically, so two writers cannot both win).
    A reader sees the old file or the whole new one.  OSError on failure, with the
    temporary file removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away from `mode`
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def warn_if_exposed(path: str, mode: int, what: str, log) -> None:
    """Log a warning if file mode `mode` lets group or others read or write `path`."""
    if mode & 0o077:
        log.warning("%s %s may be read by group or others (mode %04o); chmod 600 it",
                    what, path, mode & 0o7777)
