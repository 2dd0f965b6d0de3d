"""Recovery and catch-up times of one replica holding N keys.

Starts a local 3-replica cluster (one process per replica, loopback TCP, fsync always
by default), loads N keys (default 1,000,000 with 64-byte values) through one
pipelined Trio client (thousands of concurrent puts, batched by the client), lets the
cluster go quiet, then measures on a follower:

(i)  restart recovery: the follower is SIGKILLed and restarted on its own data dir;
     the time from starting the process until it has applied everything it had
     applied before the kill (loading the newest snapshot + replaying the WAL after
     it, plus process start-up, plus any last slots it learns from its peers);
(ii) catch-up by snapshot: the follower is SIGKILLed, its data dir deleted, and
     restarted; the time from starting the process until it has applied the
     cluster's last write (the leader streams its newest snapshot file in chunks,
     the follower verifies and writes it durably, installs it, then fetches the
     slots after it).

"Applied" is detected with stale reads of a marker key written last before each
measurement (cheap on the replica; `status` is not polled while timing, because it
hashes the whole state: ~0.2 s per call at 1M keys).  A "recovery_breakdown" times the
recovery steps in-process on the follower's data dir.

Prints one JSON object (and writes it to --out if given).  Example:

    PYTHONPATH=python python perf/measure_recovery.py --out perf/results/recovery-1m.json
    PYTHONPATH=python python perf/measure_recovery.py --keys 100000 --repeats 1

`cypaxos serve` has no flags for the snapshot knobs, so replicas are started with a
`cypaxos.tools.local.OptionsCluster`, which builds `ServerOptions` directly (see
--snapshot-bytes and friends; the defaults are ServerOptions' own).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import trio

from cypaxos import commands, wire
from cypaxos.client import connect, open_client
from cypaxos.tools.local import OptionsCluster, free_ports, probe
from cypaxos.replica.options import ServerOptions


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def wal_record_bytes(wal_dir: str) -> int:
    """Bytes of records in a WAL dir: the segment files minus their headers and their
    unused, preallocated zeros (dir_bytes counts the files as they are on disk)."""
    from cypaxos.storage.wal import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
    total = 0
    for name in sorted(os.listdir(wal_dir)):
        if not name.endswith(".wal"):
            continue
        try:
            with open(os.path.join(wal_dir, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        off = SEGMENT_HEADER_SIZE
        while off + RECORD_HEADER_SIZE <= len(data):
            length = int.from_bytes(data[off:off + 4], "little")
            if length == 0 or off + RECORD_HEADER_SIZE + length > len(data):
                break
            off += RECORD_HEADER_SIZE + length
        total += off - SEGMENT_HEADER_SIZE
    return total


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def load_keys(addresses: str, keys: int, value_bytes: int, concurrency: int) -> dict:
    """Put keys 0..keys-1 with pipelined concurrent puts; returns timing."""
    value = bytes(range(256)) * (value_bytes // 256 + 1)
    value = value[:value_bytes]
    next_key = [0]
    done = [0]
    async with open_client(addresses, timeout=60) as kv:
        await kv.put(b"warm-up", b"x")  # connected to the leader

        async def worker():
            while next_key[0] < keys:
                i = next_key[0]
                next_key[0] += 1
                await kv.put(b"key%012d" % i, value)
                done[0] += 1

        async def reporter():
            while True:
                await trio.sleep(10)
                log(f"loaded {done[0]:,} / {keys:,} keys")

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter)
            async with trio.open_nursery() as workers:
                for _ in range(min(concurrency, keys)):
                    workers.start_soon(worker)
            nursery.cancel_scope.cancel()
        elapsed = time.perf_counter() - start
        stats = kv.statistics()
    return {"seconds": round(elapsed, 2), "puts_per_s": round(keys / elapsed),
            "client_batches": stats["batches"]}


def wait(cond, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise SystemExit(f"measure_recovery: timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def converged(cluster) -> dict | None:
    st = cluster.statuses(timeout=5.0)
    if any(s is None for s in st.values()):
        return None
    if len({(s["applied_index"], s["state_digest"]) for s in st.values()}) == 1:
        return st
    return None


MARKER = b"measure-recovery-marker"


def write_marker(addresses: str, value: bytes) -> None:
    """Put the marker key: the last write before a measurement."""
    with connect(addresses, timeout=60) as kv:
        kv.put(MARKER, value)


def stale_marker(address: str):
    """The marker's value as the replica at `address` has applied it right now, or
    False if the replica does not answer.  A stale read is a dictionary lookup on the
    replica; `status` is avoided while timing, as it hashes the whole state."""
    try:
        reply = probe(address, wire.read_request(1, [commands.encode_get(MARKER)], stale=True), 0.5)
    except (OSError, ValueError):
        return False
    if reply[0] != "ok":
        return False
    return commands.decode_get(reply[2][0])


def restart_and_time(cluster, replica_id: int, marker: bytes, timeout: float) -> dict:
    """Start the replica; time to its first answer and until it has applied the marker
    (the last write, so: until its applied_index is back at the cluster's)."""
    address = cluster.address(replica_id)
    started = time.monotonic()
    cluster.start(replica_id)
    first = None
    peak_rss = 0
    pid = cluster.process(replica_id).pid
    deadline = started + timeout
    while True:
        peak_rss = max(peak_rss, rss_bytes(pid) or 0)
        value = stale_marker(address)
        now = time.monotonic()
        if value is not False:
            if first is None:
                first = (now - started, value == marker)
            if value == marker:
                break
        if cluster.unexpected_exits():
            raise SystemExit(f"measure_recovery: replica {replica_id} exited: "
                             f"{cluster.log_tail(replica_id, 3)}")
        if now >= deadline:
            raise SystemExit(f"measure_recovery: replica {replica_id} did not catch up "
                             f"within {timeout:g}s")
        time.sleep(0.005)
    st = cluster.status(replica_id, timeout=10.0)
    return {
        "seconds_to_first_answer": round(first[0], 3),
        "caught_up_at_first_answer": first[1],
        "seconds_to_caught_up": round(now - started, 3),
        "applied_index": st["applied_index"],
        "snapshot_index": st["snapshot_index"],
        "peak_rss_bytes_while_recovering": peak_rss,
        "snapshots_installed": st["statistics"].get("snapshots_installed"),
    }


def breakdown(options: ServerOptions, cluster_id: str) -> dict:
    """In this process: time reading + verifying the newest snapshot, restoring it,
    serializing it again (the event-loop work of taking a snapshot), hashing it (the
    work of one status call), and a whole ReplicaServer recovery (snapshot + WAL
    replay, no networking)."""
    import gc

    from cypaxos.storage import snapshots
    from cypaxos.replica.server import ReplicaServer
    from cypaxos.storage.snapshots import SnapshotStore
    from cypaxos.statemachine import KVStore

    out = {}
    store = SnapshotStore(options.data_dir)
    started = time.perf_counter()
    snapshot = store.load_latest(cluster_id)
    out["snapshot_read_and_verify_s"] = round(time.perf_counter() - started, 3)
    if snapshot is not None:
        out["snapshot_file_bytes"] = os.path.getsize(store.file_path(snapshot[0]))
        out["snapshot_index"] = snapshot[0]
        kv = KVStore()
        started = time.perf_counter()
        kv.restore(snapshot[3])
        out["state_restore_s"] = round(time.perf_counter() - started, 3)
        # What a replica does on its event loop to take a snapshot of this state
        # (state bytes, then the file's bytes with its checksum), and per status call.
        started = time.perf_counter()
        state = kv.snapshot()
        out["state_serialize_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        snapshots.encode(cluster_id, (snapshot[0], snapshot[1], snapshot[2], state))
        out["snapshot_encode_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        kv.state_digest()
        out["state_digest_s"] = round(time.perf_counter() - started, 3)
        del snapshot, state, kv
    gc.collect()
    out["wal_bytes"] = dir_bytes(os.path.join(options.data_dir, "wal"))
    out["wal_record_bytes"] = wal_record_bytes(os.path.join(options.data_dir, "wal"))
    started = time.perf_counter()
    server = ReplicaServer(options)
    out["replica_recovery_total_s"] = round(time.perf_counter() - started, 3)
    out["recovered_applied_index"] = server.core.applied_index
    server.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4096,
                        help="concurrent puts while loading (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind")
    parser.add_argument("--fsync", choices=("always", "off"), default="always")
    defaults = ServerOptions(replica_id=1, cluster={1: "x:1"}, data_dir="")
    parser.add_argument("--snapshot-bytes", type=int, default=defaults.snapshot_bytes)
    parser.add_argument("--snapshot-slots", type=int, default=defaults.snapshot_slots)
    parser.add_argument("--retain-slots", type=int, default=defaults.retain_slots)
    parser.add_argument("--wal-segment-bytes", type=int, default=defaults.wal_segment_bytes)
    parser.add_argument("--data-dir", help="where the replicas' data dirs go (default: a "
                                           "temporary directory, removed afterwards)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed for each recovery (default 600)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)

    options = dict(snapshot_bytes=args.snapshot_bytes, snapshot_slots=args.snapshot_slots,
                   retain_slots=args.retain_slots, wal_segment_bytes=args.wal_segment_bytes)
    own_dir = args.data_dir is None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="cypaxos-recovery-")
    result = {
        "settings": dict(options, keys=args.keys, value_bytes=args.value_bytes,
                         concurrency=args.concurrency, fsync=args.fsync, repeats=args.repeats),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine(), "system": platform.system()},
    }
    cluster = OptionsCluster(3, ports=free_ports(3), data_dir=data_dir,
                             fsync=args.fsync == "always", options=options)
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        log(f"loading {args.keys:,} keys of {args.value_bytes} bytes into {data_dir}")
        result["load"] = trio.run(load_keys, cluster.cluster_arg, args.keys, args.value_bytes,
                                  args.concurrency)
        log(f"loaded: {result['load']}")
        st = wait(lambda: converged(cluster), 600, "the replicas to converge")
        leader = cluster.leader_id(timeout=5.0)
        follower = next(i for i in cluster.ids if i != leader)
        result["cluster"] = {
            "applied_index": st[leader]["applied_index"],
            "replicas": {str(i): {
                "snapshot_index": s["snapshot_index"],
                "snapshots_taken": s["statistics"]["snapshots_taken"],
                "data_dir_bytes": dir_bytes(cluster.replica_data_dir(i)),
                "snapshot_dir_bytes": dir_bytes(os.path.join(cluster.replica_data_dir(i), "snapshots")),
                "wal_bytes": dir_bytes(os.path.join(cluster.replica_data_dir(i), "wal")),
                "rss_bytes": rss_bytes(cluster.process(i).pid),
            } for i, s in st.items()},
        }
        result["measured_replica"] = follower

        restarts = []
        for n in range(args.repeats):
            marker = b"restart-%d" % n
            write_marker(cluster.cluster_arg, marker)
            wait(lambda: stale_marker(cluster.address(follower)) == marker, 60,
                 "the follower to apply the marker")
            wal_dir = os.path.join(cluster.replica_data_dir(follower), "wal")
            wal, records = dir_bytes(wal_dir), wal_record_bytes(wal_dir)
            snap = dir_bytes(os.path.join(cluster.replica_data_dir(follower), "snapshots"))
            cluster.kill(follower)
            one = restart_and_time(cluster, follower, marker, args.timeout)
            one.update(wal_bytes_before=wal, wal_record_bytes_before=records,
                       snapshot_dir_bytes_before=snap)
            restarts.append(one)
            log(f"restart {n + 1}: {one}")
            wait(lambda: converged(cluster), 300, "the replicas to converge")
        result["restart_recovery"] = {
            "median_seconds_to_caught_up": statistics.median(r["seconds_to_caught_up"] for r in restarts),
            "runs": restarts,
        }

        # Where the restart time goes: the same recovery in this process, timed step
        # by step, on the follower's data dir (the follower stopped cleanly meanwhile).
        cluster_id = cluster.status(follower, timeout=5.0)["cluster_id"]
        cluster.stop(follower)
        result["recovery_breakdown"] = breakdown(
            ServerOptions(replica_id=follower, cluster={i: cluster.address(i) for i in cluster.ids},
                          data_dir=cluster.replica_data_dir(follower), fsync=args.fsync == "always",
                          insecure=True,
                          **options), cluster_id)
        log(f"breakdown: {result['recovery_breakdown']}")
        cluster.start(follower)
        wait(lambda: converged(cluster), 300, "the replicas to converge")

        catchups = []
        for n in range(args.repeats):
            marker = b"catch-up-%d" % n
            write_marker(cluster.cluster_arg, marker)
            cluster.kill(follower)
            shutil.rmtree(cluster.replica_data_dir(follower))
            log_start = os.path.getsize(cluster.log_path(follower))
            one = restart_and_time(cluster, follower, marker, args.timeout)
            with open(cluster.log_path(follower), "rb") as f:
                f.seek(log_start)
                one["log_says_installed_snapshot"] = b"installed snapshot at slot" in f.read()
            catchups.append(one)
            log(f"catch-up {n + 1}: {one}")
            wait(lambda: converged(cluster), 300, "the replicas to converge")
        result["snapshot_catch_up"] = {
            "median_seconds_to_caught_up": statistics.median(r["seconds_to_caught_up"] for r in catchups),
            "runs": catchups,
        }
        final = cluster.statuses(timeout=10.0)
        result["elections"] = {str(i): {k: (s or {}).get("statistics", {}).get(k)
                                        for k in ("elections", "became_leader")}
                               for i, s in final.items()}
        result["final_ballots"] = {str(i): (s or {}).get("ballot") for i, s in final.items()}
        unexpected = cluster.unexpected_exits()
        if unexpected:
            result["unexpected_exits"] = unexpected
    finally:
        cluster.close()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
