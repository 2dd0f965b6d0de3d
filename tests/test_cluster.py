"""A real 3-replica cluster: `cypaxos serve` processes on loopback, real fsync, SIGKILL.

These check what users rely on: acknowledged writes survive any crash of a minority
and a crash of everyone; client retries through failover never apply a command twice;
replicas end in the same state; bad bytes on a connection cost only that connection.
"""
import os
import socket
import struct
import subprocess
import threading
import time

import pytest
import trio

import cypaxos
from cypaxos import commands, wire
from cypaxos.addresses import split_address
from jepsen.cluster import wal_records_end

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 60.0


@pytest.fixture
def cluster(running_cluster):
    """3 replicas, fsync always, a leader elected (tests/conftest.py)."""
    return running_cluster


def wait_until(predicate, timeout=TIMEOUT_S, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def converged(cluster):
    """Every replica answers, all at the same applied index: return their statuses."""
    statuses = cluster.statuses()
    if any(s is None for s in statuses.values()):
        return None
    if len({s["applied_index"] for s in statuses.values()}) != 1:
        return None
    return statuses


def assert_digests_agree(cluster):
    statuses = wait_until(lambda: converged(cluster), what="replicas to converge")
    digests = {i: s["state_digest"] for i, s in statuses.items()}
    assert len(set(digests.values())) == 1, f"state digests differ: {digests}"


async def counter_workload(addresses, stop_after_s, tasks=8):
    """Increment one counter with cas from many tasks; count outcomes exactly."""
    outcomes = {"ok": 0, "lost_race": 0, "unknown": 0}
    deadline = trio.current_time() + stop_after_s
    async with cypaxos.open_client(addresses, timeout=10.0) as kv:
        async def worker():
            while trio.current_time() < deadline:
                try:
                    current = await kv.get(b"counter")
                    new = str(int(current or b"0") + 1).encode()
                    if await kv.cas(b"counter", current, new):
                        outcomes["ok"] += 1
                    else:
                        outcomes["lost_race"] += 1
                except cypaxos.TimeoutError as exc:
                    # Only a write that may have been applied widens the bound.
                    if exc.maybe_applied:
                        outcomes["unknown"] += 1
                except cypaxos.UnavailableError:
                    await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
        final = int(await kv.get(b"counter") or b"0")
    return outcomes, final


def test_counter_via_cas_is_exactly_once_across_failover(cluster):
    """A cas applied twice would be answered False the second time (the value moved on),
    so the counter would exceed the acknowledged increments plus the unknown ones."""
    result = {}

    def run():
        result["value"] = trio.run(counter_workload, cluster.addresses, 12.0)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(3)  # let the workload get going; this is the fault's timing, not a wait
    old_leader = cluster.leader_id()
    cluster.kill(old_leader)
    cluster.wait_ready(timeout=TIMEOUT_S, replicas=[i for i in cluster.ids if i != old_leader])
    time.sleep(2)
    cluster.start(old_leader)
    worker.join(timeout=120)
    assert not worker.is_alive()
    outcomes, final = result["value"]
    assert outcomes["ok"] > 20, outcomes
    assert outcomes["ok"] <= final <= outcomes["ok"] + outcomes["unknown"], (outcomes, final)
    assert_digests_agree(cluster)


def test_follower_and_leader_kill_then_full_restart_keeps_every_acknowledged_write(cluster):
    acknowledged = {}
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        def write(prefix, n):
            for i in range(n):
                key = b"%s-%d" % (prefix, i)
                value = b"v-%s-%d" % (prefix, i)
                kv.put(key, value)
                acknowledged[key] = value

        write(b"before", 200)
        follower = next(i for i in cluster.ids if i != cluster.leader_id())
        cluster.kill(follower)
        write(b"follower-down", 200)  # a majority keeps accepting writes
        cluster.start(follower)
        leader = cluster.leader_id()
        cluster.kill(leader)
        write(b"leader-down", 200)
        cluster.start(leader)
        cluster.wait_ready(timeout=TIMEOUT_S)
        assert_digests_agree(cluster)

    for i in cluster.ids:
        cluster.kill(i)
    cluster.start_all()
    cluster.wait_ready(timeout=TIMEOUT_S)
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        missing = [k for k, v in acknowledged.items() if kv.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
        kv.put(b"after-restart", b"yes")
        assert kv.get(b"after-restart") == b"yes"
    assert_digests_agree(cluster)


def raw_connection(address):
    sock = socket.create_connection(split_address(address), timeout=10)
    return sock


def closed_by_peer(sock):
    """True once the replica has closed the connection (EOF or reset)."""
    sock.settimeout(10)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff" + b"x" * 64,  # a 4 GiB length prefix
    struct.pack(">I", 5) + b"\xff\xfe\xfd\xfc\xfb",  # not CBOR
    wire.encode_frame(["client"]) + wire.encode_frame(["submit", 1, "not bytes"]),
    wire.encode_frame(["client"]) + wire.encode_frame(["nonsense"]),
    wire.encode_frame(["peer", "another-cluster", 2]),
    wire.encode_frame(["client"]) + struct.pack(">I", 64 << 20),  # oversized frame
], ids=["huge-length", "garbage", "wrong-type", "unknown-op", "foreign-peer", "oversized"])
def test_bad_bytes_cost_only_that_connection(cluster, payload):
    leader = cluster.address(cluster.leader_id())
    sock = raw_connection(leader)
    try:
        sock.sendall(payload)
        assert closed_by_peer(sock), "the replica kept a connection that broke the protocol"
    finally:
        sock.close()
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        kv.put(b"still", b"serving")
        assert kv.get(b"still") == b"serving"
    # Past the hello: dropped; before it (or with another cluster's id): refused.
    log = open(cluster.log_path(cluster.leader_id())).read()
    assert "dropped connection" in log or "refused a" in log


def test_oversized_command_is_refused_and_cluster_keeps_serving(cluster):
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        with pytest.raises(cypaxos.RequestError) as info:
            kv.put(b"big", b"x" * (wire.FRAME_BYTES_MAX + 1))
        assert info.value.maybe_applied is False
        kv.put(b"small", b"ok")
        assert kv.get(b"small") == b"ok"


def serve_command(cluster, replica_id):
    return cluster.command(replica_id)


def test_corrupt_wal_record_before_the_tail_refuses_to_start(cluster):
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        for i in range(300):
            kv.put(b"k%d" % i, b"v" * 64)
    victim = next(i for i in cluster.ids if i != cluster.leader_id())
    cluster.stop(victim)
    wal_dir = os.path.join(cluster.replica_data_dir(victim), "wal")
    segment = os.path.join(wal_dir, sorted(os.listdir(wal_dir))[-1])
    with open(segment, "rb") as f:
        size = wal_records_end(f.read())  # the rest of the segment is preallocated zeros
    with open(segment, "r+b") as f:  # flip one byte in the middle of the log
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = subprocess.run(serve_command(cluster, victim), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("cypaxos")]
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    assert os.path.basename(segment) in proc.stderr or "corrupt" in proc.stderr.lower(), proc.stderr
    # The two healthy replicas still serve.
    with cypaxos.connect(cluster.addresses, timeout=20.0) as kv:
        kv.put(b"after", b"corruption")
        assert kv.get(b"after") == b"corruption"


def test_read_lease_cluster_serves_linearizable_reads_across_failover(new_cluster):
    """`serve --read-lease --clock-drift-ms`: reads served under the leader's lease see
    every acknowledged write, before and after the leader is killed."""
    cluster = new_cluster(extra_args=["--read-lease", "--clock-drift-ms", "50"])
    cluster.start_all()
    cluster.wait_ready(timeout=TIMEOUT_S)
    statuses = cluster.statuses()
    # 250 ms election timeout - 50 ms drift bound - one 10 ms tick.
    assert {s["read_lease_ms"] for s in statuses.values()} == {190}
    with cypaxos.connect(cluster.cluster_arg, timeout=TIMEOUT_S) as kv:
        for i in range(50):
            kv.put(b"lease", b"v%d" % i)
            assert kv.get(b"lease") == b"v%d" % i
        cluster.kill(cluster.leader_id())
        for i in range(50, 80):
            kv.put(b"lease", b"v%d" % i)
            assert kv.get(b"lease") == b"v%d" % i
