"""Tests of cypaxos.storage.wal and .datadir (and the WAL's Trio adapter, WalSync):
real files, real fsync, no mocks."""

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import google_crc32c
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cypaxos.errors import DataDirError, Error, StorageError, WalCorruptError
from cypaxos.replica.walsync import WalSync
from cypaxos.storage.datadir import IDENTITY_FILE, open_data_dir
from cypaxos.storage.wal import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SPARE_FILE,
    Wal,
    segment_name,
)


pytestmark = pytest.mark.fast


def payloads(n, size=None):
    """n distinct payloads of varied (or fixed) sizes."""
    return [(b"%d:" % i) * (size or 1 + i % 7) for i in range(n)]


def write_wal(path, records, **options):
    with Wal.open(path, **options) as wal:
        for record in records:
            wal.append(record)
        wal.sync()


def read_wal(path, **options):
    """(records, warnings) after recovering the WAL at path."""
    with Wal.open(path, **options) as wal:
        return [p for _, p in wal.replay()], wal.warnings


def segment_files(path):
    return sorted(name for name in os.listdir(path) if name.endswith(".wal"))


def record_offsets(data):
    """(start, end) of every record in one segment's bytes (they end at a zero length:
    the unused, zero-filled rest of a preallocated segment)."""
    spans, off = [], SEGMENT_HEADER_SIZE
    while off + RECORD_HEADER_SIZE <= len(data):
        (length,) = struct.unpack_from("<I", data, off)
        if length == 0:
            break
        spans.append((off, off + RECORD_HEADER_SIZE + length))
        off += RECORD_HEADER_SIZE + length
    return spans


def records_end(data):
    """Where the records of one segment's bytes end."""
    spans = record_offsets(data)
    return spans[-1][1] if spans else SEGMENT_HEADER_SIZE


def flip(file, offset):
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


# --------------------------------------------------------------------------- round trip


def test_round_trip_across_segments(tmp_path):
    records = payloads(200) + [b"B" * 500] + payloads(20)  # one bigger than a segment
    with Wal.open(tmp_path, segment_bytes_max=256) as wal:
        assert (wal.first_seq, wal.last_seq, wal.durable_seq) == (1, 0, 0)
        seqs = [wal.append(r) for r in records]
        assert seqs == list(range(1, len(records) + 1))
        assert wal.sync() == len(records) == wal.durable_seq
    files = segment_files(tmp_path)
    assert len(files) > 10
    assert files[0] == segment_name(1) == "00000000000000000001.wal"
    for name in files:
        with open(tmp_path / name, "rb") as f:
            header = f.read(SEGMENT_HEADER_SIZE)
        assert header == struct.pack("<8sIQ", SEGMENT_MAGIC, 1, int(name[:20]))

    with Wal.open(tmp_path, segment_bytes_max=256) as wal:
        replayed = list(wal.replay())
        assert replayed == list(enumerate(records, start=1))
        assert wal.warnings == [] and wal.recovered_seq == wal.last_seq == len(records)
        assert list(wal.replay(start_seq=150)) == replayed[149:]
        assert wal.append(b"next") == len(records) + 1
    assert read_wal(tmp_path)[0] == records + [b"next"]


def test_segments_respect_the_size_limit(tmp_path):
    write_wal(tmp_path, payloads(300, size=10), segment_bytes_max=300)
    for name in segment_files(tmp_path):
        data = (tmp_path / name).read_bytes()
        assert len(data) == 300  # preallocated
        assert records_end(data) <= 300 and not data[records_end(data):].strip(b"\0")


def test_append_many_matches_append(tmp_path):
    records = payloads(1000)
    with Wal.open(tmp_path / "a", segment_bytes_max=1000, buffer_bytes_max=3000) as wal:
        assert wal.append_many(records[:10]) == 10
        assert wal.append_many([]) == 10
        assert wal.append_many(iter(records[10:])) == 1000
    with Wal.open(tmp_path / "b", segment_bytes_max=1000, buffer_bytes_max=3000) as wal:
        for r in records:
            wal.append(r)
    for name in segment_files(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert segment_files(tmp_path / "a") == segment_files(tmp_path / "b")


def test_payload_types(tmp_path):
    with Wal.open(tmp_path) as wal:
        wal.append(bytearray(b"ba"))
        wal.append(memoryview(b"mv"))
        with pytest.raises(ValueError):
            wal.append(b"")  # empty records are refused: zeros must never parse
        with pytest.raises(ValueError):
            wal.append_many([b"ok", b""])
        with pytest.raises(TypeError):
            wal.append("str")
        with pytest.raises(TypeError):
            wal.append(5)
    assert read_wal(tmp_path)[0] == [b"ba", b"mv", b"ok"]


def test_flush_without_sync_reaches_the_file(tmp_path):
    with Wal.open(tmp_path, segment_bytes_max=4096) as wal:
        file = tmp_path / segment_name(1)
        wal.append(b"abc")
        assert records_end(file.read_bytes()) == SEGMENT_HEADER_SIZE  # buffered only
        wal.flush()
        data = file.read_bytes()
        assert records_end(data) == SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 3
        assert data[SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE:][:3] == b"abc"
        assert len(data) == 4096  # written over the preallocated zeros
        assert wal.durable_seq == 0
        assert wal.fsync_count == 0


def test_close_syncs_and_blocks_further_use(tmp_path):
    wal = Wal.open(tmp_path)
    wal.append(b"x")
    wal.close()
    wal.close()  # idempotent
    assert wal.durable_seq == 1
    with pytest.raises(ValueError):
        wal.append(b"y")
    assert read_wal(tmp_path)[0] == [b"x"]


def test_fsync_false_round_trips(tmp_path):
    records = payloads(500)
    with Wal.open(tmp_path, fsync=False, segment_bytes_max=512) as wal:
        for r in records:
            wal.append(r)
        assert wal.sync() == 500
        assert wal.fsync_count == 0
    assert read_wal(tmp_path, fsync=False)[0] == records


def test_a_wal_dir_has_one_opener(tmp_path):
    with Wal.open(tmp_path):
        with pytest.raises(StorageError, match="in use"):
            Wal.open(tmp_path)
    Wal.open(tmp_path).close()


def test_a_failed_write_makes_the_wal_unusable(tmp_path):
    wal = Wal.open(tmp_path)
    wal.append(b"durable")
    wal.sync()
    # Swap the segment's fd for a read-only one: the next write fails like EIO would.
    read_only = os.open(tmp_path / segment_name(1), os.O_RDONLY)
    os.close(wal._fd)
    wal._fd = read_only
    wal.append(b"lost")
    with pytest.raises(OSError):
        wal.flush()
    with pytest.raises(StorageError, match="unusable"):
        wal.append(b"more")
    with pytest.raises(StorageError):
        wal.sync()
    wal.close()  # does not try to write again
    assert read_wal(tmp_path)[0] == [b"durable"]


def test_append_and_sync_are_fast(tmp_path):
    record = b"r" * 100
    with Wal.open(tmp_path) as wal:
        start = time.perf_counter()
        for _ in range(100_000):
            wal.append(record)
        wal.sync()
        elapsed = time.perf_counter() - start
    # Typically ~0.1 s; the bound only catches per-record I/O or similar blunders.
    assert elapsed < 3.0


# ----------------------------------------------------------------------------- torn tails


def _cut_short_header(data, spans):
    return data[: spans[-1][0] + 3]


def _cut_short_payload(data, spans):
    return data[: spans[-1][1] - 5]


def _cut_only_header(data, spans):
    return data[: spans[-1][0] + RECORD_HEADER_SIZE]


def _crc_mismatch_at_eof(data, spans):
    b = bytearray(data)
    b[spans[-1][1] - 1] ^= 0xFF
    return bytes(b)


def _bad_crc_field_at_eof(data, spans):
    b = bytearray(data)
    b[spans[-1][0] + 5] ^= 0x01
    return bytes(b)


def _length_past_eof(data, spans):
    b = bytearray(data)
    struct.pack_into("<I", b, spans[-1][0], 1 << 30)
    return bytes(b)


def _zeroed_last_record(data, spans):
    start, end = spans[-1]
    return data[:start] + bytes(end - start)


def _trailing_zeros(data, spans):
    return data + bytes(4096)


def _partial_then_zeros(data, spans):
    return data[: spans[-1][0] + 5] + bytes(4096)


TORN = {
    "short_header": (_cut_short_header, 1),
    "short_payload": (_cut_short_payload, 1),
    "header_only": (_cut_only_header, 1),
    "crc_mismatch_at_eof": (_crc_mismatch_at_eof, 1),
    "bad_crc_field_at_eof": (_bad_crc_field_at_eof, 1),
    "length_past_eof": (_length_past_eof, 1),
    "zeroed_last_record": (_zeroed_last_record, 1),
    "trailing_zeros": (_trailing_zeros, 0),
    "partial_then_zeros": (_partial_then_zeros, 1),
}


@pytest.mark.parametrize("layout", ["preallocated", "legacy"])
@pytest.mark.parametrize("segment_bytes_max", [1 << 20, 400])
@pytest.mark.parametrize("kind", sorted(TORN))
def test_torn_tail_is_zeroed_and_appends_continue(tmp_path, kind, segment_bytes_max, layout):
    # "legacy": the segment ends where its bytes end, as written before preallocation.
    tear, lost = TORN[kind]
    records = payloads(60, size=4)
    write_wal(tmp_path, records, segment_bytes_max=segment_bytes_max)
    last = tmp_path / segment_files(tmp_path)[-1]
    data = last.read_bytes()
    size = len(data)
    data = data[: records_end(data)]
    spans = record_offsets(data)
    good_end = spans[-1][0] if lost else spans[-1][1]
    torn = tear(data, spans)
    if layout == "preallocated":
        torn += bytes(max(0, size - len(torn)))
    last.write_bytes(torn)
    torn_bytes = len(torn.rstrip(b"\0")) - good_end  # what must be zeroed

    with Wal.open(tmp_path, segment_bytes_max=segment_bytes_max) as wal:
        assert [p for _, p in wal.replay()] == records[: len(records) - lost]
        if torn_bytes > 0:
            assert len(wal.warnings) == 1
            assert (f"zeroed {torn_bytes} bytes of torn tail at offset {good_end}"
                    in wal.warnings[0] and last.name in wal.warnings[0])
        else:
            assert wal.warnings == []  # zeros after the records: unused space
        on_disk = last.read_bytes()
        assert on_disk[:good_end] == data[:good_end]
        assert not on_disk[good_end:].strip(b"\0")
        assert len(on_disk) == max(len(torn), segment_bytes_max)  # a legacy one: extended
        assert wal.append(b"after") == len(records) - lost + 1
    recovered, warnings = read_wal(tmp_path, segment_bytes_max=segment_bytes_max)
    assert recovered == records[: len(records) - lost] + [b"after"]
    assert warnings == []


@pytest.mark.parametrize("header", [b"", SEGMENT_MAGIC[:5], bytes(SEGMENT_HEADER_SIZE),
                                    SEGMENT_MAGIC + bytes(12)])
def test_torn_new_segment_header_is_reset(tmp_path, header):
    records = payloads(30)
    write_wal(tmp_path, records)
    # A rotation that crashed right after creating the next segment.
    (tmp_path / segment_name(31)).write_bytes(header + bytes(100))
    with Wal.open(tmp_path) as wal:
        assert [p for _, p in wal.replay()] == records
        assert len(wal.warnings) == 1 and "torn header" in wal.warnings[0]
        assert wal.append(b"x") == 31
    assert read_wal(tmp_path)[0] == records + [b"x"]
    assert segment_files(tmp_path) == [segment_name(1), segment_name(31)]


def test_torn_header_of_the_only_segment(tmp_path):
    (tmp_path / segment_name(1)).write_bytes(b"CYP")
    assert read_wal(tmp_path)[0] == []
    write_wal(tmp_path, [b"a"])
    assert read_wal(tmp_path) == ([b"a"], [])


# --------------------------------------------------------------------------- preallocation


def wait_for_spare(wal, timeout=10.0):
    """Wait until the Wal's spare (the next segment) is zero-filled and synced."""
    deadline = time.monotonic() + timeout
    while wal._spare is None or not wal._spare.ready():
        assert time.monotonic() < deadline, "the spare was never prepared"
        time.sleep(0.001)


def test_a_new_segment_is_zero_filled_to_its_size(tmp_path):
    seg = 256 << 10
    with Wal.open(tmp_path, segment_bytes_max=seg) as wal:
        file = tmp_path / segment_name(1)
        data = file.read_bytes()
        assert len(data) == seg
        assert data[:SEGMENT_HEADER_SIZE] == struct.pack("<8sIQ", SEGMENT_MAGIC, 1, 1)
        assert not data[SEGMENT_HEADER_SIZE:].strip(b"\0")
        # Really written, not a sparse file: appends need no block allocation.
        assert os.stat(file).st_blocks * 512 >= seg
        assert wal.prealloc_waits == 1  # the first segment of a new WAL is written at once
        records = payloads(100)
        wal.append_many(records)
        wal.sync()
        data = file.read_bytes()
        assert len(data) == seg and not data[records_end(data):].strip(b"\0")
    assert os.listdir(tmp_path) == [segment_name(1)]  # no spare left behind
    with Wal.open(tmp_path, segment_bytes_max=seg) as wal:
        assert [p for _, p in wal.replay()] == records and wal.warnings == []
        assert wal.append(b"next") == 101
    assert read_wal(tmp_path, segment_bytes_max=seg) == (records + [b"next"], [])
    assert os.path.getsize(tmp_path / segment_name(1)) == seg


def test_fsync_false_preallocates_sparsely(tmp_path):
    seg = 1 << 20
    with Wal.open(tmp_path, fsync=False, segment_bytes_max=seg) as wal:
        wal.append(b"a")
        wal.sync()
        data = (tmp_path / segment_name(1)).read_bytes()
        assert len(data) == seg and records_end(data) == SEGMENT_HEADER_SIZE + 9
        assert not data[records_end(data):].strip(b"\0")
        assert wal._spare is None and wal.prealloc_waits == 0
    assert read_wal(tmp_path, fsync=False, segment_bytes_max=seg) == ([b"a"], [])


def test_rotation_takes_the_spare_prepared_in_the_background(tmp_path):
    seg = 64 << 10
    big = b"b" * (seg // 2)
    with Wal.open(tmp_path, segment_bytes_max=seg) as wal:
        assert wal.prealloc_waits == 1
        assert not (tmp_path / SPARE_FILE).exists()  # not before the segment is half full
        wal.append(big)
        wal.flush()
        wait_for_spare(wal)
        spare = (tmp_path / SPARE_FILE).read_bytes()
        assert len(spare) == seg and not spare.strip(b"\0")
        wal.append(big)  # does not fit: rotates into the spare, without waiting
        assert wal.prealloc_waits == 1
        assert not (tmp_path / SPARE_FILE).exists()
        assert segment_files(tmp_path) == [segment_name(1), segment_name(2)]
        # No spare due before these rotations: each starts one at its flush and waits
        # for it unless it is done by the time the finished segment is fdatasynced.
        wal.append(b"x" * (seg - 100))
        wal.append(b"y" * (seg * 2))  # larger than a segment: one of its own, grown
        wal.append(b"z")
        wal.sync()
        assert 1 <= wal.prealloc_waits <= 4 and wal.prealloc_wait_seconds > 0
        files = segment_files(tmp_path)
        assert files == [segment_name(n) for n in (1, 2, 3, 4, 5)]
        sizes = [os.path.getsize(tmp_path / name) for name in files]
        grown = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 2 * seg
        assert sizes == [seg, seg, seg, grown, seg]
        for name in files:
            data = (tmp_path / name).read_bytes()
            assert data[:8] == SEGMENT_MAGIC and not data[records_end(data):].strip(b"\0")
    assert read_wal(tmp_path, segment_bytes_max=seg) == (
        [big, big, b"x" * (seg - 100), b"y" * (seg * 2), b"z"], [])


def test_a_segment_made_on_the_spot_counts_as_a_wait_even_if_its_thread_is_done(
        tmp_path, monkeypatch):
    # On a busy machine the spare's thread may finish before the rotation asks whether
    # it is ready; the rotation still had to wait for it.
    from cypaxos.storage import wal as wal_module

    ready = wal_module._Spare.ready

    def ready_once_written(spare):
        spare._thread.join()
        return ready(spare)

    monkeypatch.setattr(wal_module._Spare, "ready", ready_once_written)
    with Wal.open(tmp_path, segment_bytes_max=64 << 10) as wal:
        assert wal.prealloc_waits == 1 and wal.prealloc_wait_seconds > 0


def test_a_leftover_spare_is_removed(tmp_path):
    records = payloads(10)
    write_wal(tmp_path, records, segment_bytes_max=4096)
    (tmp_path / SPARE_FILE).write_bytes(b"half-written" * 100)  # a crash during its fill
    with Wal.open(tmp_path, segment_bytes_max=4096) as wal:
        assert not (tmp_path / SPARE_FILE).exists()
        assert [p for _, p in wal.replay()] == records and wal.warnings == []
        wal.append(b"x" * 3000)  # past half: a new spare is prepared
        wal.flush()
        wait_for_spare(wal)
        assert os.path.getsize(tmp_path / SPARE_FILE) == 4096
    assert not (tmp_path / SPARE_FILE).exists()  # close removes an unused spare
    assert read_wal(tmp_path, segment_bytes_max=4096) == (records + [b"x" * 3000], [])


def test_a_renamed_spare_whose_header_was_lost_is_reset(tmp_path):
    # A crash after the rename of the spare reached the disk, before its header did.
    seg = 8192
    records = payloads(30)
    write_wal(tmp_path, records, segment_bytes_max=seg)
    (tmp_path / segment_name(31)).write_bytes(bytes(seg))
    with Wal.open(tmp_path, segment_bytes_max=seg) as wal:
        assert [p for _, p in wal.replay()] == records
        assert len(wal.warnings) == 1 and "torn header" in wal.warnings[0]
        assert wal.append(b"x") == 31
    data = (tmp_path / segment_name(31)).read_bytes()
    assert len(data) == seg and data[:8] == SEGMENT_MAGIC
    assert read_wal(tmp_path, segment_bytes_max=seg) == (records + [b"x"], [])


def test_segments_written_before_preallocation_open_and_continue(tmp_path):
    records = payloads(60, size=4)
    write_wal(tmp_path, records, segment_bytes_max=400, preallocate=False)
    files = segment_files(tmp_path)
    assert len(files) >= 3
    for name in files:  # the old layout: a file ends at its last record
        data = (tmp_path / name).read_bytes()
        assert len(data) == records_end(data) <= 400
    last = tmp_path / files[-1]
    old_last = last.read_bytes()
    with Wal.open(tmp_path, segment_bytes_max=400) as wal:
        assert [p for _, p in wal.replay()] == records and wal.warnings == []
        # The last segment is extended with zeros; appends continue after its records.
        data = last.read_bytes()
        assert len(data) == 400 and data.startswith(old_last)
        wal.append(b"more")
        wal.sync()
        assert last.read_bytes()[len(old_last):][RECORD_HEADER_SIZE:][:4] == b"more"
    assert read_wal(tmp_path, segment_bytes_max=400) == (records + [b"more"], [])
    # And preallocate=False still writes the old layout.
    with Wal.open(tmp_path / "old", preallocate=False) as wal:
        wal.append(b"abc")
    assert os.path.getsize(tmp_path / "old" / segment_name(1)) == (
        SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 3)


def _record(payload):
    return struct.pack("<II", len(payload), google_crc32c.value(payload)) + payload


def test_torn_bytes_are_zeroed_before_shorter_appends(tmp_path):
    # A segment written before preallocation ends in a torn append: a bad record, then
    # the beginning of a valid record whose payload ends in zeros. Cut short by the end
    # of the file, that record is not valid: the tail is torn. Extending the segment
    # with zeros completes it, though, so torn bytes left behind the (shorter) records
    # appended next would make the log look corrupt: a valid record after a bad one.
    records = payloads(10, size=4)
    write_wal(tmp_path, records, preallocate=False)
    file = tmp_path / segment_name(1)
    good = file.read_bytes()
    hidden = _record(b"hidden" + bytes(64))
    garbage = struct.pack("<II", 500, 12345) + os.urandom(40) + hidden[:-64]
    file.write_bytes(good + garbage)
    appended = [b"x", b"y"]
    assert sum(map(len, map(_record, appended))) < len(garbage) - (len(hidden) - 64)

    # What the file would hold had the torn bytes been left in place:
    left = tmp_path / "left"
    left.mkdir()
    tail = b"".join(map(_record, appended))
    (left / segment_name(1)).write_bytes(good + tail + garbage[len(tail):] + bytes(100))
    with pytest.raises(WalCorruptError, match="followed by a valid record"):
        Wal.open(left)

    with Wal.open(tmp_path) as wal:
        assert [p for _, p in wal.replay()] == records
        assert len(wal.warnings) == 1
        assert f"zeroed {len(garbage)} bytes of torn tail at offset {len(good)}" in (
            wal.warnings[0])
        data = file.read_bytes()
        assert data[: len(good)] == good and not data[len(good):].strip(b"\0")
        for payload in appended:
            wal.append(payload)
    assert read_wal(tmp_path) == (records + appended, [])
    data = file.read_bytes()
    assert data[: len(good) + len(tail)] == good + tail
    assert not data[len(good) + len(tail):].strip(b"\0")


# ----------------------------------------------------------------------------- corruption


def _assert_corrupt(path, file, offset):
    before = {name: (path / name).read_bytes() for name in segment_files(path)}
    with pytest.raises(WalCorruptError) as info:
        Wal.open(path, segment_bytes_max=400)
    message = str(info.value)
    assert str(file) in message and f"offset {offset}" in message
    # Nothing was cut or rewritten.
    assert {name: (path / name).read_bytes() for name in segment_files(path)} == before


@pytest.mark.parametrize("where", ["payload", "crc", "length_low", "length_high"])
def test_flipped_byte_in_a_middle_record_raises(tmp_path, where):
    write_wal(tmp_path, payloads(40, size=3))
    file = tmp_path / segment_name(1)
    start, end = record_offsets(file.read_bytes())[20]
    offset = {"payload": end - 2, "crc": start + 6, "length_low": start,
              "length_high": start + 3}[where]
    flip(file, offset)
    _assert_corrupt(tmp_path, file, start)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_flipped_byte_in_a_non_last_segment_raises(tmp_path, which):
    write_wal(tmp_path, payloads(100, size=4), segment_bytes_max=400)
    files = segment_files(tmp_path)
    assert len(files) >= 3
    file = tmp_path / files[1]
    spans = record_offsets(file.read_bytes())
    start, end = {"first": spans[0], "middle": spans[len(spans) // 2],
                  "last": spans[-1]}[which]
    flip(file, end - 1)
    _assert_corrupt(tmp_path, file, start)


def test_truncated_non_last_segment_raises(tmp_path):
    write_wal(tmp_path, payloads(100, size=4), segment_bytes_max=400)
    file = tmp_path / segment_files(tmp_path)[1]
    spans = record_offsets(file.read_bytes())
    os.truncate(file, spans[-1][1] - 3)
    _assert_corrupt(tmp_path, file, spans[-1][0])


def test_bad_segment_header_raises(tmp_path):
    write_wal(tmp_path, payloads(100, size=4), segment_bytes_max=400)
    files = segment_files(tmp_path)
    for index in (0, len(files) - 1):  # a record follows, so even the last is not torn
        file = tmp_path / files[index]
        flip(file, 2)
        _assert_corrupt(tmp_path, file, 0)
        flip(file, 2)


def test_header_naming_another_seq_raises(tmp_path):
    write_wal(tmp_path, payloads(10))
    os.rename(tmp_path / segment_name(1), tmp_path / segment_name(2))
    _assert_corrupt(tmp_path, tmp_path / segment_name(2), 0)


def test_missing_middle_segment_raises(tmp_path):
    write_wal(tmp_path, payloads(100, size=4), segment_bytes_max=400)
    files = segment_files(tmp_path)
    os.unlink(tmp_path / files[1])
    with pytest.raises(WalCorruptError, match="missing or extra"):
        Wal.open(tmp_path, segment_bytes_max=400)


def test_odd_segment_name_raises(tmp_path):
    write_wal(tmp_path, [b"a"])
    (tmp_path / "1.wal").write_bytes(b"")
    with pytest.raises(WalCorruptError, match="segment file name"):
        Wal.open(tmp_path)


def test_garbage_after_a_torn_record_is_not_cut(tmp_path):
    # A bad record followed by a valid one is damage, even in the last segment.
    write_wal(tmp_path, payloads(10, size=4))
    file = tmp_path / segment_name(1)
    data = file.read_bytes()
    spans = record_offsets(data)
    start, end = spans[5]
    file.write_bytes(data[:start] + bytes(end - start) + data[end:])
    _assert_corrupt(tmp_path, file, start)


# ---------------------------------------------------------------------- truncate_before


def test_truncate_before_removes_only_whole_old_segments(tmp_path):
    records = payloads(100, size=4)
    with Wal.open(tmp_path, segment_bytes_max=400) as wal:
        wal.append_many(records)
        wal.sync()
        firsts = [int(name[:20]) for name in segment_files(tmp_path)]
        assert len(firsts) >= 4
        assert wal.truncate_before(firsts[1] - 1) == 0  # segment 0 holds firsts[1] - 1
        assert wal.truncate_before(firsts[1]) == 1
        assert wal.first_seq == firsts[1]
        assert wal.truncate_before(firsts[2] + 1) == 1  # segment 2 holds firsts[2]
        assert [int(n[:20]) for n in segment_files(tmp_path)] == firsts[2:]
        assert wal.truncate_before(10**9) == len(firsts) - 3  # never the current one
        assert segment_files(tmp_path) == [segment_name(firsts[-1])]
        assert wal.append(b"new") == 101
    with Wal.open(tmp_path, segment_bytes_max=400) as wal:
        assert wal.first_seq == firsts[-1]
        replayed = list(wal.replay())
        assert replayed == [(s, r) for s, r in enumerate(records + [b"new"], 1)
                            if s >= firsts[-1]]


# ------------------------------------------------------------------------------ data dir


def test_data_dir_created_and_reopened(tmp_path):
    path = tmp_path / "d" / "e"
    with open_data_dir(path, "abc", 2) as data_dir:
        assert (data_dir.cluster_id, data_dir.replica_id) == ("abc", 2)
        assert data_dir.wal_path == str(path / "wal")
        with data_dir.open_wal() as wal:
            wal.append(b"hello")
    assert json.loads((path / IDENTITY_FILE).read_text()) == {
        "format": 1, "cluster_id": "abc", "replica_id": 2}
    assert sorted(os.listdir(path)) == [IDENTITY_FILE, "wal"]
    with open_data_dir(path, "abc", 2, create=False) as data_dir:
        with data_dir.open_wal() as wal:
            assert list(wal.replay()) == [(1, b"hello")]


@pytest.mark.parametrize("cluster_id, replica_id", [("def", 2), ("abc", 1), ("def", 1)])
def test_data_dir_of_another_replica_raises(tmp_path, cluster_id, replica_id):
    open_data_dir(tmp_path, "abc", 2).close()
    with pytest.raises(DataDirError) as info:
        open_data_dir(tmp_path, cluster_id, replica_id)
    assert str(info.value) == (
        f"data dir {tmp_path} belongs to cluster 'abc' replica 2, "
        f"not cluster {cluster_id!r} replica {replica_id}")
    assert isinstance(info.value, StorageError) and isinstance(info.value, Error)


def test_foreign_dir_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataDirError, match="not a cypaxos data dir"):
        open_data_dir(tmp_path, "abc", 1)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_dir_with_a_nonempty_wal_but_no_identity_raises(tmp_path):
    write_wal(tmp_path / "wal", [b"x"])
    with pytest.raises(DataDirError, match="not a cypaxos data dir"):
        open_data_dir(tmp_path, "abc", 1)


def test_leftovers_of_an_interrupted_creation_are_fine(tmp_path):
    (tmp_path / "wal").mkdir()
    (tmp_path / (IDENTITY_FILE + ".tmp")).write_text("{")
    (tmp_path / "lost+found").mkdir()
    open_data_dir(tmp_path, "abc", 1).close()
    assert json.loads((tmp_path / IDENTITY_FILE).read_text())["cluster_id"] == "abc"
    assert sorted(os.listdir(tmp_path)) == [IDENTITY_FILE, "lost+found", "wal"]


def test_data_dir_errors(tmp_path):
    with pytest.raises(DataDirError, match="does not exist"):
        open_data_dir(tmp_path / "missing", "abc", 1, create=False)
    with pytest.raises(DataDirError, match="not initialized"):
        open_data_dir(tmp_path, "abc", 1, create=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataDirError, match="not a directory"):
        open_data_dir(tmp_path / "file", "abc", 1)
    with pytest.raises(ValueError):
        open_data_dir(tmp_path / "x", "", 1)
    with pytest.raises(ValueError):
        open_data_dir(tmp_path / "x", "abc", 0)

    good = tmp_path / "good"
    with open_data_dir(good, "abc", 1):
        with pytest.raises(DataDirError, match="in use"):
            open_data_dir(good, "abc", 1)
    (good / IDENTITY_FILE).write_text("not json")
    with pytest.raises(DataDirError, match="unreadable"):
        open_data_dir(good, "abc", 1)
    (good / IDENTITY_FILE).write_text('{"format": 2, "cluster_id": "abc", "replica_id": 1}')
    with pytest.raises(DataDirError, match="format 2"):
        open_data_dir(good, "abc", 1)
    (good / IDENTITY_FILE).write_text('{"format": 1, "cluster_id": "abc", "replica_id": 1}')
    os.rmdir(good / "wal")
    with pytest.raises(DataDirError, match="no wal/"):
        open_data_dir(good, "abc", 1)


# ------------------------------------------------------------------------ group commit
# Through the replica's Trio adapter (cypaxos.replica.walsync): the Wal itself has no
# event loop.


async def test_concurrent_sync_async_callers_coalesce(tmp_path):
    wal = Wal.open(tmp_path)
    sync = WalSync(wal)
    results = {}

    async def writer(i):
        seq = wal.append(b"w%d" % i)
        results[i] = (seq, await sync.sync_async())

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(writer, i)
    # The first caller's fsync runs alone; the 49 that arrive meanwhile share one.
    assert wal.fsync_count == 2
    assert all(durable >= seq for seq, durable in results.values())
    assert wal.durable_seq == 50
    sync.close()
    assert sorted(read_wal(tmp_path)[0]) == sorted(b"w%d" % i for i in range(50))


async def test_sync_async_with_nothing_new_does_not_fsync(tmp_path):
    with Wal.open(tmp_path) as wal:
        sync = WalSync(wal)
        assert await sync.sync_async() == 0
        wal.append(b"a")
        assert await sync.sync_async() == 1
        assert await sync.sync_async() == 1
        assert wal.fsync_count == 1


async def test_sync_async_fsync_false(tmp_path):
    with Wal.open(tmp_path, fsync=False) as wal:
        wal.append(b"a")
        assert await WalSync(wal).sync_async() == 1
        assert wal.fsync_count == 0
    assert read_wal(tmp_path)[0] == [b"a"]


async def test_sync_async_under_rotation_and_concurrency(tmp_path):
    wal = Wal.open(tmp_path, segment_bytes_max=300)
    sync = WalSync(wal)

    async def writer(i):
        for j in range(40):
            seq = wal.append(b"%d-%d" % (i, j))
            if j % 3 == 0:
                assert await sync.sync_async() >= seq
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(writer, i)
    assert wal.durable_seq == wal.last_seq == 8 * 40  # each writer ends with a sync
    sync.close()
    assert len(segment_files(tmp_path)) > 5
    recovered, warnings = read_wal(tmp_path, segment_bytes_max=300)
    assert warnings == []
    expected = [b"%d-%d" % (i, j) for i in range(8) for j in range(40)]
    assert sorted(recovered) == sorted(expected)


async def test_cancelled_caller_leaves_a_consistent_state(tmp_path):
    wal = Wal.open(tmp_path)
    sync = WalSync(wal)
    async with trio.open_nursery() as nursery:
        wal.append(b"a")
        nursery.start_soon(sync.sync_async)
        await trio.testing.wait_all_tasks_blocked()  # its fsync is in a thread, or done
        wal.append(b"b")
        with trio.CancelScope() as scope:
            scope.cancel()
            await sync.sync_async()  # cancelled while waiting, or before its own fsync
        assert scope.cancelled_caught
    assert wal.durable_seq >= 1
    assert await sync.sync_async() == 2
    sync.close()
    assert read_wal(tmp_path)[0] == [b"a", b"b"]


# ------------------------------------------------------------------------------ hypothesis


def _layout(path):
    """Segments in order as (name, size, [global end of each record])."""
    out, base = [], 0
    for name in segment_files(path):
        data = (path / name).read_bytes()
        out.append((name, base, len(data), [base + end for _, end in record_offsets(data)]))
        base += len(data)
    return out, base


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.binary(min_size=1, max_size=60), st.booleans()), max_size=40),
    segment_bytes_max=st.sampled_from([40, 120, 1 << 20]),
    zero_fill=st.booleans(),
    data=st.data(),
)
def test_crash_at_any_byte_recovers_a_prefix(tmp_path, ops, segment_bytes_max, zero_fill,
                                             data):
    path = Path(tempfile.mkdtemp(dir=tmp_path))
    appended, synced = [], 0
    with Wal.open(path, segment_bytes_max=segment_bytes_max) as wal:
        for payload, sync in ops:
            wal.append(payload)
            appended.append(payload)
            if sync:
                synced = wal.sync()
                assert synced == len(appended)
    layout, total = _layout(path)
    ends = [end for *_, segment_ends in layout for end in segment_ends]
    synced_end = ends[synced - 1] if synced else 0

    # Crash "earlier": the log is cut at global byte `cut`; the segment holding it
    # becomes the last one (optionally with its lost bytes read back as zeros).
    cut = data.draw(st.integers(0, total), label="cut")
    blob = b"".join((path / name).read_bytes() for name, *_ in layout)
    for name, base, size, _ in layout:
        if base + size <= cut and base + size != total:
            continue
        if base >= cut and base > 0:
            os.unlink(path / name)
            continue
        os.truncate(path / name, cut - base)
        if zero_fill:
            with open(path / name, "ab") as f:
                f.write(bytes(size - (cut - base)))

    with Wal.open(path, segment_bytes_max=segment_bytes_max) as wal:
        recovered = [p for _, p in wal.replay()]
        expected_count = sum(1 for end in ends if end <= cut)
        if zero_fill and expected_count < len(ends):
            # The record the cut tears is whole again if every byte it lost was a zero
            # (a payload ending in zeros): zero-filled, it reads back as written.
            end = ends[expected_count]
            same_segment = any(base <= cut < end <= base + size for _, base, size, _ in layout)
            if same_segment and not any(blob[cut:end]):
                expected_count += 1
        assert recovered == appended[:expected_count]
        if cut >= synced_end:
            assert len(recovered) >= synced
        wal.append(b"after")
    assert read_wal(path, segment_bytes_max=segment_bytes_max) == (
        appended[:expected_count] + [b"after"], [])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=30),
    segment_bytes_max=st.sampled_from([60, 200, 1 << 20]),
    mask=st.integers(1, 255),
    data=st.data(),
)
def test_a_flipped_byte_is_caught_or_only_the_last_record_is_lost(
        tmp_path, records, segment_bytes_max, mask, data):
    path = Path(tempfile.mkdtemp(dir=tmp_path))
    write_wal(path, records, segment_bytes_max=segment_bytes_max)
    layout, total = _layout(path)
    offset = data.draw(st.integers(0, total - 1), label="offset")
    name, base, size, ends = next(s for s in layout if s[1] <= offset < s[1] + s[2])
    with open(path / name, "r+b") as f:
        f.seek(offset - base)
        byte = f.read(1)[0]
        f.seek(offset - base)
        f.write(bytes([byte ^ mask]))
    in_last_record = name == layout[-1][0] and ends and offset >= (
        ends[-2] if len(ends) > 1 else base + SEGMENT_HEADER_SIZE)
    # Past the records: the zero-filled rest of a preallocated segment.
    unused = offset >= (ends[-1] if ends else base + SEGMENT_HEADER_SIZE)
    try:
        recovered, warnings = read_wal(path, segment_bytes_max=segment_bytes_max)
    except WalCorruptError:
        event("corruption reported")
        assert not (unused and name == layout[-1][0])
        return
    if unused:
        event("garbage in the unused space zeroed")
        assert name == layout[-1][0]  # in any other segment it is reported
        assert recovered == records and len(warnings) == 1
        return
    event("torn tail cut")
    # Only damage confined to the very end may be taken for a torn tail.
    assert in_last_record or (name == layout[-1][0] and not ends)
    assert recovered == records[: len(records) - (1 if ends else 0)]
    assert len(warnings) == 1


# ------------------------------------------------------------- what counts as the tail


def _spans_of(file):
    return record_offsets(file.read_bytes())


def test_damage_then_a_torn_record_is_reported(tmp_path):
    # Two faults: a damaged middle record, then a crash in the middle of an append.
    write_wal(tmp_path, payloads(20, size=5))
    file = tmp_path / segment_name(1)
    spans = _spans_of(file)
    flip(file, spans[8][0] + 10)
    os.truncate(file, spans[-1][1] - 4)
    _assert_corrupt(tmp_path, file, spans[8][0])


def test_damage_then_records_then_trailing_zeros_is_reported(tmp_path):
    write_wal(tmp_path, payloads(20, size=5))
    file = tmp_path / segment_name(1)
    spans = _spans_of(file)
    flip(file, spans[3][0] + 1)  # the length field: the record's end is lost too
    with open(file, "ab") as f:
        f.write(bytes(8192))
    _assert_corrupt(tmp_path, file, spans[3][0])


def test_a_large_damaged_record_followed_by_intact_ones_is_reported(tmp_path):
    big = os.urandom(3 << 20)
    write_wal(tmp_path, [b"a", big, b"b", b"c"])
    file = tmp_path / segment_name(1)
    spans = _spans_of(file)
    flip(file, spans[1][0] + 3)  # the high byte of the big record's length
    _assert_corrupt(tmp_path, file, spans[1][0])


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_a_large_torn_record_is_cut_quickly(tmp_path, how):
    # In a 64 MiB preallocated segment: the end of an 8 MiB record never reached the
    # disk (its last bytes read as zeros), or (a segment written before preallocation)
    # the file ends early.
    write_wal(tmp_path, [b"a", os.urandom(8 << 20)])
    file = tmp_path / segment_name(1)
    end = records_end(file.read_bytes())
    if how == "zeroed":
        with open(file, "r+b") as f:
            f.seek(end - 1000)
            f.write(bytes(1000))
    else:
        os.truncate(file, end - 1000)
    start = time.perf_counter()
    recovered, warnings = read_wal(tmp_path)
    assert recovered == [b"a"] and len(warnings) == 1
    assert time.perf_counter() - start < 5.0  # ~0.1 s; guards against a cubic search


def test_a_lost_page_before_written_ones_fails_stop(tmp_path):
    # After a power cut an earlier page of an unsynced append may be missing while a
    # later one made it: documented as reported, not guessed at.
    write_wal(tmp_path, payloads(400, size=6))
    file = tmp_path / segment_name(1)
    data = bytearray(file.read_bytes())
    data[4096:8192] = bytes(4096)
    file.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="followed by a valid record"):
        Wal.open(tmp_path)


# ------------------------------------------------------------------ the fsync thread


async def test_fsync_thread_reports_success_and_errno(tmp_path):
    from cypaxos.fsyncthread import FsyncThread
    thread = FsyncThread()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    read_end, write_end = os.pipe()
    try:
        assert thread.take() == -1 and not thread.busy   # nothing submitted
        os.write(fd, b"x")
        thread.submit(fd, os.open(tmp_path, os.O_RDONLY))
        assert thread.busy
        with pytest.raises(RuntimeError):
            thread.submit(fd)                           # one job at a time
        await trio.lowlevel.wait_readable(thread.fileno())
        assert thread.take() is None and not thread.busy
        thread.submit(read_end)                         # fdatasync of a pipe: EINVAL
        await trio.lowlevel.wait_readable(thread.fileno())
        with pytest.raises(OSError):
            thread.take()
    finally:
        thread.close()
        thread.close()                                  # idempotent
        for n in (fd, read_end, write_end):
            os.close(n)
    with pytest.raises(ValueError):
        thread.fileno()


async def test_failed_fsync_makes_the_wal_unusable(tmp_path, monkeypatch):
    import cypaxos.storage.wal as wal_module
    from cypaxos.fsyncthread import FsyncThread
    read_end, write_end = os.pipe()

    class FailingFsync(FsyncThread):
        def submit(self, fd, dir_fd=-1):
            super().submit(read_end, -1)                # fails like a dying disk would

    monkeypatch.setattr(wal_module, "FsyncThread", FailingFsync)
    wal = Wal.open(tmp_path)
    sync = WalSync(wal)
    failures = []
    sync.on_sync = failures.append
    wal.append(b"a")
    with pytest.raises((OSError, StorageError)):
        await sync.sync_async()
    assert wal.durable_seq == 0 and len(failures) == 1 and isinstance(failures[0], OSError)
    with pytest.raises(StorageError):
        wal.append(b"b")
    wal.close()
    os.close(read_end)
    os.close(write_end)
