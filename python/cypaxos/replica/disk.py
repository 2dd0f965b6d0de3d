"""The server's `Storage` for a `ReplicaNode`: the WAL and the snapshot files of a
data dir, with the blocking parts off the event loop.

* Records are CBOR-encoded here (`cypaxos.cborenc`) and appended to the `Wal`.
* `start_sync` hands an fdatasync to the WAL's native fsync thread (`WalSync`); its
  end calls the node's `on_sync_done` in the Trio thread.  `sync` fsyncs inline.
* Snapshot file reads and writes, and the incoming files of snapshot transfers, run
  in worker threads (`trio.to_thread`); their ends call the node's completion methods
  in the Trio thread.  Incoming writes from one peer are sequential (the node never
  starts a second before the first ended).
"""
from __future__ import annotations

import time
from typing import Optional

import cbor2
import trio

from ..cbordec import FALLBACK as CBOR_FALLBACK
from ..cbordec import decode as cbor_decode
from ..cborenc import dumps as cbor_dumps
from ..errors import WalCorruptError
from ..storage.snapshots import SnapshotStore
from ..storage.wal import Wal
from .counters import FSYNC_BUCKETS_S, SNAPSHOT_BUCKETS_S, Histogram
from .walsync import WalSync

__all__ = ["DiskStorage", "replayed_records"]


def replayed_records(wal: Wal):
    """The WAL's records decoded to the core's tuples, in order."""
    for seq, payload in wal.replay():
        record = cbor_decode(payload)
        if record is not CBOR_FALLBACK:
            yield record
            continue
        try:
            yield cbor2.loads(payload)
        except Exception as exc:
            raise WalCorruptError(f"WAL record {seq} passed its checksum but does not "
                                  f"decode: {exc}") from None


class DiskStorage:
    """`cypaxos.replica.node.Storage` over a `Wal` and a `SnapshotStore`.

    Set `node` (the completions' receiver) and, before any snapshot operation, the
    `nursery` its worker-thread tasks run in.
    """

    def __init__(self, wal: Wal, snapshot_store: SnapshotStore) -> None:
        self.wal = wal
        self.snapshot_store = snapshot_store
        #: Every fsync's duration, inline (`sync`) or in the fsync thread.
        self.fsync_seconds = Histogram(FSYNC_BUCKETS_S)
        #: How long writing (and syncing) each snapshot file took, in a worker thread.
        self.snapshot_seconds = Histogram(SNAPSHOT_BUCKETS_S)
        self.snapshot_bytes = 0   #: the size of the newest snapshot file written
        self.wal_sync = WalSync(wal, self.fsync_seconds)
        self.node = None
        self.nursery: Optional[trio.Nursery] = None
        # The WAL's own methods, without a layer in between on the hot path.
        self.start_sync = self.wal_sync.start_sync
        self.truncate_before = wal.truncate_before

    def attach(self, node) -> None:
        """Report completions to `node`."""
        self.node = node
        self.wal_sync.on_sync = node.on_sync_done

    @property
    def first_seq(self) -> int:
        return self.wal.first_seq

    @property
    def last_seq(self) -> int:
        return self.wal.last_seq

    @property
    def durable_seq(self) -> int:
        return self.wal.durable_seq

    @property
    def sync_in_flight(self) -> bool:
        return self.wal.sync_in_flight

    def sync(self) -> None:
        """Sync inline (a follower's), timing the fsync if there was one to do."""
        wal = self.wal
        before = wal.fsync_count
        started = time.monotonic()
        wal.sync()
        if wal.fsync_count != before:
            self.fsync_seconds.observe(time.monotonic() - started)

    def append(self, records: list) -> int:
        payloads = [cbor_dumps(r) for r in records]
        self.wal.append_many(payloads)
        return sum(map(len, payloads))

    # -- snapshot files, in worker threads

    def _run(self, work, done) -> None:
        async def task():
            try:
                result = await trio.to_thread.run_sync(work)
            except Exception as exc:   # OSError, or a damaged file
                done(None, exc)
            else:
                done(result, None)
        self.nursery.start_soon(task)

    def write_snapshot(self, index: int, data: list) -> None:
        def write():
            started = time.monotonic()
            self.snapshot_store.write(index, data)
            return time.monotonic() - started, sum(map(len, data))

        def done(result, error):
            if error is None:
                self.snapshot_seconds.observe(result[0])
                self.snapshot_bytes = result[1]
            self.node.on_snapshot_written(index, error)
        self._run(write, done)

    def read_snapshot(self, index: int) -> None:
        self._run(lambda: self.snapshot_store.read(index),
                  lambda data, error: self.node.on_snapshot_read(index, data, error))

    def write_incoming(self, peer: int, offset: int, data: bytes) -> None:
        self._run(lambda: self.snapshot_store.write_incoming(peer, offset, data),
                  lambda _, error: self.node.on_incoming_written(peer, error))

    def read_incoming(self, peer: int) -> None:
        self._run(lambda: self.snapshot_store.read_incoming(peer),
                  lambda data, error: self.node.on_incoming_read(peer, data, error))

    def discard_incoming(self, peer: int) -> None:
        self.snapshot_store.discard_incoming(peer)

    def close(self) -> None:
        """Flush and sync the WAL, close it."""
        self.wal_sync.close()
