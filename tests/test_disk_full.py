"""A full disk, or a failing one, stops that one replica, not the cluster.

DESIGN.md section 8: a storage fault fail-stops the replica.  Here real `cypaxos
serve` processes (`LocalCluster`) run with every replica's data dir on a file system
of its own that the test can break once a leader is elected:

* a full disk: a tmpfs shrunk to what the replica holds plus one and a half WAL
  segments (``--wal-segment-bytes`` 1 MiB), so the preallocated segment and the next
  one fit but a sustained write load soon needs a segment there is no room for
  (ENOSPC);
* a failing disk: an ext4 image on a loop device, shut down under the replica with
  ``EXT4_IOC_SHUTDOWN`` (every write and fsync after it: EIO);
* a file system that turns read-only: the same, mounted ``errors=remount-ro``, told
  it found an error (``/sys/fs/ext4/DEV/trigger_fs_error``): EROFS from then on;
* a snapshot directory nothing can be created in (``chattr +i``: EPERM, even for
  root), with snapshots every 256 KiB of WAL: the snapshot path fails, not the WAL.

A client writes throughout and keeps every acknowledged key.  The broken replica must
exit 1 with one line naming the file that failed (no traceback, no other error line);
the other two must elect a leader if need be and go on taking writes; once the disk
is usable again (room made, or the file system mounted again) the replica restarts,
catches up, and every acknowledged write reads back with every replica's state digest
equal.

They need root (to mount) and Linux; elsewhere they skip, saying why.  One more, run
everywhere, breaks a one-replica server's WAL in process (its segment's fd swapped
for a read-only one) and checks that a write error met while answering a client
stops the server, rather than only that client's connection.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
import trio

import cypaxos
from cypaxos.errors import StorageError
from cypaxos.groups import BaseExceptionGroup, expected_error
from cypaxos.replica.options import ServerOptions
from cypaxos.replica.server import serve
from cypaxos.storage.wal import segment_name
from cypaxos.tools.local import free_ports

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
SEGMENT_BYTES = 1 * MiB       # --wal-segment-bytes: a few MiB of writes fill the disk
ROOMY = 64 * MiB              # a data dir's tmpfs before it is shrunk, and after
VALUE_BYTES = 4096
WRITES_AFTER_STOP = 200       # writes the two others must take once the replica stopped
TIMEOUT_S = 60.0
EXT4_IOC_SHUTDOWN = 0x8004587D    # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2   # as a dying disk: nothing more reaches it


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


class Mounts:
    """The file systems mounted for one test; `unmount_all` removes them."""

    def __init__(self) -> None:
        self.points: list[str] = []
        self.images: dict[str, str] = {}   # mount point -> its ext4 image
        self.devices: dict[str, str] = {}  # mount point -> the loop device mounted there

    def _may(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            if not self.points:   # the first mount tells whether this host allows any
                pytest.skip(f"cannot {what} here: {' '.join(result.stderr.split())}")
            raise AssertionError(f"{what}: {result.stderr.strip()}")

    def _mount(self, *argv: str) -> None:
        self._may(_run("mount", *argv), f"mount {' '.join(argv)}")
        self.points.append(argv[-1])

    def tmpfs(self, path: str, size: int) -> None:
        os.makedirs(path, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)

    def resize(self, path: str, size: int) -> None:
        result = _run("mount", "-o", f"remount,size={size}", path)
        assert result.returncode == 0, result.stderr

    def ext4(self, path: str, image: str, size: int) -> None:
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("no mkfs.ext4 on this host")
        with open(image, "wb") as f:
            f.truncate(size)
        result = _run("mkfs.ext4", "-q", "-F", image)
        assert result.returncode == 0, result.stderr
        self.images[path] = image
        self.mount_image(path)
        os.rmdir(os.path.join(path, "lost+found"))   # a fresh data dir holds nothing else

    def mount_image(self, path: str) -> None:
        """Mount the image of `path` from a loop device of its own.

        Never ``mount -o loop``: it reuses a loop device still bound to the image,
        and an unmounted file system can live on, broken (after a lazy unmount, or
        as a copy of the mount in another process's mount namespace: ``ip netns
        exec`` copies every mount), so mounting that device again could bring back
        the broken file system instead of reading the image.
        """
        os.makedirs(path, exist_ok=True)
        result = _run("losetup", "--find", "--show", self.images[path])
        self._may(result, "attach a loop device")
        device = self.devices[path] = result.stdout.strip()
        self._mount("-o", "errors=remount-ro", device, path)

    def check_image(self, path: str) -> None:
        """fsck the unmounted ext4 image of `path`, as an operator would."""
        result = _run("e2fsck", "-f", "-y", self.images[path])
        assert result.returncode in (0, 1), result.stdout + result.stderr   # 1: fixed

    def unmount(self, path: str) -> None:
        result = _run("umount", path)
        if result.returncode != 0:
            _run("umount", "-l", path)   # never leave a mount behind a failed test
        self.points.remove(path)
        device = self.devices.pop(path, None)
        if device is not None:
            _run("losetup", "-d", device)   # detached once nothing holds it

    def unmount_all(self) -> None:
        for path in reversed(list(self.points)):
            self.unmount(path)
        for device in self.devices.values():   # attached, but its mount failed
            _run("losetup", "-d", device)
        self.devices.clear()


@pytest.fixture
def mounts(new_cluster):
    """Mounts for data dirs; the clusters stop before their file systems go."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux (tmpfs, loop devices, EXT4_IOC_SHUTDOWN)")
    if os.geteuid() != 0:
        pytest.skip("needs root: the data dirs are file systems this test mounts")
    m = Mounts()
    try:
        yield m
    finally:
        new_cluster.close()
        m.unmount_all()


def start_cluster(new_cluster, mounts, mount_one, *extra_args: str):
    """A 3-replica cluster (fsync always, 1 MiB segments, `extra_args`) whose
    replicas' data dirs are file systems `mount_one(path)` mounts; started, with a
    leader."""
    cluster = new_cluster(
        extra_args=("--wal-segment-bytes", str(SEGMENT_BYTES), *extra_args))
    for replica_id in cluster.ids:
        mount_one(cluster.replica_data_dir(replica_id))
    cluster.start_all()
    cluster.wait_ready(timeout=TIMEOUT_S)
    return cluster


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def fill_soon(mounts: Mounts, path: str) -> None:
    """Shrink the tmpfs at `path` to what it holds plus one and a half segments: the
    next segment's zero fill fits, the one after it does not."""
    size = used_bytes(path) + SEGMENT_BYTES + SEGMENT_BYTES // 2
    mounts.resize(path, -(-size // 4096) * 4096)


def shut_down(path: str) -> None:
    """Make the ext4 file system at `path` fail every write and fsync (EIO)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def turn_read_only(path: str) -> None:
    """Make the ext4 file system at `path` (mounted errors=remount-ro) find an error:
    it remounts itself read-only, every write after it fails with EROFS."""
    device = os.path.basename(_run("findmnt", "-n", "-o", "SOURCE", path).stdout.strip())
    trigger = f"/sys/fs/ext4/{device}/trigger_fs_error"
    if not os.path.exists(trigger):
        pytest.skip(f"this kernel has no {trigger}")
    with open(trigger, "w") as f:
        f.write("cypaxos test: a disk error\n")


def write_until_stopped(cluster, kv, victim: int, acked: dict, break_disk=None) -> None:
    """Write one key at a time (recording each acknowledged one) until replica
    `victim` has exited and WRITES_AFTER_STOP more writes were acknowledged.

    `break_disk()`, if given, is called after 100 writes.  Fails if the replica is
    still running after TIMEOUT_S of writes (a broken disk did not stop it); a write
    that fails (a cluster that stopped taking writes) fails the test itself.
    """
    deadline = time.monotonic() + TIMEOUT_S
    process = cluster.process(victim)
    stopped_at = None
    n = 0
    while stopped_at is None or n < stopped_at + WRITES_AFTER_STOP:
        if n == 100 and break_disk is not None:
            break_disk()
        key = b"key-%06d" % n
        value = os.urandom(VALUE_BYTES)
        kv.put(key, value)
        acked[key] = value
        n += 1
        if stopped_at is None:
            if process.poll() is not None:
                stopped_at = n
            elif time.monotonic() > deadline:
                path = cluster.replica_data_dir(victim)
                raise AssertionError(
                    f"replica {victim} still runs after {n} writes of {VALUE_BYTES} bytes "
                    f"with a broken disk ({used_bytes(path)} bytes used in {path}): "
                    f"{cluster.log_tail(victim, 3)}")


def assert_stopped_with_one_line(cluster, victim: int, error: str) -> str:
    """Replica `victim` exited 1, its last line is the one error line, naming a file
    of its data dir and matching `error`, with no traceback; returns that line."""
    assert cluster.process(victim).wait(timeout=TIMEOUT_S) == 1
    with open(cluster.log_path(victim), encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines
              if re.search(r" (ERROR|CRITICAL) ", line) or line.startswith("cypaxos: error:")]
    assert errors == [lines[-1]], log
    path = re.escape(cluster.replica_data_dir(victim) + os.sep)
    pattern = (rf"cypaxos: error: replica {victim} stopped: storage failed: "
               rf"{error}.* {path}\S+ ")
    assert re.match(pattern, lines[-1]), lines[-1]
    return lines[-1]


def wait_converged(cluster) -> dict:
    """Every replica answers, all at one applied index and state digest."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        statuses = cluster.statuses(timeout=5.0)
        if all(statuses.values()) and len(
                {(s["applied_index"], s["state_digest"]) for s in statuses.values()}) == 1:
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError("replicas did not converge: " + repr(
                {i: s and (s["role"], s["applied_index"], s["state_digest"])
                 for i, s in statuses.items()}))
        time.sleep(0.1)


def assert_every_write_reads_back(kv, acked: dict) -> None:
    keys = sorted(acked)
    for start in range(0, len(keys), 100):
        chunk = keys[start:start + 100]
        got = kv.get_many(chunk)
        lost = [k for k, v in zip(chunk, got) if v != acked[k]]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"


def run_broken_disk(cluster, victim: int, error: str, break_disk=None, repair=None) -> None:
    """The scenario: write through the break, check the stop, repair, restart, check."""
    others = [i for i in cluster.ids if i != victim]
    acked: dict[bytes, bytes] = {}
    with cypaxos.connect(cluster.addresses, timeout=30.0) as kv:
        write_until_stopped(cluster, kv, victim, acked, break_disk)
        assert_stopped_with_one_line(cluster, victim, error)
        # The two others took WRITES_AFTER_STOP writes since; they have a leader.
        assert cluster.wait_ready(timeout=TIMEOUT_S, replicas=others) in others
        if repair is not None:
            repair()
        cluster.start(victim)
        cluster.wait_ready(timeout=TIMEOUT_S)
        statuses = wait_converged(cluster)
        assert statuses[victim]["applied_index"] >= len(acked)
        assert_every_write_reads_back(kv, acked)


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_full_disk_stops_one_replica_and_the_others_keep_writing(new_cluster, mounts, role):
    cluster = start_cluster(new_cluster, mounts, lambda path: mounts.tmpfs(path, ROOMY))
    leader = cluster.wait_ready(timeout=TIMEOUT_S)
    victim = leader if role == "leader" else next(i for i in cluster.ids if i != leader)
    path = cluster.replica_data_dir(victim)
    fill_soon(mounts, path)
    assert cluster.leader_id() == leader   # the role this test is about, as it starts
    run_broken_disk(cluster, victim, "No space left on device",
                    repair=lambda: mounts.resize(path, ROOMY))


@pytest.mark.parametrize("fault, role", [("EIO", "leader"), ("EROFS", "follower")])
def test_a_failing_disk_stops_one_replica_and_the_others_keep_writing(
        new_cluster, mounts, tmp_path, fault, role):
    cluster = start_cluster(new_cluster, mounts, lambda path: mounts.ext4(
        path, str(tmp_path / (os.path.basename(path) + ".img")), 48 * MiB))
    leader = cluster.wait_ready(timeout=TIMEOUT_S)
    victim = leader if role == "leader" else next(i for i in cluster.ids if i != leader)
    path = cluster.replica_data_dir(victim)
    if fault == "EIO":
        break_disk, error = (lambda: shut_down(path)), r"(\w+ failed \()?Input/output error"
    else:
        break_disk, error = (lambda: turn_read_only(path)), r"(\w+ failed \()?Read-only file system"

    def repair():
        # What an operator does once the disk is replaced or checked: fsck it, mount
        # it again (ext4 replays its journal), then start the replica.
        mounts.unmount(path)
        mounts.check_image(path)
        mounts.mount_image(path)

    assert cluster.leader_id() == leader   # the role this test is about, as it starts
    run_broken_disk(cluster, victim, error, break_disk=break_disk, repair=repair)


def test_a_snapshot_that_cannot_be_written_stops_the_replica(new_cluster, mounts):
    cluster = start_cluster(new_cluster, mounts, lambda path: mounts.tmpfs(path, ROOMY),
                            "--snapshot-bytes", str(256 << 10))
    leader = cluster.wait_ready(timeout=TIMEOUT_S)
    victim = next(i for i in cluster.ids if i != leader)
    snapshots = os.path.join(cluster.replica_data_dir(victim), "snapshots")

    def forbid():
        result = _run("chattr", "+i", snapshots)
        if result.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")

    def repair():
        result = _run("chattr", "-i", snapshots)
        assert result.returncode == 0, result.stderr

    try:
        run_broken_disk(cluster, victim, "cannot write snapshot file", break_disk=forbid,
                        repair=repair)
    finally:
        _run("chattr", "-i", snapshots)   # or the directory outlives the test


async def test_a_write_error_met_while_answering_a_client_stops_the_server(tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    data_dir = tmp_path / "replica1"
    options = ServerOptions(replica_id=1, cluster={1: address}, data_dir=str(data_dir),
                            insecure=True)
    segment = data_dir / "wal" / segment_name(1)
    with trio.fail_after(TIMEOUT_S), pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, options)
            async with cypaxos.open_client([address], timeout=TIMEOUT_S) as kv:
                await kv.put(b"key", b"written")
                # The segment's fd now refuses writes (EBADF), as a dying disk would.
                read_only = os.open(segment, os.O_RDONLY)
                os.dup2(read_only, server.storage.wal._fd)
                os.close(read_only)
                # A lone request is driven from the client's connection: its append
                # and flush fail there.  The server stops (cancelling this put).
                await kv.put(b"key", b"never acknowledged")
    error = expected_error(raised.value, StorageError)
    assert isinstance(error, StorageError), raised.value
    assert str(error).startswith(
        f"replica 1 stopped: storage failed: Bad file descriptor: {segment} "), error
