"""The snapshot transfer's state machines on their own (`cypaxos.replica.transfer`).

The end-to-end transfer runs in the transcripts (tests/testdata/snapshot_transfer*.txt),
under the simulator and through the server's disk (tests/test_snapshots.py).
"""
import pytest

from cypaxos.replica.transfer import (
    Ack, Chunk, SnapshotReceiver, SnapshotSender, TransferError, Verify, Write,
)

pytestmark = pytest.mark.fast

DATA = bytes(range(256)) * 4   # a 1,024-byte "file"


def sender(**kw):
    kw.setdefault("chunk_bytes", 300)
    kw.setdefault("ack_timeout_ticks", 3)
    kw.setdefault("tries", 4)
    return SnapshotSender(40, DATA, **kw)


def test_sender_streams_one_acknowledged_chunk_at_a_time():
    s = sender()
    assert s.chunk() == Chunk(40, 0, 1024, DATA[:300])
    assert s.on_ack(40, 300) == Chunk(40, 300, 1024, DATA[300:600])
    assert s.on_ack(40, 300) is None          # a duplicate of the last ack
    assert s.on_ack(39, 600) is None          # another transfer's ack
    assert s.on_ack(40, 600).offset == 600
    assert s.on_ack(40, 900) == Chunk(40, 900, 1024, DATA[900:])
    assert s.on_ack(40, 1024) is None and s.done and s.finished


def test_sender_resends_after_a_timeout_and_gives_up_after_tries():
    s = sender()
    s.chunk()
    assert [s.on_tick(), s.on_tick()] == [None, None]
    assert s.on_tick() == Chunk(40, 0, 1024, DATA[:300])     # 3 ticks: again
    for _ in range(3 * 3):   # misses 2, 3 and 4 (tries)
        s.on_tick()
    assert s.failed and not s.done and s.on_tick() is None


def test_sender_resumes_from_the_ack_and_restarts_from_zero():
    s = sender()
    s.chunk()
    s.on_ack(40, 300)
    s.on_ack(40, 600)
    assert s.on_ack(40, 300) is None          # stale, overtaken by a later one
    assert s.on_ack(40, 0) == Chunk(40, 0, 1024, DATA[:300])   # the receiver restarted
    assert s.restarts == 1
    for _ in range(3):
        s.on_ack(40, 300)
        s.on_ack(40, 0)
    assert s.failed                           # too many restarts


def test_receiver_writes_then_acks_what_it_holds():
    r = SnapshotReceiver(total_bytes_max=10_000)
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) == Write(0, DATA[:300])
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) is None   # write in flight
    assert r.on_written() == Ack(40, 300)
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) == Ack(40, 300)   # duplicate
    assert r.on_chunk(40, 600, 1024, DATA[600:900], needed=True) == Ack(40, 300)  # a gap
    assert r.on_chunk(40, 300, 1024, DATA[300:1024], needed=True) == Write(300, DATA[300:])
    assert r.on_written() == Verify(40, 1024)
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) is None   # verifying
    assert r.on_verified(False) == Ack(40, 0) and not r.active
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) == Write(0, DATA[:300])


def test_receiver_restarts_for_a_newer_snapshot_and_stops_older_or_unneeded_ones():
    r = SnapshotReceiver(total_bytes_max=10_000)
    r.on_chunk(40, 0, 1024, DATA[:300], needed=True)
    r.on_written()
    assert r.on_chunk(45, 300, 900, DATA[:300], needed=True) == Ack(45, 0)   # start over
    assert r.on_chunk(45, 0, 900, DATA[:300], needed=True) == Write(0, DATA[:300])
    r.on_written()
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) == Ack(40, 1024)  # older: stop
    assert r.on_chunk(45, 300, 900, DATA[:300], needed=False) == Ack(45, 900)  # no longer needed
    assert not r.active


def test_receiver_refuses_oversized_and_bounds_chunks():
    r = SnapshotReceiver(total_bytes_max=1000)
    assert r.on_chunk(40, 0, 1024, DATA[:300], needed=True) == Ack(40, 1024)
    assert not r.active
    r = SnapshotReceiver(total_bytes_max=10_000)
    r.on_chunk(40, 0, 400, DATA[:300], needed=True)
    r.on_written()
    with pytest.raises(TransferError):
        r.on_chunk(40, 300, 400, DATA[:300], needed=True)
