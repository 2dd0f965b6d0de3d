"""Run ``cypaxos serve`` while recording what its fsyncs made durable.

    python replica_shim.py SYNCED_DIR serve --id 1 ... --data-dir DIR ...

Before handing over to the real command line, this wraps ``os.fsync`` and
``os.fdatasync`` (which the WAL calls through the ``os`` module) to record what each
successful sync of the WAL made durable, as of when the sync *started*:

* a sync of a segment ``DIR/wal/NAME.wal``: its *data end* and its size, written into
  ``SYNCED_DIR/NAME.wal`` (one fixed-width record rewritten in place with a single
  ``pwrite``, so it never grows and a kill cannot tear it). Segments are preallocated
  (zero-filled to their full size before use), so the size no longer says where the
  data ends: the WAL writes a segment sequentially through one fd positioned at the
  end of its records, so for a writable fd the data end is the fd's file position;
  any other sync of a segment (recovery's, through a read-only fd) makes the whole
  file durable, whose data ends at its last non-zero byte.  Everything below the data
  end was on stable storage when the replica learned that the sync succeeded; past
  it, the file held only zeros then.
* a sync of the directory ``DIR/wal``: the segment names it held, written to
  ``SYNCED_DIR/wal.dir`` (a temporary file renamed over it). A segment not in that
  list was created (or renamed into place: the WAL's next segment is prepared as
  ``spare.tmp``) after the last directory sync, so a power cut may lose its directory
  entry.

The power-loss nemesis kills the replica with SIGKILL and then, for each WAL segment,
undoes what a power cut could undo (kill -9 alone loses nothing that reached the
kernel): a segment missing from the last synced directory list vanishes; one listed
but with no completed data sync comes back empty; one whose data sync completed is cut
back to its synced size and everything past its synced data end is overwritten with
zeros (the preallocated zeros it held, durably, before the unsynced writes).  A record
is written only after the sync returned and before the replica could act on it, so
this never removes data the replica was told is durable.  The replica's logic is
unchanged: the two os functions are wrapped, in this process, and the WAL's native
fsync thread (`cypaxos.fsyncthread.FsyncThread`, which calls fdatasync from C, out of
the wrappers' reach) is replaced by `PythonFsyncThread`, a Python thread with the same
protocol that calls the wrapped `os.fdatasync`/`os.fsync`.

The same wrapper makes a *slow disk* on demand: while ``SYNCED_DIR/delay`` holds a
positive number of seconds, every WAL sync first sleeps that long (in the WAL's
worker thread, as a slow device would block it), which widens the window between a
record's write and its durability.
"""
import fcntl
import os
import stat
import sys
import threading
import time


DELAY = "delay"
LISTING = "wal.dir"  # the segment names of the last synced directory
_RECORD = b"%20d %20d\n"


def delay_file(synced_dir: str) -> str:
    """The slow-disk control file: seconds to wait before each WAL sync (float)."""
    return os.path.join(synced_dir, DELAY)


def last_nonzero_end(fd: int, size: int, step: int = 1 << 16) -> int:
    """Offset just past the last non-zero byte of a file opened for reading (0 if none)."""
    pos = size
    while pos > 0:
        lo = max(0, pos - step)
        chunk = os.pread(fd, pos - lo, lo)
        stripped = chunk.rstrip(b"\0")
        if stripped:
            return lo + len(stripped)
        pos = lo
    return 0


def install(synced_dir: str, data_dir: str) -> None:
    wal_path = os.path.join(os.path.realpath(data_dir), "wal")
    wal_dir = wal_path + os.sep
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

    def record(path: str, data_end: int, size: int) -> None:
        name = os.path.basename(path)
        with lock:
            fd = fds.get(name)
            if fd is None:
                fd = fds[name] = os.open(os.path.join(synced_dir, name),
                                         os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.pwrite(fd, _RECORD % (data_end, size), 0)

    def record_listing(names: list[str]) -> None:
        target = os.path.join(synced_dir, LISTING)
        with lock:
            with open(target + ".tmp", "w") as f:
                f.write("".join(name + "\n" for name in names))
            os.replace(target + ".tmp", target)

    def data_end_of(number: int, size: int) -> int:
        if fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            return os.lseek(number, 0, os.SEEK_CUR)  # the WAL's write position
        return last_nonzero_end(number, size)

    def wrap(real):
        def sync(fd):
            number = fd if isinstance(fd, int) else fd.fileno()
            path = None
            try:
                st = os.fstat(number)
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    path = os.readlink(f"/proc/self/fd/{number}")
            except OSError:
                path = None
            segment = listing = None
            if path is not None and stat.S_ISREG(st.st_mode) and path.startswith(wal_dir):
                delay = current_delay()
                if delay:
                    time.sleep(delay)  # a slow disk (in the WAL's worker thread)
                if path.endswith(".wal"):  # not the spare being prepared
                    segment = (path, data_end_of(number, st.st_size), st.st_size)
            elif path == wal_path:
                listing = sorted(n for n in os.listdir(wal_path) if n.endswith(".wal"))
            real(fd)
            if segment is not None:
                record(*segment)
            elif listing is not None:
                record_listing(listing)
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


def synced_state(synced_dir: str) -> dict[str, tuple[int, int]]:
    """Segment file name -> (data end, size) that its last completed sync made durable."""
    state: dict[str, tuple[int, int]] = {}
    try:
        names = os.listdir(synced_dir)
    except FileNotFoundError:
        return state
    for name in names:
        if not name.endswith(".wal"):
            continue
        try:
            with open(os.path.join(synced_dir, name), "rb") as f:
                data_end, size = map(int, f.read().split())
        except (OSError, ValueError):
            continue  # created but never written: no sync completed
        state[name] = (data_end, size)
    return state


def synced_listing(synced_dir: str) -> set[str] | None:
    """The segment names of the WAL directory's last completed sync (None: none yet)."""
    try:
        with open(os.path.join(synced_dir, LISTING)) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return None


def main() -> int:
    synced_dir = sys.argv[1]
    argv = sys.argv[2:]
    data_dir = argv[argv.index("--data-dir") + 1]
    install(synced_dir, data_dir)
    import cypaxos.storage.wal
    cypaxos.storage.wal.FsyncThread = PythonFsyncThread
    sys.argv = ["cypaxos"] + argv
    from cypaxos.tools.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
