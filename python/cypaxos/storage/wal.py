"""The write-ahead log: segments, records, group commit, the spare segment.

A data dir's ``wal/`` (see `cypaxos.storage.datadir`) holds::

    00000000000000000001.wal
    00000000000000000734.wal
    ...
    spare.tmp          the next segment, zero-filled ahead of time (not always there)

No event loop here: the Wal is plain blocking calls plus one native thread for
fsyncs, and an event loop drives that thread through `submit_sync`, `sync_fileno`
and `finish_sync` (Trio's adapter is `cypaxos.replica.walsync.WalSync`).

Over the ~600 lines the package's modules aim for (about 1,050, a tenth of it this
docstring, the format's reference): the segment format, its recovery and its writer
share one file layout and one set of invariants, and are kept together.

The WAL stores opaque, non-empty byte records numbered 1, 2, 3... across segments
(the number is implicit: a segment's first record has the number in its file name,
zero-padded to 20 digits). A segment file is::

    header:  8s magic b"CYPXWAL1" | u32 version (1) | u64 first_seq
    records: u32 length | u32 crc32c(payload) | payload      (repeated)
    unused:  zero bytes up to the segment's preallocated size

All integers little-endian. ``length`` is never 0 (empty payloads are refused), so
zero-filled space never parses as a record: the records of a segment end at the end
of the file or where a zero length field starts the unused space.

Preallocation: a segment is created as a file of ``segment_bytes_max`` zero bytes,
really written and fsynced, and records are then written over the zeros at the end of
the previous record. So the fdatasync of an append only writes data blocks: the file's
size and block map do not change, and ext4 has no metadata to write (no journal commit).
Zeros are written rather than ``fallocate``d because ext4 keeps fallocated blocks
"unwritten" and the first write into each of them changes the extent tree, which the
fdatasync must then write too (``perf/wal_sync_latency.py --fill-methods`` measures
it). A record larger than a segment gets a segment of its own, which simply grows past
the preallocated size.

The zero-filled file is prepared ahead of time, by a background thread, as
``wal/spare.tmp`` once the current segment is half full (1 MiB writes, then fsync). A
rotation writes the new segment's header into it and renames it to the segment's name;
the next sync fsyncs the directory. The spare's zeros are durable before the rename, so
after a crash the new segment either does not exist (the rename was lost: the previous
segment, fdatasynced before the rename, is the last one) or holds zeros, perhaps
without its header (a torn header, reset as below), never stale bytes. A rotation that
finds the spare still being written waits for it, and one that finds none (a fresh
WAL, a record that fills half a segment at once) writes it on the spot: a stall of
about one segment's write and fsync (measured on a virtio SSD: ~8 ms for 8 MiB, ~40
ms for 64 MiB), counted in ``prealloc_waits``/``prealloc_wait_seconds``. A ``spare.tmp`` found by ``open`` is a
leftover (of a crash) and is deleted; ``close`` deletes an unused one. With the unsafe
``fsync=False`` the preallocation is a sparse ``ftruncate`` (same file contents, no
data written, no spare). ``preallocate=False`` creates segments that grow as records
are appended (the format before preallocation; for comparisons).

Recovery (``Wal.open``) reads every segment and checks every record, then:

* In a segment other than the last, any bad record (or bad header) raises
  ``WalCorruptError``; only zero bytes (unused space) may follow the last record. This
  is unambiguous because a segment is fdatasync'ed before the next one is created (not
  with the unsafe ``fsync=False``).
* In the last segment, the records end at the first zero length field if nothing but
  zero bytes follows: that is the unused space (also of a file whose zero-filled tail
  comes from an interrupted append: indistinguishable, and harmless). Otherwise the
  *first bad record* (a short record header, a zero length, a length running past the
  end of the file, or a crc mismatch) starts the **torn tail** unless a valid record
  (an 8-byte header with ``length > 0``, a payload that fits in the file, a matching
  crc) starts at some later byte offset of the file. If one does, the damage is not at
  the tail and ``WalCorruptError`` names the file and offset. Otherwise the torn bytes
  (from the end of the last good record to the file's last non-zero byte) are
  overwritten with zeros and fsynced, and a warning saying how many bytes were zeroed is
  logged and kept in ``Wal.warnings``. They are zeroed, not left behind the write
  position, because the records appended next may be shorter than the torn bytes: what
  remained of those could later look like damage, or (completed by zeros) like a valid
  record after a bad one, and make a good log look corrupt.

  The search for a later valid record is exhaustive for records that end where the
  file's data ends (at the end of the file, or where its trailing zero bytes
  begin): so damage inside any one record that has intact records after it is always
  reported, however large. Records ending elsewhere (as when damage is followed by
  intact records and then a torn one, or when the last record's payload ends with zero
  bytes) are looked for at every offset until ``RESYNC_HASH_BUDGET`` bytes of candidate
  payloads have been hashed, which keeps recovery within about a second per 64 MiB of
  torn bytes; past that, the tail counts as torn.

  This accepts every way an interrupted append can end (a short header, a short
  payload, a crc mismatch of a record running to the end of the data, trailing
  zeros) and it still catches a flipped byte in any record but the very last one
  (damage confined to the last record looks exactly like a torn append). It fails
  stop, needing an operator, in two rare cases rather than guess: after a power cut
  the kernel may have written a later page of an unsynced append but not an earlier
  one; and a torn record's own payload may contain the bytes of a whole valid
  record (a checksum over the length field, in a later format, would remove the
  second).
* A last segment whose header is short or partly zero (creation interrupted) and
  that holds no valid record is reset to an empty segment (its header rewritten, any
  other non-zero bytes zeroed), with a warning.
* Segments must be contiguous: each starts right after the previous one ends.
* Appends continue at the end of the last good record. A last segment shorter than
  ``segment_bytes_max`` (written before preallocation, or by ``preallocate=False``) is
  extended with zeros to that size first, when preallocating: a one-time stall of
  ``open``. Segments written before preallocation are read like any other.

Writing: ``append`` only encodes into a memory buffer; ``flush`` hands the buffer to
the OS with one ``os.write`` on the segment's fd, which is positioned at the end of the
records (no ``O_APPEND``: the file is longer than its data); ``sync`` also fdatasyncs
(blocking). For event-loop code, ``submit_sync`` flushes and hands the fdatasync to
the Wal's native thread (``cypaxos.fsyncthread``, which needs no GIL) and returns at
once; the loop waits for ``sync_fileno()`` to become readable and calls
``finish_sync()``, which advances ``durable_seq``. At most one fsync is in flight, and
it covers everything flushed before it started (group commit). The Trio adapter,
``WalSync``, adds ``on_sync`` callbacks and an awaitable ``sync_async``.

If a write or fsync fails, the ``Wal`` refuses all further use (after a failed fsync
the kernel may have dropped the dirty pages, so a retry could "succeed" without the
data): the process should restart and recover from the files.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import warnings
from typing import Iterable, Iterator

from ..errors import StorageError, WalCorruptError
from ..fsyncthread import FsyncThread
from .files import fsync_dir, fsync_path, lock_dir, write_all

# The C implementation is ~100x faster; the pure Python fallback is still correct,
# so use it without the import-time warning if the extension is missing.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import google_crc32c

CRC32C_IS_C = google_crc32c.implementation == "c"
_crc32c = google_crc32c.value  # the C version takes bytes only (not memoryview)

__all__ = [
    "Wal",
    "segment_name",
    "describe_error",
    "CRC32C_IS_C",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "SEGMENT_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "PAYLOAD_BYTES_MAX",
    "SEGMENT_BYTES_MAX_DEFAULT",
    "BUFFER_BYTES_MAX_DEFAULT",
    "RESYNC_HASH_BUDGET",
    "SPARE_FILE",
]

log = logging.getLogger("cypaxos.wal")  # the name in log lines, kept across moves


SEGMENT_MAGIC = b"CYPXWAL1"
SEGMENT_VERSION = 1
_SEGMENT_HEADER = struct.Struct("<8sIQ")
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size  # 20
_RECORD_HEADER = struct.Struct("<II")
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 8
PAYLOAD_BYTES_MAX = 0xFFFFFFFF
SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
BUFFER_BYTES_MAX_DEFAULT = 4 * 1024 * 1024
# Bounds recovery time: how many bytes of candidate records the search for a valid
# record after a bad one may hash, beyond records ending where the data ends.
RESYNC_HASH_BUDGET = 256 * 1024 * 1024
#: The next segment, zero-filled ahead of time (in the WAL directory).
SPARE_FILE = "spare.tmp"
_ZERO_CHUNK = bytes(1 << 20)  # zero fills are written in 1 MiB pieces
_ZERO_STEP = 1 << 16          # finding where the data ends looks at 64 KiB pieces

_SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
_NONZERO = re.compile(rb"[^\x00]")


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record is ``first_seq``."""
    return f"{first_seq:020d}.wal"


def _segment_header(first_seq: int) -> bytes:
    return _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, first_seq)



def _write_zeros(fd: int, start: int, stop: int, cancelled=None) -> None:
    """Write zero bytes over ``[start, stop)`` of ``fd`` with pwrite, 1 MiB at a time
    (the fd's position does not move); stop early once ``cancelled()`` is true."""
    with memoryview(_ZERO_CHUNK) as zeros:
        off = start
        while off < stop:
            if cancelled is not None and cancelled():
                return
            off += os.pwrite(fd, zeros[: min(len(zeros), stop - off)], off)


def _data_end(data: bytes, start: int) -> int:
    """The offset just past the last non-zero byte of ``data[start:]``; ``start`` if
    there is none. Looks from the end, so a long zero tail costs one memcmp pass."""
    pos = len(data)
    full = _ZERO_CHUNK[:_ZERO_STEP]
    while pos > start:
        lo = max(start, pos - _ZERO_STEP)
        if not data.startswith(full if pos - lo == _ZERO_STEP else bytes(pos - lo), lo):
            return lo + len(data[lo:pos].rstrip(b"\x00"))
        pos = lo
    return start


def describe_error(exc: BaseException) -> str:
    """An I/O error as words: ``No space left on device: /data/wal/spare.tmp``."""
    if isinstance(exc, OSError) and exc.strerror:
        words = exc.strerror
        if exc.errno and os.strerror(exc.errno) != words:   # "fdatasync failed"
            words += f" ({os.strerror(exc.errno)})"
        return words + (f": {exc.filename}" if exc.filename else "")
    return " ".join(str(exc).split()) or type(exc).__name__


def _sync_fds(fd: int, dir_fd: int) -> None:
    """fdatasync ``fd``, then fsync ``dir_fd`` unless it is -1 (a worker thread body)."""
    os.fdatasync(fd)
    if dir_fd >= 0:
        os.fsync(dir_fd)


# ------------------------------------------------------------------------ record scan


def _scan_records(data: bytes, off: int) -> tuple[int, int, str | None]:
    """Walk the valid records of ``data`` from ``off``.

    Returns ``(count, end, problem)``: ``end`` is the offset just past the last valid
    record; ``problem`` is None if ``end == len(data)``, else what is wrong with the
    bytes at ``end``.
    """
    n = len(data)
    unpack = _RECORD_HEADER.unpack_from
    crc32c = _crc32c
    count = 0
    while off < n:
        if n - off < RECORD_HEADER_SIZE:
            return count, off, f"short record header ({n - off} bytes)"
        length, crc = unpack(data, off)
        if length == 0:
            return count, off, "zero record length"
        end = off + RECORD_HEADER_SIZE + length
        if end > n:
            return count, off, f"record of {length} bytes runs {end - n} bytes past the end"
        if crc32c(data[off + RECORD_HEADER_SIZE : end]) != crc:
            return count, off, "crc mismatch"
        count += 1
        off = end
    return count, off, None


def _valid_record_after(data: bytes, start: int, data_end: int | None = None
                        ) -> int | None:
    """An offset >= ``start`` where a valid record starts, searched as the tail rule
    in the module docstring says; None if none was found. ``data_end``: where the
    trailing zeros (unused space) of ``data`` begin, if known."""
    if data_end is None:
        data_end = _data_end(data, 0)
    for end in sorted({len(data), data_end}, reverse=True):
        pos = _record_ending_at(data, start, end)
        if pos is not None:
            return pos
    return _find_record(data, start, RESYNC_HASH_BUDGET)


def _record_ending_at(data: bytes, start: int, end: int) -> int | None:
    """The first offset ``pos >= start`` such that ``data[pos:end]`` is a valid record.

    Linear and fast: a record at ``pos`` has length ``end - pos - 8``, whose upper three
    bytes stay the same for runs of up to 256 consecutive ``pos``, so ``bytes.find``
    looks for them over each run and only its hits are checked further.
    """
    last = end - RECORD_HEADER_SIZE - 1  # length >= 1
    pos = max(start, end - RECORD_HEADER_SIZE - PAYLOAD_BYTES_MAX)
    while pos <= last:
        length = end - RECORD_HEADER_SIZE - pos
        run_last = min(last, pos + (length & 0xFF))  # same length >> 8 up to here
        upper = (length >> 8).to_bytes(3, "little")
        hit = data.find(upper, pos + 1, run_last + 4)
        while hit >= 0:
            cand = hit - 1
            cand_length, crc = _RECORD_HEADER.unpack_from(data, cand)
            if (cand_length == end - RECORD_HEADER_SIZE - cand
                    and _crc32c(data[cand + RECORD_HEADER_SIZE : end]) == crc):
                return cand
            hit = data.find(upper, hit + 1, run_last + 4)
        pos = run_last + 1
    return None


def _find_record(data: bytes, start: int, hash_budget: int) -> int | None:
    """The first offset >= ``start`` where a valid record starts, or None if there is
    none or finding out would hash more than ``hash_budget`` bytes of candidates."""
    n = len(data)
    last = n - RECORD_HEADER_SIZE - 1  # the last offset where a record fits
    if start > last:
        return None
    # A record's length field is non-zero, and its high byte is at most this (it
    # fits in the file), so searching for both skips zeros and random bytes fast.
    high_max = (n - start - RECORD_HEADER_SIZE) >> 24
    high_ok = re.compile(rb"[\x00-\x%02x]" % high_max) if high_max < 0xFF else None
    unpack = _RECORD_HEADER.unpack_from
    pos = start
    while pos <= last:
        match = _NONZERO.search(data, pos, last + 4)
        if match is None:
            return None
        pos = max(pos, match.start() - 3)
        if high_ok is not None:
            match = high_ok.search(data, pos + 3, last + 4)
            if match is None:
                return None
            if match.start() - 3 > pos:
                pos = match.start() - 3
                continue  # check the non-zero condition again at the new pos
        if pos > last:
            return None
        length, crc = unpack(data, pos)
        end = pos + RECORD_HEADER_SIZE + length
        if length and end <= n:
            hash_budget -= length
            if hash_budget < 0:
                return None
            if _crc32c(data[pos + RECORD_HEADER_SIZE : end]) == crc:
                return pos
        pos += 1
    return None


def _header_is_torn(head: bytes, expected: bytes) -> bool:
    """True if ``head`` could be ``expected`` cut short or with unwritten (zero) bytes."""
    return all(b in (0, e) for b, e in zip(head, expected))


# ------------------------------------------------------------------------ the spare


class _Spare:
    """The next segment, zero-filled and fsynced by a thread of its own.

    ``take()`` waits for the thread and hands over the open (write-only) fd;
    ``cancel()`` stops the thread early, closes the fd and deletes the file.
    """

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self._fd = -1
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="cypaxos.wal.spare",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                               | os.O_CLOEXEC, 0o644)
            _write_zeros(self._fd, 0, self.size, lambda: self._cancelled)
            if not self._cancelled:
                os.fsync(self._fd)  # zeros, size and blocks durable before any rename
        except BaseException as exc:
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = self.path  # a full disk shows here first: say where
            self._error = exc

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def take(self) -> int:
        """Wait for the file; return its fd (now the caller's). Raises its error."""
        self._thread.join()
        fd, self._fd = self._fd, -1
        if self._error is not None:
            if fd >= 0:
                os.close(fd)
            raise self._error
        return fd

    def cancel(self) -> None:
        self._cancelled = True
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------ WAL


class Wal:
    """An append-only log of opaque byte records, numbered from 1, in segment files.

    Get one with ``Wal.open``. Not thread-safe: use it from one thread (the event
    loop's); ``submit_sync`` only sends the fsync itself to the native sync thread.

    Public attributes: ``path``, ``fsync``, ``preallocate``, ``segment_bytes_max``,
    ``durable_seq``, ``fsync_count``, ``prealloc_waits``, ``prealloc_wait_seconds``,
    ``warnings``; properties ``first_seq``, ``last_seq``, ``recovered_seq``.
    """

    def __init__(self, path: str, *, fsync: bool, segment_bytes_max: int,
                 buffer_bytes_max: int, dir_fd: int, preallocate: bool = True):
        """Private: use ``Wal.open``."""
        self.path = path  #: the WAL directory
        #: False: ``sync`` only hands data to the OS. UNSAFE: a power cut or kernel
        #: crash can lose records the caller was told were durable. Tests, benchmarks.
        self.fsync = fsync
        self.segment_bytes_max = segment_bytes_max  #: rotate before a segment exceeds this
        #: Create segments zero-filled to ``segment_bytes_max`` (see the module doc).
        self.preallocate = preallocate
        #: Segment creations that had to wait for (or write) the zero fill, and how long.
        self.prealloc_waits = 0
        self.prealloc_wait_seconds = 0.0
        # The spare (next segment) is started once the current one holds this much.
        self._spare_at = (max(SEGMENT_HEADER_SIZE, segment_bytes_max // 2)
                          if preallocate and fsync else 1 << 62)
        self._spare: _Spare | None = None
        self._buffer_bytes_max = buffer_bytes_max  # auto-flush above this, bounding memory
        self._dir_fd = dir_fd  # open and flock'ed for the Wal's lifetime; fsynced too
        #: Highest seq known durable (fdatasync'ed, or just flushed if ``fsync`` is
        #: False). Invariant: durable_seq <= _written_seq <= last_seq.
        self.durable_seq = 0
        self.fsync_count = 0  #: fdatasyncs of segment files by sync and rotation
        self.warnings: list[str] = []  #: what recovery repaired (torn tails cut)
        # First seqs of the segments, ascending; segment i holds seqs
        # _segments[i] .. _segments[i+1]-1; the last one is the current segment.
        self._segments: list[int] = []
        # The current segment, positioned at _seg_bytes - len(_buf): the end of its
        # records on disk. Every byte in it is validated/ours; past that, zeros.
        self._fd = -1
        self._seg_bytes = 0  # end of the current segment's records, including self._buf
        self._buf = bytearray()  # encoded records not yet written; all go to self._fd
        self._next_seq = 1  # seq of the next append
        self._written_seq = 0  # highest seq handed to the OS; those above are in _buf
        self._recovered_seq = 0  # highest seq found by recovery; replay() ends there
        self._dir_dirty = False  # a segment was created since the dir was last fsynced
        # (target seq, dir fd or -1, first seq of its segment) of the fsync in the sync
        # thread, from submit_sync until finish_sync; None when there is none.
        self._sync_job: tuple[int, int, int] | None = None
        # The native thread that runs our fsyncs (cypaxos.fsyncthread: no GIL hand-offs),
        # started by the first submit_sync.
        self._sync_thread: FsyncThread | None = None
        # fds rotated away while a worker thread may still fsync them; closed when
        # that fsync ends (closing earlier could let the number be reused under it).
        self._retired_fds: list[int] = []
        self._failed: BaseException | None = None  # a write/fsync failed: unusable
        self._closed = False

    # ---------------------------------------------------------------- open / recovery

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT,
        fsync: bool = True,
        buffer_bytes_max: int = BUFFER_BYTES_MAX_DEFAULT,
        preallocate: bool = True,
    ) -> "Wal":
        """Open (creating if missing) and lock the WAL in directory ``path``, recover it.

        Every segment is read and checked (one at a time); a torn tail of the last
        segment is zeroed (see the module docstring). Raises ``WalCorruptError`` for
        damage that is not a torn tail and ``StorageError`` if another ``Wal`` has the
        directory open. Call ``replay()`` to read the recovered records.
        ``fsync=False`` is UNSAFE (see the ``fsync`` attribute). ``preallocate=False``
        makes segments that grow as they are written (slower fdatasyncs; the module
        docstring says why).
        """
        if segment_bytes_max < SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 1:
            raise ValueError(f"segment_bytes_max {segment_bytes_max} is too small")
        if buffer_bytes_max < 1:
            raise ValueError(f"buffer_bytes_max must be positive, not {buffer_bytes_max}")
        path = os.path.abspath(os.fspath(path))
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        else:
            fsync_dir(os.path.dirname(path))
        dir_fd = lock_dir(path)
        if dir_fd is None:
            raise StorageError(f"wal {path} is in use (locked by another opener)")
        wal = cls(path, fsync=fsync, segment_bytes_max=segment_bytes_max,
                  buffer_bytes_max=buffer_bytes_max, dir_fd=dir_fd,
                  preallocate=preallocate)
        try:
            wal._recover()
        except BaseException:
            wal._drop_spare()
            wal._close_fds()
            raise
        return wal

    def _segment_path(self, first_seq: int) -> str:
        return os.path.join(self.path, segment_name(first_seq))

    @property
    def _spare_path(self) -> str:
        return os.path.join(self.path, SPARE_FILE)

    def _list_segments(self) -> list[int]:
        firsts = []
        for name in os.listdir(self.path):
            if not name.endswith(".wal"):
                continue  # not ours (an editor's backup, a copy being made...)
            match = _SEGMENT_NAME.match(name)
            if match is None or int(match.group(1)) == 0:
                raise WalCorruptError(f"{self.path}: unexpected segment file name {name!r}")
            firsts.append(int(match.group(1)))
        firsts.sort()
        return firsts

    def _recover(self) -> None:
        try:
            os.unlink(self._spare_path)  # a leftover: not part of the log
        except FileNotFoundError:
            pass
        firsts = self._list_segments()
        if not firsts:
            self._segments = [1]
            self._fd = self._new_segment(1)
            self._seg_bytes = SEGMENT_HEADER_SIZE
            self._sync_new_segment()
            return
        next_seq = firsts[0]
        end = SEGMENT_HEADER_SIZE
        for i, first in enumerate(firsts):
            file = self._segment_path(first)
            if first != next_seq:
                raise WalCorruptError(
                    f"{file}: segment starts at seq {first} but the previous segment "
                    f"ends at seq {next_seq - 1} (a segment is missing or extra)"
                )
            count, end = self._recover_segment(file, first, last=i == len(firsts) - 1)
            next_seq = first + count
        if self.fsync:
            # What we found may sit only in the page cache (written by a process that
            # died before its fsync); it counts as durable from now on, so make it so.
            for first in firsts:
                fsync_path(self._segment_path(first))
            os.fsync(self._dir_fd)
        self._segments = firsts
        self._next_seq = next_seq
        self._written_seq = self._recovered_seq = self.durable_seq = next_seq - 1
        current = self._segment_path(firsts[-1])
        self._fd = os.open(current, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(self._fd, end, os.SEEK_SET)  # appends go right after the last record
        self._seg_bytes = end
        self._maybe_start_spare()

    def _recover_segment(self, file: str, first: int, last: bool) -> tuple[int, int]:
        """Check one segment (zeroing a torn tail if ``last``); return its record count
        and the end of its last record."""
        with open(file, "rb") as f:
            data = f.read()
        expected = _segment_header(first)
        head = data[:SEGMENT_HEADER_SIZE]
        if head != expected:
            torn = last and _header_is_torn(head, expected)
            if torn and _valid_record_after(data, 0) is None:
                self._reset_segment(file, first, data)
                return 0, SEGMENT_HEADER_SIZE
            raise WalCorruptError(f"{file}: bad segment header at offset 0: {head!r}")
        count, end, problem = _scan_records(data, SEGMENT_HEADER_SIZE)
        data_end = end if problem is None else _data_end(data, end)
        if data_end > end:  # non-zero bytes after the last good record
            if not last:
                raise WalCorruptError(
                    f"{file}: bad record at offset {end} ({problem}) in a segment that "
                    f"is not the last one"
                )
            after = _valid_record_after(data, end + 1, data_end)
            if after is not None:
                raise WalCorruptError(
                    f"{file}: bad record at offset {end} ({problem}) followed by a valid "
                    f"record at offset {after}"
                )
            self._rewrite(file, len(data), end, data_end)
            self._warn(f"{file}: zeroed {data_end - end} bytes of torn tail at offset "
                       f"{end} ({problem})")
        elif last and self._short(len(data)):
            self._rewrite(file, len(data))
        return count, end

    def _short(self, size: int) -> bool:
        """Whether a last segment of ``size`` bytes needs extending with zeros."""
        return self.preallocate and size < self.segment_bytes_max

    def _rewrite(self, file: str, size: int, zero_from: int = 0, zero_to: int = 0,
                 header: bytes = b"") -> None:
        """Repair the last segment: write ``header`` at 0, zeros over
        ``[zero_from, zero_to)``, extend it to its preallocated size if short; fsync."""
        fd = os.open(file, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if header:
                with memoryview(header) as view:
                    done = 0
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], done)
                size = max(size, len(header))
            _write_zeros(fd, zero_from, zero_to)
            if self._short(size):
                if self.fsync:
                    _write_zeros(fd, size, self.segment_bytes_max)
                else:
                    os.ftruncate(fd, self.segment_bytes_max)
        finally:
            os.close(fd)
        fsync_path(file)  # always: a recovery action, cheap and rare

    def _reset_segment(self, file: str, first: int, data: bytes) -> None:
        header = _segment_header(first)
        self._rewrite(file, len(data), SEGMENT_HEADER_SIZE,
                      _data_end(data, SEGMENT_HEADER_SIZE), header=header)
        self._warn(f"{file}: reset a segment with a torn header ({len(data)} bytes, "
                   f"no records)")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)

    # ------------------------------------------------------------------------ replay

    def replay(self, start_seq: int = 1) -> Iterator[tuple[int, bytes]]:
        """Yield ``(seq, payload)`` for the recovered records with seq >= ``start_seq``.

        Covers what ``open`` found (up to ``recovered_seq``), reading one segment at
        a time and skipping whole segments below ``start_seq``. Records are checked
        again; a record that changed since ``open`` raises ``WalCorruptError``. Run it
        before ``truncate_before``.
        """
        end_seq = self._recovered_seq
        segments = list(self._segments)
        for i, first in enumerate(segments):
            if first > end_seq:
                break
            stop = end_seq + 1
            if i + 1 < len(segments):
                stop = min(stop, segments[i + 1])
            if stop <= start_seq:
                continue  # every record of this segment is below start_seq
            yield from self._replay_segment(first, stop, start_seq)

    def _replay_segment(self, first: int, stop: int, start_seq: int
                        ) -> Iterator[tuple[int, bytes]]:
        file = self._segment_path(first)
        with open(file, "rb") as f:
            data = f.read()
        n = len(data)
        unpack = _RECORD_HEADER.unpack_from
        crc32c = _crc32c
        off = SEGMENT_HEADER_SIZE
        if data[:off] != _segment_header(first):
            raise WalCorruptError(f"{file}: segment header changed since the wal opened")
        for seq in range(first, stop):
            if n - off < RECORD_HEADER_SIZE:
                raise WalCorruptError(f"{file}: record at offset {off} missing since open")
            length, crc = unpack(data, off)
            end = off + RECORD_HEADER_SIZE + length
            payload = data[off + RECORD_HEADER_SIZE : end]
            if not length or end > n or crc32c(payload) != crc:
                raise WalCorruptError(f"{file}: bad record at offset {off} since open")
            if seq >= start_seq:
                yield seq, payload
            off = end

    # ----------------------------------------------------------------------- appends

    @property
    def first_seq(self) -> int:
        """The lowest seq still stored (grows with ``truncate_before``)."""
        return self._segments[0]

    @property
    def last_seq(self) -> int:
        """The highest seq appended (0 if none ever was)."""
        return self._next_seq - 1

    @property
    def recovered_seq(self) -> int:
        """The highest seq found when the WAL was opened; ``replay`` ends there."""
        return self._recovered_seq

    def append(self, payload: bytes) -> int:
        """Buffer one non-empty record in memory; return its seq. No I/O (except an
        automatic flush past ``buffer_bytes_max`` and segment rotation)."""
        if type(payload) is not bytes:
            payload = self._as_bytes(payload)
        n = len(payload)
        if not 0 < n <= PAYLOAD_BYTES_MAX:
            raise ValueError(f"a wal record must have 1..{PAYLOAD_BYTES_MAX} bytes, "
                             f"not {n}")
        if self._closed or self._failed is not None:
            self.check_usable()
        size = RECORD_HEADER_SIZE + n
        # Rotate unless the segment is empty: a record larger than a segment gets one.
        seg_bytes = self._seg_bytes
        if seg_bytes + size > self.segment_bytes_max and seg_bytes > SEGMENT_HEADER_SIZE:
            self._rotate()
        self._buf += _RECORD_HEADER.pack(n, _crc32c(payload))
        self._buf += payload
        self._seg_bytes += size
        seq = self._next_seq
        self._next_seq = seq + 1
        if len(self._buf) >= self._buffer_bytes_max:
            self.flush()
        return seq

    def append_many(self, payloads: Iterable[bytes]) -> int:
        """Append each payload in order; return the last seq (``last_seq`` if none)."""
        # Same as calling append() in a loop, with the hot state kept in locals.
        self.check_usable()
        pack = _RECORD_HEADER.pack
        crc32c = _crc32c
        buf = self._buf
        seg_max = self.segment_bytes_max
        buf_max = self._buffer_bytes_max
        seg_bytes = self._seg_bytes
        seq = self._next_seq
        try:
            for payload in payloads:
                if type(payload) is not bytes:
                    payload = self._as_bytes(payload)
                n = len(payload)
                if not 0 < n <= PAYLOAD_BYTES_MAX:
                    raise ValueError(
                        f"a wal record must have 1..{PAYLOAD_BYTES_MAX} bytes, not {n}")
                size = RECORD_HEADER_SIZE + n
                if seg_bytes + size > seg_max and seg_bytes > SEGMENT_HEADER_SIZE:
                    self._seg_bytes, self._next_seq = seg_bytes, seq
                    self._rotate()
                    seg_bytes = self._seg_bytes
                buf += pack(n, crc32c(payload))
                buf += payload
                seg_bytes += size
                seq += 1
                if len(buf) >= buf_max:
                    self._seg_bytes, self._next_seq = seg_bytes, seq
                    self.flush()
        finally:
            # Records already encoded stay appended even if a later payload is bad.
            self._seg_bytes, self._next_seq = seg_bytes, seq
        return seq - 1

    @staticmethod
    def _as_bytes(payload) -> bytes:
        # bytes(int) would silently make zeros: accept only real byte buffers.
        if isinstance(payload, (bytearray, memoryview)):
            return bytes(payload)
        raise TypeError(f"a wal record must be bytes, not {type(payload).__name__}")

    def flush(self) -> None:
        """Hand every buffered record to the OS with one write (not durable yet)."""
        self.check_usable()
        buf = self._buf
        if buf:
            try:
                write_all(self._fd, buf)
            except BaseException as e:
                # Part of buf may be in the file: appending on would tear it.
                self._fail(e, self._segment_path(self._segments[-1]))
                raise
            buf.clear()
            self._written_seq = self._next_seq - 1
        if self._seg_bytes >= self._spare_at and self._spare is None:
            self._maybe_start_spare()

    def _maybe_start_spare(self) -> None:
        """Start zero-filling the next segment once the current one is half full."""
        if self._seg_bytes >= self._spare_at and self._spare is None:
            self._spare = _Spare(self._spare_path, self.segment_bytes_max)

    def _rotate(self) -> None:
        """Finish the current segment (durably) and start a new one at ``_next_seq``."""
        self.flush()
        old = self._fd
        if self.fsync:
            # A segment is complete and durable before the next exists, so recovery
            # may call any damage in a non-last segment corruption.
            try:
                os.fdatasync(old)
            except BaseException as e:
                self._fail(e, self._segment_path(self._segments[-1]))
                raise
            self.fsync_count += 1
        first = self._next_seq
        try:
            self._fd = self._new_segment(first)
        except BaseException as e:
            self._fail(e, self._segment_path(first))
            raise
        self._segments.append(first)
        self._seg_bytes = SEGMENT_HEADER_SIZE
        self._dir_dirty = True
        if self._sync_job is not None:
            self._retired_fds.append(old)
        else:
            os.close(old)

    def _new_segment(self, first: int) -> int:
        """Create the segment whose first record is ``first``; return its fd, positioned
        after the header (the caller makes the directory entry durable)."""
        if not (self.preallocate and self.fsync):
            return self._create_segment(first)
        spare, self._spare = self._spare, None
        started = time.perf_counter()
        # A fresh WAL, or a rotation before the spare was due: this one is written now,
        # a wait whether or not its thread is already done when ready() asks.
        made_now = spare is None
        if made_now:
            spare = _Spare(self._spare_path, self.segment_bytes_max)
        if made_now or not spare.ready():
            fd = spare.take()
            self.prealloc_waits += 1
            self.prealloc_wait_seconds += time.perf_counter() - started
        else:
            fd = spare.take()
        try:
            header = _segment_header(first)
            if os.pwrite(fd, header, 0) != len(header):
                raise OSError("short write of a segment header")
            os.lseek(fd, len(header), os.SEEK_SET)
            path = self._segment_path(first)
            if os.path.lexists(path):  # what O_EXCL would say: never replace a segment
                raise FileExistsError(f"wal segment {path} exists already")
            os.rename(spare.path, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _create_segment(self, first: int) -> int:
        """A new segment written in place: header, then (preallocating without fsync)
        a sparse zero fill. Used when there is no spare."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(self._segment_path(first), flags, 0o644)
        try:
            write_all(fd, _segment_header(first))
            if self.preallocate:
                os.ftruncate(fd, self.segment_bytes_max)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _sync_new_segment(self) -> None:
        if self.fsync:
            os.fdatasync(self._fd)
            os.fsync(self._dir_fd)

    # ------------------------------------------------------------------------ syncing

    def sync(self) -> int:
        """Flush, then fdatasync the current segment (and fsync the dir if a segment
        was created); return ``durable_seq``. Blocks: Trio code wants ``WalSync.sync_async``.
        With ``fsync=False`` it only flushes (UNSAFE)."""
        self.flush()
        target = self._written_seq
        if self.fsync and (target > self.durable_seq or self._dir_dirty):
            dir_fd = self._dir_fd if self._dir_dirty else -1
            self._dir_dirty = False
            try:
                _sync_fds(self._fd, dir_fd)
            except BaseException as e:
                self._fail(e, self._segment_path(self._segments[-1]))
                raise
            self.fsync_count += 1
        if target > self.durable_seq:
            self.durable_seq = target
        return self.durable_seq

    @property
    def sync_in_flight(self) -> bool:
        """Whether an fsync started by `submit_sync` has not been finished yet."""
        return self._sync_job is not None

    def submit_sync(self) -> bool:
        """Begin making every record appended so far durable; don't wait for it.

        Group commit: the flush happens here, the fdatasync in the Wal's sync thread,
        and it covers everything flushed before it started.  At most one fsync is in
        flight: if one is, nothing starts and False is returned.  With ``fsync=False``
        the records are durable (flushed) on return.  Returns True if an fsync
        started: the caller then waits until `sync_fileno()` is readable and calls
        `finish_sync()` (an event loop's adapter does both, e.g.
        `cypaxos.replica.walsync.WalSync`).  One thread only, like every method.
        """
        self.check_usable()
        if self._sync_job is not None:
            return False
        self.flush()
        target = self._written_seq
        if not self.fsync:
            self.durable_seq = max(self.durable_seq, target)
            return False
        if target <= self.durable_seq and not self._dir_dirty:
            return False
        fd = self._fd
        dir_fd = self._dir_fd if self._dir_dirty else -1
        self._dir_dirty = False
        if self._sync_thread is None:
            self._sync_thread = FsyncThread()
        self._sync_thread.submit(fd, dir_fd)
        self._sync_job = (target, dir_fd, self._segments[-1])
        return True

    def sync_fileno(self) -> int:
        """The fd that becomes readable when the fsync `submit_sync` started has ended.

        ValueError once `close()` stopped the sync thread (nothing will end then).
        """
        thread = self._sync_thread
        if thread is None or self._sync_job is None:
            raise ValueError(f"wal {self.path} has no fsync in flight")
        return thread.fileno()

    def finish_sync(self) -> BaseException | None:
        """Collect the fsync in flight once `sync_fileno()` is readable; return None,
        or its error (the Wal is unusable then).  ValueError if there is none (close()
        stopped the thread)."""
        thread = self._sync_thread
        if thread is None or self._sync_job is None:
            raise ValueError(f"wal {self.path} has no fsync in flight")
        try:
            if thread.take() == -1:
                raise AssertionError("fsync thread woke us without a result")
        except ValueError:
            raise  # the thread is closed: nobody waits
        except BaseException as exc:
            error = exc
        else:
            error = None
        self.abandon_sync(error)
        return error

    def abandon_sync(self, error: BaseException | None) -> None:
        """End the fsync in flight with `error` (None: it succeeded) without asking the
        sync thread: for an adapter whose wait failed.  `finish_sync` calls it too."""
        target, dir_fd, segment = self._sync_job
        self._sync_job = None
        if error is None:
            self.fsync_count += 1
            if target > self.durable_seq:
                self.durable_seq = target
        else:
            if dir_fd >= 0:
                self._dir_dirty = True
            self._fail(error, self._segment_path(segment))
        retired, self._retired_fds = self._retired_fds, []
        for old in retired:
            os.close(old)
        if self._closed:
            self._close_fds()  # close() ran while the thread had our fds

    @property
    def failure(self) -> BaseException | None:
        """The write or fsync error that made this Wal unusable, or None."""
        return self._failed

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    def _fail(self, exc: BaseException, file: str) -> None:
        """Make the Wal unusable after `exc` (an error writing or syncing `file`)."""
        if isinstance(exc, OSError) and exc.filename is None:
            # Errors of fd calls (write, fdatasync) name no file; the one line a
            # stopping replica leaves must say which (DESIGN.md section 8).
            exc.filename = file
        if self._failed is None:
            self._failed = exc
            # Debug only: the error is raised to (or handed to) the caller, whose
            # report is the one line (a replica's: it stops, saying why).
            log.debug("wal %s is unusable after an I/O error: %r", self.path, exc)

    def check_usable(self) -> None:
        """Raise ValueError if closed, StorageError if a write or fsync failed."""
        if self._closed:
            raise ValueError(f"wal {self.path} is closed")
        if self._failed is not None:
            raise StorageError(
                f"wal {self.path} is unusable after an I/O error: "
                f"{describe_error(self._failed)}") from self._failed

    # ---------------------------------------------------------------- compaction, close

    def truncate_before(self, seq: int) -> int:
        """Delete the oldest segments all of whose records are < ``seq``; never the
        current one. Returns how many were deleted. Blocks (fsyncs the dir per
        segment, so the survivors are a contiguous run whatever a crash keeps)."""
        self.check_usable()
        deleted = 0
        while len(self._segments) > 1 and self._segments[1] <= seq:
            os.unlink(self._segment_path(self._segments[0]))
            self._segments.pop(0)
            deleted += 1
            if self.fsync:
                try:
                    os.fsync(self._dir_fd)
                except BaseException as e:
                    self._fail(e, self.path)
                    raise
        return deleted

    def close(self) -> None:
        """Flush and sync what is buffered (unless a write failed), release the lock.

        Idempotent. If an fsync is in flight, waits for it to end first.
        """
        if self._closed:
            return
        self._spare_at = 1 << 62  # the last flush must not start a spare
        try:
            if self._failed is None:
                self.sync()
        finally:
            self._closed = True
            if self._sync_thread is not None:
                # Waits for an fsync in flight: its fds may be closed after that.
                # (An adapter waiting on sync_fileno() is told first: WalSync.close.)
                thread, self._sync_thread = self._sync_thread, None
                thread.close()
                self._sync_job = None
            self._drop_spare()
            self._close_fds()

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                spare.cancel()
            except OSError as exc:
                log.warning("wal %s: could not remove %s: %r", self.path, spare.path, exc)

    def _close_fds(self) -> None:
        for fd in [self._fd, self._dir_fd, *self._retired_fds]:
            if fd >= 0:
                os.close(fd)
        self._fd = self._dir_fd = -1
        self._retired_fds = []

    def __enter__(self) -> "Wal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Wal {self.path} seqs {self.first_seq}..{self.last_seq} "
            f"durable {self.durable_seq}{'' if self.fsync else ' fsync=False'}>"
        )
