"""Latency of one durable WAL append when several processes sync at once.

N processes (default 3, like the replicas of a local cluster) each open their own
`cypaxos.storage.wal.Wal` in one directory tree and, in a loop for a few seconds, append one
~100-byte record and make it durable, timing each sync.  Two WAL modes are measured,
alternating round by round (a shared machine drifts):

* ``preallocated``: the default, segments zero-filled to their full size before use,
  so an fdatasync writes data blocks only;
* ``growing``: ``Wal.open(preallocate=False)``, segments that grow with every append
  (the format before preallocation), so every fdatasync also writes the inode (and,
  on a journaling ext4, commits the journal).

``--api sync`` (default) times ``Wal.sync()`` (flush + fdatasync in the calling
thread); ``--api async`` times ``await WalSync.sync_async()`` in a Trio run, which goes
through ``start_sync`` and the native fsync thread, as the server does.

``--fill-methods`` measures, without the Wal, what the claim behind preallocation
rests on: the same append + fdatasync loop on files whose space was prepared in
different ways (``zeros`` written and fsynced, ``fallocate``, a sparse ``ftruncate``,
or nothing: ``grow``), with the disk's write requests per sync from
/sys/dev/block/*/stat (other processes' I/O is counted too; on an otherwise idle disk a
pure data write + flush shows as ~2).  ``--record-bytes 4096`` makes every sync write
a new block, which shows the cost of a first write into fallocated (unwritten) or
sparse space.

    PYTHONPATH=python python perf/wal_sync_latency.py
    PYTHONPATH=python python perf/wal_sync_latency.py --api async --rounds 3
    PYTHONPATH=python python perf/wal_sync_latency.py --fill-methods --processes 1

The files go to a temporary directory under --dir (default: the current directory, so
that the disk measured is the one the data dirs would use) and are removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from array import array

WAL_MODES = ("preallocated", "growing")
FILL_METHODS = ("zeros", "fallocate", "sparse", "grow")


def percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    if not samples:
        return {"n": 0}

    def at(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6

    return {"n": len(samples), "mean_us": round(statistics.fmean(samples) * 1e6, 1),
            "p50_us": round(at(0.50), 1), "p90_us": round(at(0.90), 1),
            "p99_us": round(at(0.99), 1), "p999_us": round(at(0.999), 1)}


def disk_stat_path(path: str) -> str | None:
    """The /sys stat file of the block device holding ``path`` (or its whole disk)."""
    dev = os.stat(path).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for candidate in (f"{base}/stat", f"{base}/../stat"):
        if os.path.exists(candidate):
            return candidate
    return None


def disk_writes(stat_path: str | None) -> int | None:
    if stat_path is None:
        return None
    with open(stat_path) as f:
        return int(f.read().split()[4])  # write requests completed


# ------------------------------------------------------------------ through the Wal


def wal_worker(path, mode, api, seconds, record_bytes, segment_bytes, ready, start, out):
    from cypaxos.storage.wal import Wal
    wal = Wal.open(path, segment_bytes_max=segment_bytes,
                   preallocate=(mode == "preallocated"))
    waits_at_open = wal.prealloc_waits  # a new WAL writes its first segment at open
    record = os.urandom(record_bytes)
    lat = array("d")
    ready.wait()
    start.wait()
    if api == "sync":
        deadline = time.monotonic() + seconds
        perf = time.perf_counter
        while time.monotonic() < deadline:
            wal.append(record)
            t0 = perf()
            wal.sync()
            lat.append(perf() - t0)
    else:
        import trio

        from cypaxos.replica.walsync import WalSync
        syncer = WalSync(wal)

        async def run():
            deadline = time.monotonic() + seconds
            perf = time.perf_counter
            while time.monotonic() < deadline:
                wal.append(record)
                t0 = perf()
                await syncer.sync_async()
                lat.append(perf() - t0)
        trio.run(run)
    waits = (wal.prealloc_waits - waits_at_open, wal.prealloc_wait_seconds)
    wal.close()
    out.put((lat.tobytes(), waits))


# ------------------------------------------------------------------ raw fill methods


def prepare_file(path: str, method: str, size: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    if method == "zeros":
        chunk = bytes(1 << 20)
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
    elif method == "fallocate":
        os.posix_fallocate(fd, 0, size)
    elif method == "sparse":
        os.ftruncate(fd, size)
    os.fsync(fd)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    return fd


def raw_worker(path, method, api, seconds, record_bytes, segment_bytes, ready, start, out):
    fd = prepare_file(path, method, segment_bytes)
    record = os.urandom(record_bytes)
    lat = array("d")
    off = 0
    ready.wait()
    start.wait()
    deadline = time.monotonic() + seconds
    perf = time.perf_counter
    while time.monotonic() < deadline and off + record_bytes <= segment_bytes:
        os.pwrite(fd, record, off)
        off += record_bytes
        t0 = perf()
        os.fdatasync(fd)
        lat.append(perf() - t0)
    os.close(fd)
    out.put((lat.tobytes(), None))


# ------------------------------------------------------------------------- driver


def run_round(worker, mode: str, args, root: str) -> dict:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(args.processes + 1)
    start = ctx.Event()
    out = ctx.Queue()
    work = tempfile.mkdtemp(prefix=f"{mode}-", dir=root)
    procs = [ctx.Process(target=worker, args=(os.path.join(work, f"p{i}"), mode, args.api,
                                             args.seconds, args.record_bytes,
                                             args.segment_bytes, ready, start, out))
             for i in range(args.processes)]
    for p in procs:
        p.start()
    ready.wait()  # every file prepared (the Wal's first segment is written at open)
    time.sleep(0.3)
    stat_path = disk_stat_path(work)
    writes0 = disk_writes(stat_path)
    start.set()
    lat, waits = [], []
    for _ in procs:
        raw, w = out.get()
        lat.extend(array("d", raw))
        if w is not None:
            waits.append(w)
    writes1 = disk_writes(stat_path)
    for p in procs:
        p.join()
    shutil.rmtree(work)
    result = {"mode": mode, **percentiles(lat), "syncs_per_s": round(len(lat) / args.seconds)}
    if writes0 is not None and lat:
        result["disk_writes_per_sync"] = round((writes1 - writes0) / len(lat), 2)
    if waits:
        result["prealloc_waits"] = sum(w for w, _ in waits)
    result["_samples"] = lat
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record-bytes", type=int, default=100)
    parser.add_argument("--segment-bytes", type=int, default=8 << 20,
                        help="segment size (the server's default: 8 MiB)")
    parser.add_argument("--api", choices=("sync", "async"), default="sync")
    parser.add_argument("--fill-methods", action="store_true",
                        help="raw append+fdatasync on files prepared in different ways")
    parser.add_argument("--modes", help="comma-separated subset of the modes or methods")
    parser.add_argument("--dir", default=".", help="where the temporary files go")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    worker, modes = (raw_worker, FILL_METHODS) if args.fill_methods else (wal_worker, WAL_MODES)
    if args.modes:
        modes = tuple(args.modes.split(","))
    root = tempfile.mkdtemp(prefix="wal-sync-latency-", dir=args.dir)
    rounds, pooled = [], {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            for mode in modes:
                result = run_round(worker, mode, args, root)
                pooled[mode].extend(result.pop("_samples"))
                result["round"] = r + 1
                rounds.append(result)
                if not args.json:
                    print(format_row(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {m: percentiles(s) for m, s in pooled.items()}
    report = {"processes": args.processes, "seconds": args.seconds,
              "record_bytes": args.record_bytes, "segment_bytes": args.segment_bytes,
              "api": None if args.fill_methods else args.api,
              "fill_methods": args.fill_methods, "rounds": rounds, "pooled": summary}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("pooled over rounds:")
        for mode, stats in summary.items():
            print(format_row({"mode": mode, **stats}))
    return 0


def format_row(r: dict) -> str:
    if not r.get("n"):
        return f"{r['mode']:<13} no samples"
    extra = ""
    if "disk_writes_per_sync" in r:
        extra += f" disk writes/sync {r['disk_writes_per_sync']:.2f}"
    if "prealloc_waits" in r:
        extra += f" prealloc waits {r['prealloc_waits']}"
    head = f"round {r['round']} " if "round" in r else "        "
    return (f"{head}{r['mode']:<13} n={r['n']:>6} mean {r['mean_us']:7.1f} us  "
            f"p50 {r['p50_us']:7.1f}  p90 {r['p90_us']:7.1f}  p99 {r['p99_us']:7.1f}  "
            f"p99.9 {r['p999_us']:7.1f} us{extra}")


if __name__ == "__main__":
    sys.exit(main())
