"""Write-ahead log throughput: records appended and made durable with group commit.

Each benchmark appends ACCEPT records the size a replica writes for one 64-byte put
(the CBOR record tuple of a one-command client batch, ~120 bytes) to a `cypaxos.storage.wal.Wal`
in a fresh temporary directory on the real disk (``$TMPDIR``, else /tmp; set
``CYPAXOS_BENCH_DIR`` to choose), and calls ``Wal.sync()`` (flush + fdatasync) once every
N records: N = 1 is one fsync per record, N = 64 and 1024 are what group commit does
under load.  pyperf's loop count counts records, so each value is the time per durable
record.  ``wal_append_nosync`` appends and flushes with ``fsync=False`` (the CPU cost of
encoding and writing alone).

    python perf/bench_storage.py -o storage.json   # add --fast for a quick look
    python -m pyperf compare_to old.json storage.json

Results depend on the disk and on what else uses it: run it on an idle machine.
"""
import os
import shutil
import tempfile
import time

import cbor2
import pyperf

from cypaxos import commands
from cypaxos.storage.wal import Wal

GROUPS = (1, 64, 1024)


def record(slot):
    batch = commands.pack_client_batch(42, slot, slot - 1,
                                       [commands.encode_put(b"k%015d" % slot, bytes(64))])
    return cbor2.dumps((2, slot, (3 << 16) | 1, [batch]))


RECORDS = [record(s) for s in range(1, 1025)]


def wal_bench(group, fsync=True):
    def run(loops):
        base = os.environ.get("CYPAXOS_BENCH_DIR") or None
        path = tempfile.mkdtemp(prefix="cypaxos-bench-wal-", dir=base)
        try:
            wal = Wal.open(os.path.join(path, "wal"), fsync=fsync)
            records = RECORDS
            n = len(records)
            started = time.perf_counter()
            done = 0
            while done < loops:
                k = min(group, loops - done)
                wal.append_many([records[(done + j) % n] for j in range(k)])
                wal.sync()
                done += k
            elapsed = time.perf_counter() - started
            wal.close()
            return elapsed
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return run


def main():
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    runner.metadata["record_bytes"] = str(len(RECORDS[0]))
    for group in GROUPS:
        runner.bench_time_func(f"wal_sync_every_{group}", wal_bench(group))
    runner.bench_time_func("wal_append_nosync", wal_bench(1024, fsync=False))


if __name__ == "__main__":
    main()
