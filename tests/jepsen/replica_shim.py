"""Run ``cypaxos serve`` while recording what its fsyncs made durable.

    python replica_shim.py SYNCED_DIR serve --id 1 ... --data-dir DIR ...

Before handing over to the real command line, this wraps ``os.fsync`` and
``os.fdatasync`` (which the WAL calls through the ``os`` module): after every
successful sync of a regular file ``DIR/wal/NAME`` it writes the file's size when the
sync *started* into ``SYNCED_DIR/NAME`` (one fixed-width record rewritten in place
with a single ``pwrite``, so it never grows and a kill cannot tear it).  Everything below
that size was on stable storage when the replica learned that the sync succeeded, so
it is the only part of the file a power cut is guaranteed to spare.

The power-loss nemesis kills the replica with SIGKILL and then truncates each WAL
segment to its last recorded size: the page-cache data a real power cut could lose
(kill -9 alone loses nothing that reached the kernel).  A size is written only after
the sync returned and before the replica could act on it, so truncating to it never
removes data the replica was told is durable.  The replica's logic is unchanged:
the two os functions are wrapped, in this process, and the WAL's native fsync thread
(`cypaxos.fsyncthread.FsyncThread`, which calls fdatasync from C, out of the wrappers'
reach) is replaced by `PythonFsyncThread`, a Python thread with the same protocol
that calls the wrapped `os.fdatasync`/`os.fsync`.

The same wrapper makes a *slow disk* on demand: while ``SYNCED_DIR/delay`` holds a
positive number of seconds, every WAL sync first sleeps that long (in the WAL's
worker thread, as a slow device would block it), which widens the window between a
record's write and its durability.
"""
import os
import stat
import sys
import threading
import time


DELAY = "delay"


def delay_file(synced_dir: str) -> str:
    """The slow-disk control file: seconds to wait before each WAL sync (float)."""
    return os.path.join(synced_dir, DELAY)


def install(synced_dir: str, data_dir: str) -> None:
    wal_dir = os.path.join(os.path.realpath(data_dir), "wal") + os.sep
    os.makedirs(synced_dir, exist_ok=True)
    control = delay_file(synced_dir)
    cache = {"mtime": None, "delay": 0.0}
    fds: dict[str, int] = {}
    lock = threading.Lock()

    def current_delay() -> float:
        try:
            mtime = os.stat(control).st_mtime_ns
        except OSError:
            return 0.0
        if mtime != cache["mtime"]:
            try:
                with open(control) as f:
                    cache["delay"] = max(0.0, float(f.read().strip() or 0))
            except (OSError, ValueError):
                cache["delay"] = 0.0
            cache["mtime"] = mtime
        return cache["delay"]

    def record(path: str, size: int) -> None:
        name = os.path.basename(path)
        with lock:
            fd = fds.get(name)
            if fd is None:
                fd = fds[name] = os.open(os.path.join(synced_dir, name),
                                         os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.pwrite(fd, b"%20d\n" % size, 0)

    def wrap(real):
        def sync(fd):
            number = fd if isinstance(fd, int) else fd.fileno()
            path = None
            try:
                st = os.fstat(number)
                if stat.S_ISREG(st.st_mode):
                    path = os.readlink(f"/proc/self/fd/{number}")
            except OSError:
                path = None
            mine = path is not None and path.startswith(wal_dir)
            if mine:
                delay = current_delay()
                if delay:
                    time.sleep(delay)  # a slow disk (in the WAL's worker thread)
            real(fd)
            if mine:
                record(path, st.st_size)
        sync.__name__ = real.__name__
        return sync

    os.fsync = wrap(os.fsync)
    os.fdatasync = wrap(os.fdatasync)


class PythonFsyncThread:
    """`cypaxos.fsyncthread.FsyncThread`'s protocol on a Python thread using `os`.

    submit(fd, dir_fd) starts one job; the read end of a pipe (fileno()) becomes
    readable when it is done; take() returns None, -1 (not done) or raises OSError.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._cond = threading.Condition()
        self._job = None
        self._error = None
        self._stopping = False
        self.busy = False
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        if self._read < 0:
            raise ValueError("the fsync thread is closed")
        return self._read

    def submit(self, fd: int, dir_fd: int = -1) -> None:
        with self._cond:
            self.busy = True
            self._job = (fd, dir_fd)
            self._cond.notify()

    def take(self):
        try:
            if not os.read(self._read, 16):
                return -1
        except BlockingIOError:
            return -1
        self.busy = False
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error
        return None

    def close(self) -> None:
        if self._read < 0:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        os.close(self._read)
        os.close(self._write)
        self._read = self._write = -1

    def _main(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stopping:
                    self._cond.wait()
                job, self._job = self._job, None
            if job is None:
                return
            fd, dir_fd = job
            error = None
            try:
                os.fdatasync(fd)
                if dir_fd >= 0:
                    os.fsync(dir_fd)
            except OSError as exc:
                error = exc
            with self._cond:
                self._error = error
            os.write(self._write, b"x")


def synced_sizes(synced_dir: str) -> dict[str, int]:
    """Segment file name -> the size its last completed sync made durable."""
    sizes: dict[str, int] = {}
    try:
        names = os.listdir(synced_dir)
    except FileNotFoundError:
        return sizes
    for name in names:
        if name == DELAY or name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(synced_dir, name), "rb") as f:
                sizes[name] = int(f.read().strip())
        except (OSError, ValueError):
            continue  # created but never written: no sync completed
    return sizes


def main() -> int:
    synced_dir = sys.argv[1]
    argv = sys.argv[2:]
    data_dir = argv[argv.index("--data-dir") + 1]
    install(synced_dir, data_dir)
    import cypaxos.wal
    cypaxos.wal.FsyncThread = PythonFsyncThread
    sys.argv = ["cypaxos"] + argv
    from cypaxos.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
