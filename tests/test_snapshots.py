"""Snapshots, log compaction and snapshot transfer on real replica processes.

Every test runs a 3-replica cluster (one process per replica, TCP on loopback,
`fsync` always) and drives it with the Trio client:

(a) small `snapshot_bytes` / `wal_segment_bytes` / `retain_slots` under continuous
    writes over a fixed key set: every data dir stays under a derived bound, the
    snapshot index and the WAL's first sequence number keep advancing;
(b) a follower that is SIGKILLed, wiped and restarted while the others take writes
    catches up by snapshot transfer and ends in the same state;
(c) a SIGKILL of the whole cluster after several snapshots loses no acknowledged
    write (snapshot + log replay);
(d) the client's `snapshot()` request snapshots every replica and returns its index;
(e) `cypaxos serve` refuses a damaged newest snapshot with one clear line naming the
    file, and ignores (removes) a stray `*.tmp` snapshot file;
plus a snapshot damaged on the sender's disk being refused by the receiver (verify
before install), the receiving side of the chunk protocol driven in-process (acks,
resume, restart, checksum), and, behind CYPAXOS_SOAK=1, a long version of (a) over 10,000 keys that records
data-dir sizes and RSS and writes them to perf/results/.

`cypaxos serve` has no flags for the snapshot knobs, so most tests start replicas with a
small launcher (`python -c ...`) that builds `ServerOptions` directly; (d) and (e) run
the real `cypaxos serve`.  Nothing sleeps to wait for a condition: waits poll with a
deadline.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import trio
import trio.testing

from cypaxos import commands, wire
from cypaxos.client import open_client
from cypaxos.replica.options import ServerOptions
from cypaxos.replica.server import SNAPSHOT_CHUNK_BYTES, ReplicaServer
from cypaxos.statemachine import KVStore
from cypaxos.storage import snapshots
from cypaxos.storage.snapshots import SNAPSHOT_DIR
from cypaxos.tools.local import PARENT_PID_ENV, LocalCluster, OptionsCluster, child_env
from clusterwait import brief, statuses, wait_converged, wait_for, wait_ready

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMALL = dict(snapshot_bytes=256 << 10, wal_segment_bytes=128 << 10, retain_slots=4)


def dir_bytes(path: str) -> int:
    """Apparent size of every file under `path` (files may vanish while we look)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def snapshot_files(data_dir: str) -> list[str]:
    path = os.path.join(data_dir, SNAPSHOT_DIR)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def largest_snapshot_file(data_dir: str) -> int:
    sizes = [0]
    for name in snapshot_files(data_dir):
        try:
            sizes.append(os.stat(os.path.join(data_dir, SNAPSHOT_DIR, name)).st_size)
        except FileNotFoundError:
            pass
    return max(sizes)


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Load:
    """Writers putting values over a fixed key set, each owning keys k % writers == w.

    Per key it remembers the last acknowledged value and the value of a put still
    in flight, so a check after a crash knows exactly what may be there.
    """

    def __init__(self, kv, keys: int, writers: int = 64, value_bytes: int = 100) -> None:
        self.kv = kv
        self.keys = keys
        self.writers = writers
        self.value_bytes = value_bytes
        self.acked: dict[int, bytes] = {}
        self.inflight: dict[int, bytes] = {}
        self.count = 0
        self.running = True

    @staticmethod
    def key(k: int) -> bytes:
        return b"key%06d" % k

    def value(self, k: int, n: int) -> bytes:
        return (b"%d:%d:" % (k, n)).ljust(self.value_bytes, b"v")

    async def writer(self, w: int) -> None:
        n = 0
        while self.running:
            for k in range(w, self.keys, self.writers):
                if not self.running:
                    return
                n += 1
                value = self.value(k, n)
                self.inflight[k] = value
                await self.kv.put(self.key(k), value)
                del self.inflight[k]
                self.acked[k] = value
                self.count += 1

    def start(self, nursery) -> None:
        for w in range(self.writers):
            nursery.start_soon(self.writer, w)

    async def wait_count(self, n: int, timeout: float = 60.0) -> None:
        async def check():
            return self.count >= n
        await wait_for(check, timeout, f"{n} acknowledged writes (have {self.count})", 0.02)


async def read_all(kv, keys, concurrency: int = 256) -> dict:
    """Linearizable gets of many keys, pipelined: {k: value}."""
    keys = list(keys)
    out = {}

    async def reader(w):
        for k in keys[w::concurrency]:
            out[k] = await kv.get(Load.key(k))
    async with trio.open_nursery() as nursery:
        for w in range(min(concurrency, len(keys))):
            nursery.start_soon(reader, w)
    return out


def log_text(cluster, replica_id: int) -> str:
    with open(cluster.log_path(replica_id), "rb") as f:
        return f.read().decode("utf-8", "replace")


# ---------------------------------------------------------------------- (a)


def data_dir_bound(options: dict, snapshot_file_bytes: int) -> int:
    """What a data dir may hold at any instant (docs/snapshots.md, "The data-dir bound").

    WAL: a snapshot starts once `snapshot_bytes` were appended since the last (checked
    every tick); segments wholly before the snapshot's cut are deleted once it is
    durable, but never the current segment, so up to `snapshot_bytes` + one segment,
    doubled for what arrives while a snapshot is being written, plus two segments of
    preallocation (the current segment's zero-filled rest and the spare prepared ahead).
    Snapshots: the two kept plus the temporary file of the one being written.  Plus
    512 KiB of slack (identity file, segment headers, scheduling jitter on a loaded CI
    host).
    """
    return (2 * options["snapshot_bytes"] + 4 * options["wal_segment_bytes"]
            + 3 * snapshot_file_bytes + (512 << 10))


async def run_bounded_load(new_cluster, *, seconds: float, keys: int, value_bytes: int,
                           sample_every: float, on_sample=None) -> dict:
    """(a): continuous writes on a SMALL-knob cluster; returns what was observed."""
    cluster = new_cluster(cls=OptionsCluster, options=SMALL)
    observed = {"max_dir_bytes": {i: 0 for i in cluster.ids},
                "max_snapshot_file": 0, "first": None, "last": None, "writes": 0}
    with cluster:
        await wait_ready(cluster)
        observed["first"] = await statuses(cluster)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            load = Load(kv, keys=keys, value_bytes=value_bytes)
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                start = trio.current_time()
                next_sample = start
                while trio.current_time() - start < seconds:
                    for i in cluster.ids:
                        path = cluster.replica_data_dir(i)
                        size = dir_bytes(path)
                        observed["max_dir_bytes"][i] = max(observed["max_dir_bytes"][i], size)
                        observed["max_snapshot_file"] = max(observed["max_snapshot_file"],
                                                            largest_snapshot_file(path))
                    if on_sample is not None and trio.current_time() >= next_sample:
                        next_sample += sample_every
                        await on_sample(cluster, load, trio.current_time() - start)
                    assert not cluster.unexpected_exits(), cluster.unexpected_exits()
                    await trio.sleep(0.05)
                load.running = False
            observed["writes"] = load.count
            observed["elapsed"] = trio.current_time() - start
            observed["last"] = await wait_converged(cluster)
    return observed


@pytest.mark.slow
async def test_data_dir_stays_bounded_under_continuous_writes(new_cluster):
    observed = await run_bounded_load(new_cluster, seconds=20, keys=1000, value_bytes=100,
                                      sample_every=1e9)
    bound = data_dir_bound(SMALL, observed["max_snapshot_file"])
    print(f"writes {observed['writes']} in {observed['elapsed']:.1f}s, largest snapshot file "
          f"{observed['max_snapshot_file']} B, max data dir {observed['max_dir_bytes']} B, "
          f"bound {bound} B")
    # The derived bound is itself small for this key set: snapshots of 1000 small keys,
    # plus the store's history window that every snapshot carries (no more bytes there
    # than its byte bound counts).
    from cypaxos.statemachine import HISTORY_BYTES_MAX_DEFAULT
    assert bound <= (4 << 20) + 3 * HISTORY_BYTES_MAX_DEFAULT
    first, last = observed["first"], observed["last"]
    # Enough traffic to go through many snapshots and WAL segments.
    assert observed["writes"] >= 10_000, observed["writes"]
    for i in last:
        assert observed["max_dir_bytes"][i] <= bound, (i, observed["max_dir_bytes"], bound)
        assert last[i]["snapshot_index"] > first[i]["snapshot_index"]
        assert last[i]["statistics"]["snapshots_taken"] >= 3, last[i]["statistics"]
        # Old segments were deleted: the WAL now starts far past its first record ...
        assert last[i]["wal_first_seq"] > first[i]["wal_last_seq"] + 100, last[i]
        # ... and the in-memory log starts just behind the snapshot (retain_slots).
        assert last[i]["log_start"] >= last[i]["snapshot_index"] - SMALL["retain_slots"] + 1
        assert last[i]["snapshot_index"] <= last[i]["applied_index"]


# ---------------------------------------------------------------------- (b)


@pytest.mark.slow
async def test_wiped_follower_catches_up_by_snapshot_transfer(new_cluster):
    cluster = new_cluster(cls=OptionsCluster, options=SMALL)
    with cluster:
        leader = await wait_ready(cluster)
        follower = next(i for i in cluster.ids if i != leader)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            # 12,000 keys of 100 bytes: a snapshot of ~1.4 MB travels in two chunks.
            load = Load(kv, keys=12_000)
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                await load.wait_count(15_000)
                cluster.kill(follower)
                shutil.rmtree(cluster.replica_data_dir(follower))
                # The survivors keep serving and compact past everything the wiped
                # replica could get from a log.
                before = load.count
                await load.wait_count(before + 5000)

                seen = {}

                async def compacted():
                    st = seen["st"] = await statuses(cluster)
                    return all(st[i] and st[i]["log_start"] > 1 and st[i]["snapshot_index"] > 0
                               for i in cluster.ids if i != follower) and st
                st = await wait_for(compacted, 60, lambda: "the survivors to compact their "
                                    f"logs: {brief(seen['st'])}")
                target = max(st[i]["applied_index"] for i in cluster.ids if i != follower)
                cluster.start(follower)

                async def caught_up():
                    s = await trio.to_thread.run_sync(cluster.status, follower)
                    return s is not None and s["applied_index"] > target and s
                await wait_for(caught_up, 60, f"replica {follower} to pass slot {target}")
                # ... and it keeps up with live traffic afterwards.
                await load.wait_count(load.count + 2000)
                load.running = False
            final = await wait_converged(cluster)
        assert final[follower]["statistics"]["snapshots_installed"] >= 1, final[follower]
        assert final[follower]["snapshot_index"] > 0
        assert "installed snapshot at slot" in log_text(cluster, follower)
        assert largest_snapshot_file(cluster.replica_data_dir(follower)) > SNAPSHOT_CHUNK_BYTES
        assert sum(final[i]["statistics"]["snapshots_sent"] for i in cluster.ids) >= 1
        assert not cluster.unexpected_exits()
        # Same state: the digest check above, and a linearizable read of every key.
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            assert await read_all(kv, load.acked) == load.acked


def flip_byte(path: str, offset: int | None = None) -> None:
    """Damage a file in place: flip one bit of the byte at `offset` (default: middle)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        offset = size // 2 if offset is None else offset
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.slow
async def test_transferred_snapshot_is_verified_before_install(new_cluster):
    """A snapshot damaged on the sender's disk is refused by the receiver; a good one
    taken later is installed."""
    cluster = new_cluster(cls=OptionsCluster, options=SMALL)
    with cluster:
        leader = await wait_ready(cluster)
        follower = next(i for i in cluster.ids if i != leader)
        survivors = [i for i in cluster.ids if i != follower]
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            load = Load(kv, keys=1000)
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                await load.wait_count(3000)
                cluster.kill(follower)
                shutil.rmtree(cluster.replica_data_dir(follower))
                await load.wait_count(load.count + 5000)
                load.running = False
            # Quiet now: no new snapshots.  Damage every survivor's newest snapshot.
            st = await wait_converged(cluster, ids=survivors)
            for i in survivors:
                assert st[i]["log_start"] > 1
                path = os.path.join(cluster.replica_data_dir(i), SNAPSHOT_DIR,
                                    f"snapshot-{st[i]['snapshot_index']:020d}.snap")
                flip_byte(path)
            cluster.start(follower)

            async def refused():
                return "fails its checksum; discarded" in log_text(cluster, follower)
            await wait_for(refused, 30, "the wiped replica to refuse a damaged snapshot")
            s = await trio.to_thread.run_sync(cluster.status, follower)
            assert s["applied_index"] == 0 and s["snapshot_index"] == 0, s
            assert s["statistics"]["snapshots_installed"] == 0
            # No snapshot file (the transfer, restarted, may have an incoming file).
            assert [name for name in snapshot_files(cluster.replica_data_dir(follower))
                    if not name.startswith("incoming-")] == []
            # New writes make the survivors take good snapshots; the next one sent
            # is installed.
            load = Load(kv, keys=1000)
            async with trio.open_nursery() as nursery:
                load.start(nursery)

                async def installed():
                    s = await trio.to_thread.run_sync(cluster.status, follower)
                    return s is not None and s["statistics"]["snapshots_installed"] >= 1
                await wait_for(installed, 60, "the wiped replica to install a good snapshot")
                load.running = False
        await wait_converged(cluster)
        assert not cluster.unexpected_exits()


# ---------------------------------------------------------------------- (c)


@pytest.mark.slow
async def test_full_cluster_sigkill_after_snapshots_keeps_every_acknowledged_write(new_cluster):
    cluster = new_cluster(cls=OptionsCluster, options=SMALL)
    with cluster:
        await wait_ready(cluster)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            load = Load(kv, keys=2000)
            async with trio.open_nursery() as nursery:
                load.start(nursery)

                async def several_snapshots():
                    st = await statuses(cluster)
                    return all(s and s["statistics"]["snapshots_taken"] >= 3 for s in st.values()) and st
                st = await wait_for(several_snapshots, 60, "3 snapshots on every replica")
                # Writes after the last snapshot too: recovery must replay the log.
                await load.wait_count(load.count + 1000)
                for i in cluster.ids:  # as close to simultaneous as we can
                    os.kill(cluster.process(i).pid, signal.SIGKILL)
                for i in cluster.ids:
                    cluster.kill(i)  # reap
                nursery.cancel_scope.cancel()
        snapshot_before = {i: st[i]["snapshot_index"] for i in cluster.ids}
        acked, inflight = dict(load.acked), dict(load.inflight)
        assert len(acked) == 2000

        cluster.start_all()
        # Each replica recovers from its own disk before it answers anything: the
        # first status already shows the snapshot and the replayed log.
        async def all_answer():
            st = await statuses(cluster)
            return all(st.values()) and st
        recovered = await wait_for(all_answer, 60, "every replica to answer after restart")
        for i in cluster.ids:
            assert recovered[i]["snapshot_index"] >= snapshot_before[i], recovered[i]
            assert recovered[i]["applied_index"] >= recovered[i]["snapshot_index"]
        await wait_ready(cluster)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            found = await read_all(kv, acked)
            lost = []
            for k, value in acked.items():
                allowed = {value} | ({inflight[k]} if k in inflight else set())
                if found[k] not in allowed:
                    lost.append((k, value, found[k]))
            assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
        await wait_converged(cluster)
        assert not cluster.unexpected_exits()


# ------------------------------------------------------------------- (d), (e)


def serve_argv(cluster: LocalCluster, replica_id: int) -> list[str]:
    return cluster.command(replica_id)


def run_serve(cluster: LocalCluster, replica_id: int, timeout: float = 30):
    env = child_env()
    env.pop(PARENT_PID_ENV, None)
    return subprocess.run(serve_argv(cluster, replica_id), capture_output=True,
                          timeout=timeout, env=env)


async def test_snapshot_request_snapshots_every_replica(new_cluster):
    # The real `cypaxos serve`, default knobs: no automatic snapshot for a few writes.
    with new_cluster() as cluster:
        await wait_ready(cluster)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            for i in range(200):
                await kv.put(b"d%d" % i, b"v%d" % i)
            st = await wait_converged(cluster)
            assert all(s["snapshot_index"] == 0 for s in st.values())
            applied = st[1]["applied_index"]

            answers = await kv.snapshot()
            assert [a["address"] for a in answers] == cluster.addresses
            for a in answers:
                assert a["reachable"] and "error" not in a, a
                assert a["applied_index"] == applied, a
            st = await statuses(cluster)
            for i in cluster.ids:
                assert st[i]["snapshot_index"] == applied
                assert st[i]["statistics"]["snapshots_taken"] == 1
                assert snapshot_files(cluster.replica_data_dir(i)) == \
                    [f"snapshot-{applied:020d}.snap"]

            # Nothing applied since: the same index again, and no new file.
            again = await kv.snapshot()
            assert [a["applied_index"] for a in again] == [applied] * 3
            st = await statuses(cluster)
            assert all(s["statistics"]["snapshots_taken"] == 1 for s in st.values())

            # Newer snapshots: the newest two files are kept.
            indexes = [applied]
            for round_ in range(2):
                for i in range(50):
                    await kv.put(b"d%d-%d" % (round_, i), b"x")
                st = await wait_converged(cluster)
                answers = await kv.snapshot()
                index = st[1]["applied_index"]
                assert [a["applied_index"] for a in answers] == [index] * 3
                assert index > indexes[-1]
                indexes.append(index)
            for i in cluster.ids:
                assert snapshot_files(cluster.replica_data_dir(i)) == \
                    [f"snapshot-{n:020d}.snap" for n in indexes[-2:]]
            # Still serving, same state everywhere.
            assert await kv.get(b"d199") == b"v199"
        await wait_converged(cluster)


async def test_damaged_newest_snapshot_refused_and_stray_tmp_ignored(new_cluster):
    with new_cluster() as cluster:
        await wait_ready(cluster)
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            indexes = []
            for round_ in range(2):
                for i in range(100):
                    await kv.put(b"e%d-%d" % (round_, i), b"v%d" % i)
                await wait_converged(cluster)
                answers = await kv.snapshot()
                assert all("error" not in a for a in answers), answers
                indexes.append(answers[0]["applied_index"])
            for i in range(20):  # a log tail after the newest snapshot
                await kv.put(b"tail%d" % i, b"t")
            before = await wait_converged(cluster)
        for i in cluster.ids:
            assert cluster.stop(i) == 0

        data_dir = cluster.replica_data_dir(1)
        newest = os.path.join(data_dir, SNAPSHOT_DIR, f"snapshot-{indexes[-1]:020d}.snap")
        older = os.path.join(data_dir, SNAPSHOT_DIR, f"snapshot-{indexes[-2]:020d}.snap")
        with open(newest, "rb") as f:
            good = f.read()
        damages = {
            "a flipped byte in the body": lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0x01]) + b[len(b) // 2 + 1:],
            "a flipped byte in the magic": lambda b: bytes([b[0] ^ 0x20]) + b[1:],
            "a truncated file": lambda b: b[:len(b) - 7],
        }
        for what, damage in damages.items():
            with open(newest, "wb") as f:
                f.write(damage(good))
            result = run_serve(cluster, 1)
            err = result.stderr.decode()
            lines = err.strip().splitlines()
            assert result.returncode == 1, (what, result.returncode, err)
            assert "Traceback" not in err, (what, err)
            assert len(lines) == 1 and lines[0].startswith("cypaxos: error: "), (what, err)
            assert newest in lines[0], (what, err)

        # Repaired; plus a stray temporary file (a write a crash interrupted) that
        # claims a newer index, and a damaged *older* snapshot that is never read.
        with open(newest, "wb") as f:
            f.write(good)
        stray = os.path.join(data_dir, SNAPSHOT_DIR, f"snapshot-{indexes[-1] + 1000:020d}.snap.tmp")
        with open(stray, "wb") as f:
            f.write(good[:100])
        flip_byte(older, 40)
        cluster.start_all()
        await wait_ready(cluster)
        after = await wait_converged(cluster)
        assert not os.path.exists(stray)
        assert after[1]["snapshot_index"] == indexes[-1]
        assert after[1]["applied_index"] >= before[1]["applied_index"]
        assert after[1]["state_digest"] == after[2]["state_digest"]
        async with open_client(cluster.cluster_arg, timeout=30) as kv:
            assert await kv.get(b"e0-5") == b"v5"
            assert await kv.get(b"tail19") == b"t"
        assert not cluster.unexpected_exits()


# ------------------------------------------------ the transfer protocol, in process


def _acks(server, peer: int) -> list[tuple]:
    """SNAPSHOT_ACK messages the server queued for `peer`: (index, next_offset)."""
    outbox = server.peer_links[peer]
    decoder = wire.FrameDecoder(wire.FRAME_BYTES_MAX)
    decoder.feed(b"".join(outbox.frames))
    outbox.frames = []
    out = []
    while (msg := decoder.next_frame()) is not None:
        if msg[0] == wire.SNAPSHOT_ACK:
            out.append((msg[2], msg[3]))
    return out


async def test_transfer_receiver_resumes_restarts_verifies_then_installs(tmp_path):
    """The receiving side of a snapshot transfer through the server's node and disk,
    driven chunk by chunk.

    Acks name the bytes held (written to the incoming file), so a lost or duplicated
    chunk is resent from there; a newer snapshot starts over; a complete transfer that
    fails its checksum is discarded; a good one is written durably, then installed.
    """
    cluster = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}
    server = ReplicaServer(ServerOptions(replica_id=2, cluster=cluster, insecure=True,
                                         data_dir=str(tmp_path / "r2")))
    node = server.node
    try:
        kv = KVStore()
        for i in range(3000):
            kv.apply(commands.encode_put(b"k%d" % i, b"v" * 50))
        def snapshot_file(index):
            return snapshots.encode(server.cluster_id, (index, 7 << 16 | 1, [], kv.snapshot()))
        good = snapshot_file(40)
        total = len(good)
        chunk = 50_000
        pieces = [good[o:o + chunk] for o in range(0, total, chunk)]
        assert len(pieces) >= 4
        async with trio.open_nursery() as nursery:
            server.storage.nursery = nursery

            async def chunk_in(peer, index, offset, size, data):
                node.on_snapshot_chunk(peer, index, offset, size, data)
                await wait_for(_no_tasks(nursery), 10, "the file operations to finish")

            await chunk_in(1, 40, 0, total, pieces[0])
            assert _acks(server, 1) == [(40, chunk)]
            # A duplicate, and a chunk from the future (one was lost): both answered
            # with what is held, so the sender resends from there.
            await chunk_in(1, 40, 0, total, pieces[0])
            await chunk_in(1, 40, 2 * chunk, total, pieces[2])
            assert _acks(server, 1) == [(40, chunk), (40, chunk)]
            await chunk_in(1, 40, chunk, total, pieces[1])
            assert _acks(server, 1) == [(40, 2 * chunk)]
            incoming = server.storage.snapshot_store.incoming_path(1)
            assert os.path.getsize(incoming) == 2 * chunk   # held on disk, not in memory
            # A newer snapshot from the middle: start over at 0; from its start: taken.
            newer = snapshot_file(45)
            await chunk_in(1, 45, chunk, len(newer), newer[chunk:2 * chunk])
            assert _acks(server, 1) == [(45, 0)]
            # Complete a corrupt copy of the newer one: verified, discarded, restarted.
            bad = bytearray(newer)
            bad[len(bad) // 2] ^= 0x40
            for offset in range(0, len(bad), chunk):
                await chunk_in(1, 45, offset, len(bad), bytes(bad[offset:offset + chunk]))
            assert _acks(server, 1)[-1] == (45, 0)
            assert node.core.applied_index == 0 and node.snapshot_index == 0
            assert snapshot_files(str(tmp_path / "r2")) == []
            # A transfer over the configured maximum is refused (acked as done).
            node.receivers[3].total_bytes_max = total - 1
            await chunk_in(3, 40, 0, total, pieces[0])
            assert _acks(server, 3) == [(40, total)] and node.stats["snapshots_refused"] == 1
            # The good one, whole: written durably, installed, the log compacted.
            for offset in range(0, total, chunk):
                await chunk_in(1, 40, offset, total, good[offset:offset + chunk])
            assert _acks(server, 1)[-1] == (40, total)
            assert node.core.applied_index == 40 and node.core.commit_index == 40
            assert node.snapshot_index == 40
            assert node.state_machine.state_digest() == kv.state_digest()
            assert snapshot_files(str(tmp_path / "r2")) == [f"snapshot-{40:020d}.snap"]
            assert node.stats["snapshots_installed"] == 1
            assert not os.path.exists(incoming)
            # Anything not newer than what we hold is acknowledged whole (stop sending).
            node.receivers[3].total_bytes_max = 1 << 30
            await chunk_in(3, 40, 0, total, pieces[0])
            assert _acks(server, 3) == [(40, total)]
            nursery.cancel_scope.cancel()
    finally:
        server.close()
    # And a restart recovers it from the file.
    again = ReplicaServer(ServerOptions(replica_id=2, cluster=cluster, insecure=True, data_dir=str(tmp_path / "r2")))
    try:
        assert again.node.core.applied_index == 40 and again.node.snapshot_index == 40
        assert again.state_machine.state_digest() == kv.state_digest()
    finally:
        again.close()


def _no_tasks(nursery):
    async def check():
        await trio.testing.wait_all_tasks_blocked()
        return not nursery.child_tasks
    return check


# ---------------------------------------------------------------------- soak


def _flat(samples: list[float], warmup: int) -> tuple[bool, float, float]:
    """After `warmup` samples, max of the second half <= 1.3 x max of the first half."""
    rest = samples[warmup:]
    half = len(rest) // 2
    first, second = max(rest[:half]), max(rest[half:])
    return second <= 1.3 * first, first, second


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("CYPAXOS_SOAK") != "1",
                    reason="soak: set CYPAXOS_SOAK=1 (and CYPAXOS_SOAK_SECONDS, default 600)")
@pytest.mark.timeout(0)
async def test_soak_data_dir_and_rss_stay_flat(new_cluster):
    seconds = float(os.environ.get("CYPAXOS_SOAK_SECONDS", "600"))
    interval = float(os.environ.get("CYPAXOS_SOAK_INTERVAL", "10"))
    out = os.environ.get("CYPAXOS_SOAK_OUT",
                         os.path.join(REPO, "perf", "results", "soak_snapshots.json"))
    samples = []
    last_count = [0, 0.0]

    async def on_sample(cluster, load, elapsed):
        st = await statuses(cluster)
        row = {"t": round(elapsed, 1), "writes": load.count,
               "writes_per_s": round((load.count - last_count[0]) / max(1e-9, elapsed - last_count[1])),
               "replicas": {}}
        last_count[:] = [load.count, elapsed]
        for i in cluster.ids:
            s = st.get(i) or {}
            row["replicas"][str(i)] = {
                "data_dir_bytes": dir_bytes(cluster.replica_data_dir(i)),
                "rss_bytes": rss_bytes(cluster.process(i).pid),
                "applied_index": s.get("applied_index"),
                "snapshot_index": s.get("snapshot_index"),
                "wal_first_seq": s.get("wal_first_seq"),
                "snapshots_taken": (s.get("statistics") or {}).get("snapshots_taken"),
            }
        samples.append(row)
        print(json.dumps(row), flush=True)

    observed = await run_bounded_load(new_cluster, seconds=seconds, keys=10_000, value_bytes=100,
                                      sample_every=interval, on_sample=on_sample)
    bound = data_dir_bound(SMALL, observed["max_snapshot_file"])
    warmup = max(1, int(len(samples) * 0.2))
    verdicts = {}
    for i in ("1", "2", "3"):
        for metric in ("data_dir_bytes", "rss_bytes"):
            series = [row["replicas"][i][metric] for row in samples]
            verdicts[f"replica{i}.{metric}"] = _flat(series, warmup)
    report = {
        "settings": dict(SMALL, keys=10_000, value_bytes=100, writers=64, seconds=seconds,
                         interval=interval, fsync=True),
        "host": {"cpus": os.cpu_count(), "platform": sys.platform},
        "writes": observed["writes"],
        "writes_per_s": round(observed["writes"] / observed["elapsed"]),
        "data_dir_bound_bytes": bound,
        "max_data_dir_bytes": observed["max_dir_bytes"],
        "max_snapshot_file_bytes": observed["max_snapshot_file"],
        "flatness": {"rule": "after the first 20% of samples, max(second half) <= 1.3 x "
                             "max(first half)", "warmup_samples": warmup,
                     "results": {k: {"flat": v[0], "first_half_max": v[1], "second_half_max": v[2]}
                                 for k, v in verdicts.items()}},
        "final_status": {str(i): {k: s[k] for k in ("applied_index", "snapshot_index", "log_start",
                                                     "wal_first_seq", "wal_last_seq")}
                         for i, s in observed["last"].items()},
        "samples": samples,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    assert len(samples) >= 6, "the soak needs at least 6 samples (raise CYPAXOS_SOAK_SECONDS)"
    for i, size in observed["max_dir_bytes"].items():
        assert size <= bound, (i, size, bound)
    assert all(v[0] for v in verdicts.values()), report["flatness"]


# ---------------------------------------------------------------------------
# The file format (no cluster)

@pytest.mark.parametrize("state_bytes", [0, 1, 23, 24, 255, 256, 65535, 65536, 300_000])
def test_file_pieces_are_the_plain_encoding(tmp_path, state_bytes):
    import cbor2
    import google_crc32c

    state = os.urandom(state_bytes)
    snapshot = (1234, 5 << 16 | 2, [[7, 8, 9]], state)
    body = cbor2.dumps([snapshots.FORMAT, "c1", 1234, 5 << 16 | 2, [[7, 8, 9]], state])
    plain = snapshots.HEADER.pack(snapshots.MAGIC, google_crc32c.value(body), len(body)) + body
    parts = snapshots.encode_parts("c1", snapshot)
    assert parts[-1] is state            # written from, not copied
    assert b"".join(parts) == plain == snapshots.encode("c1", snapshot)
    assert snapshots.decode(plain, "c1") == (1234, 5 << 16 | 2, [[7, 8, 9]], state)
    store = snapshots.SnapshotStore(str(tmp_path))
    store.write(1234, parts)
    assert store.read(1234) == plain
    assert store.load_latest("c1")[3] == state
