"""The ordered, revisioned store through the Trio client, against a local 3-replica
cluster: full range scans (keys/s) and transactions (txn/s).

    python perf/bench_coord.py                  # starts its own cluster (fsync always)
    python perf/bench_coord.py --fsync off --keys 200000 --seconds 5
    python perf/bench_coord.py --cluster 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003

Prints one JSON object:

* `range`: `--keys` keys of `--value-bytes` bytes under one prefix, scanned whole by
  `kv.range(prefix=...)` `--scans` times (the store answers at most 1 MiB a reply, so
  a scan is several pages, continued by the client at one revision): the best and
  median keys/s, the pages of one scan;
* `range_limit_100`: `kv.range(prefix=..., limit=100)` one after another (scans/s);
* `txn`: for each concurrency in `--tasks`, that many tasks each running
  `txn([Compare.revision(k, "==", r)], [Op.put(k, v)], [Op.get(k)])` on a key of
  its own, one after another, for `--seconds`: txn/s (all replicated);
* `txn_contended`: the same on one shared key: txn/s and the share that succeeded;
* `put_baseline`: plain `kv.put` at the same concurrencies, in the same run, to read
  the txn figures against.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import trio

from cypaxos import Compare, Op
from cypaxos import commands as cmd
from cypaxos.client import open_client


async def _load(kv, keys: int, value_bytes: int) -> None:
    value = b"v" * value_bytes
    chunk = 2000
    for start in range(0, keys, chunk):
        await kv.put_many([(b"bench/range/%08d" % i, value)
                           for i in range(start, min(keys, start + chunk))])


async def _range(kv, keys: int, scans: int) -> dict:
    rates = []
    for _ in range(scans):
        t0 = time.perf_counter()
        items = await kv.range(prefix=b"bench/range/")
        elapsed = time.perf_counter() - t0
        assert len(items) == keys, (len(items), keys)
        rates.append(keys / elapsed)
    # How many replies one scan took (the store's bound cuts them).
    pages, start = 0, b"bench/range/"
    end = cmd.prefix_end(start)
    while True:
        page = cmd.decode_range(await kv.query(cmd.encode_range(start, end)))
        pages += 1
        if not page.more:
            break
        start = page.items[-1].key + b"\x00"
    return {"keys": keys, "scans": scans, "pages_per_scan": pages,
            "keys_per_s_best": round(max(rates)), "keys_per_s_median": round(
                statistics.median(rates))}


async def _range_limit(kv, seconds: float) -> dict:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        assert len(await kv.range(prefix=b"bench/range/", limit=100)) == 100
        n += 1
    return {"scans_per_s": round(n / (time.perf_counter() - t0)), "keys_per_scan": 100}


async def _txn(kv, tasks: int, seconds: float, shared: bool) -> dict:
    counts = [0, 0]   # attempted, succeeded
    deadline = trio.current_time() + seconds

    async def worker(i: int) -> None:
        key = b"bench/txn/shared" if shared else b"bench/txn/%04d" % i
        revision = (await kv.txn(success=[Op.put(key, b"0")])).revision
        while trio.current_time() < deadline:
            result = await kv.txn([Compare.revision(key, "==", revision)],
                                  [Op.put(key, b"%d" % counts[0])], [Op.get(key)])
            counts[0] += 1
            if result.succeeded:
                counts[1] += 1
                revision = result.revision
            else:
                revision = result.results[0].revision

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(worker, i)
    elapsed = time.perf_counter() - t0
    out = {"tasks": tasks, "txn_per_s": round(counts[0] / elapsed)}
    if shared:
        out["succeeded_share"] = round(counts[1] / max(counts[0], 1), 3)
    else:
        assert counts[0] == counts[1]   # a key of its own: every compare holds
    return out


async def _puts(kv, tasks: int, seconds: float) -> dict:
    count = [0]
    deadline = trio.current_time() + seconds

    async def worker(i: int) -> None:
        key = b"bench/put/%04d" % i
        while trio.current_time() < deadline:
            await kv.put(key, b"%d" % count[0])
            count[0] += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(worker, i)
    return {"tasks": tasks, "put_per_s": round(count[0] / (time.perf_counter() - t0))}


async def run(addresses: str, args) -> dict:
    async with open_client(addresses, timeout=60) as kv:
        await _load(kv, args.keys, args.value_bytes)
        result = {"range": await _range(kv, args.keys, args.scans),
                  "range_limit_100": await _range_limit(kv, args.seconds),
                  "txn": [await _txn(kv, t, args.seconds, False) for t in args.tasks],
                  "txn_contended": await _txn(kv, max(args.tasks), args.seconds, True),
                  "put_baseline": [await _puts(kv, t, args.seconds) for t in args.tasks]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", help="a running cluster (default: start one here)")
    parser.add_argument("--fsync", choices=("always", "off"), default="always")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--scans", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    meta = {"keys": args.keys, "value_bytes": args.value_bytes, "fsync": args.fsync,
            "python": sys.version.split()[0]}
    if args.cluster:
        result = trio.run(run, args.cluster, args)
        meta["fsync"] = "(the cluster's)"
    else:
        from cypaxos.tools.local import LocalCluster, free_ports
        with tempfile.TemporaryDirectory() as tmp, \
                LocalCluster(3, ports=free_ports(3), data_dir=tmp,
                             fsync=args.fsync == "always") as cluster:
            cluster.wait_ready(timeout=60)
            result = trio.run(run, cluster.cluster_arg, args)
    print(json.dumps({"settings": meta, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
