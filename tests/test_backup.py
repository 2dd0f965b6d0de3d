"""`cypaxos backup` / `kv.backup(path)` and `cypaxos restore`, against real clusters.

Under load: writers record every write the cluster acknowledged; the backup is taken
while they run; a new cluster is restored from it (every replica from the same file)
and every key is compared.  Every write acknowledged before the backup started is in
it, and the new cluster holds exactly the backup's state and takes writes.  A corrupt
file or a data dir that is not empty is refused with one line and nothing written.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

import cypaxos
from cypaxos.commands import decode_get, encode_get
from cypaxos.statemachine import KVStore
from cypaxos.storage.restore import read_backup
from cypaxos.tools.local import PACKAGE_ROOT, free_ports
from test_cli import _env, assert_one_error_line, run_cli

pytestmark = pytest.mark.timeout(300)

WRITERS = 4
KEYS_PER_WRITER = 50


class Writer(threading.Thread):
    """Writes KEYS_PER_WRITER keys of its own over and over, versions increasing, and
    records when each write was acknowledged."""

    def __init__(self, kv, n: int) -> None:
        super().__init__(daemon=True)
        self.kv = kv
        self.n = n
        self.stop = threading.Event()
        self.acked: dict[bytes, list[tuple[float, int]]] = {}   # key -> [(ack time, version)]
        self.failure: BaseException | None = None

    def key(self, i: int) -> bytes:
        return b"w%d-k%03d" % (self.n, i)

    def run(self) -> None:
        version = 0
        try:
            while not self.stop.is_set():
                version += 1
                for i in range(KEYS_PER_WRITER):
                    key = self.key(i)
                    self.kv.put(key, b"%d" % version)
                    self.acked.setdefault(key, []).append((time.monotonic(), version))
        except BaseException as exc:   # reported by the test
            self.failure = exc


def backup_state(path) -> KVStore:
    _, (_, _, _, state) = read_backup(str(path))
    store = KVStore()
    store.restore(state)
    return store


def value_in(store: KVStore, key: bytes):
    return decode_get(store.query(encode_get(key)))


def test_backup_under_load_restores_every_acknowledged_write(new_cluster, tmp_path):
    source = new_cluster()
    source.start_all()
    source.wait_ready(timeout=60)
    path = tmp_path / "backups" / "nightly.cpxbak"
    path.parent.mkdir()
    with cypaxos.connect(source.cluster_arg, timeout=30) as kv:
        writers = [Writer(kv, n) for n in range(WRITERS)]
        for w in writers:
            w.start()
        try:
            deadline = time.monotonic() + 60
            while min(len(w.acked) for w in writers) < KEYS_PER_WRITER:
                assert time.monotonic() < deadline and not any(w.failure for w in writers)
                time.sleep(0.05)
            started = time.monotonic()
            info = kv.backup(path)
            finished = time.monotonic()
            # Writes go on while the backup runs, and after.
            count_at_end = sum(len(v) for w in writers for v in w.acked.values())
            while sum(len(v) for w in writers for v in w.acked.values()) < count_at_end + 50:
                assert not any(w.failure for w in writers)
                time.sleep(0.05)
        finally:
            for w in writers:
                w.stop.set()
            for w in writers:
                w.join(timeout=60)
        assert not any(w.failure for w in writers), [w.failure for w in writers]
    assert info.path == str(path) and info.size_bytes == os.path.getsize(path)
    assert not [n for n in os.listdir(path.parent) if n != path.name]   # no temporary left

    store = backup_state(path)
    acked_after = 0
    for w in writers:
        for i in range(KEYS_PER_WRITER):
            key = w.key(i)
            before = [v for t, v in w.acked[key] if t < started]
            got = value_in(store, key)
            assert got is not None, key
            if before:
                assert int(got) >= max(before), (key, got, before)
            # Nothing acknowledged only after the backup ended can be newer than it.
            latest_by_end = max(v for t, v in w.acked[key] if t <= finished)
            assert int(got) <= latest_by_end + 1, (key, got, latest_by_end)
            acked_after += sum(1 for t, _ in w.acked[key] if t >= finished)
    assert acked_after > 0

    # A new cluster, every replica restored from the same file.
    target = new_cluster()
    for replica_id in target.ids:
        result = run_cli("restore", str(path), "--id", str(replica_id), "--cluster",
                         target.cluster_spec, "--data-dir", target.replica_data_dir(replica_id))
        assert result.returncode == 0, result.stderr.decode()
        assert b"restored replica %d" % replica_id in result.stdout
    target.start_all()
    target.wait_ready(timeout=60)
    with cypaxos.connect(target.cluster_arg, timeout=30) as kv:
        for w in writers:
            for i in range(KEYS_PER_WRITER):
                key = w.key(i)
                assert kv.get(key) == value_in(store, key), key
        kv.put(b"after-restore", b"yes")
        assert kv.get(b"after-restore") == b"yes"
    statuses = target.statuses()
    assert all(st["applied_index"] > info.index for st in statuses.values()), statuses
    assert all(st["cluster_id"] != info.cluster_id for st in statuses.values())


def test_backup_cli_and_what_restore_refuses(running_cluster, tmp_path):
    cluster = running_cluster
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"k", b"v")
    tmp_path = tmp_path / "work"   # beside the cluster's data
    tmp_path.mkdir()
    path = tmp_path / "b.cpxbak"
    path.write_bytes(b"an older backup")
    # Given only a follower, the backup follows its redirect to the leader.
    leader = cluster.leader_id()
    follower = next(i for i in cluster.ids if i != leader)
    result = run_cli("backup", "--cluster", cluster.address(follower), str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert b"written to " + str(path).encode() in result.stdout
    assert b"from replica %d)" % leader in result.stdout
    good = path.read_bytes()
    assert good != b"an older backup"
    assert value_in(backup_state(path), b"k") == b"v"

    # An unreachable cluster: one line, exit 3, the file as it was.
    port = free_ports(1)[0]
    result = run_cli("backup", "--cluster", f"127.0.0.1:{port}", "--timeout", "1", str(path))
    assert_one_error_line(result, 3, contains="no leader answered the backup")
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["b.cpxbak"]

    spec = f"1=127.0.0.1:{port}"
    # A corrupt file: one flipped byte in the state.
    bad = tmp_path / "bad.cpxbak"
    bad.write_bytes(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])
    result = run_cli("restore", str(bad), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "new"))
    assert_one_error_line(result, 1, contains="fails its checksum")
    # A truncated one, and one that is no backup at all.
    bad.write_bytes(good[:100])
    result = run_cli("restore", str(bad), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "new"))
    assert_one_error_line(result, 1, contains="backup file")
    bad.write_bytes(b"hello")
    result = run_cli("restore", str(bad), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "new"))
    assert_one_error_line(result, 1, contains="truncated")
    assert not (tmp_path / "new").exists()
    # A data dir that is not empty.
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes").write_text("mine")
    result = run_cli("restore", str(path), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "used"))
    assert_one_error_line(result, 1, contains="is not empty")
    assert os.listdir(tmp_path / "used") == ["notes"]
    # A missing file, an id not in --cluster.
    result = run_cli("restore", str(tmp_path / "nope"), "--id", "1", "--cluster", spec,
                     "--data-dir", str(tmp_path / "new"))
    assert_one_error_line(result, 1, contains="cannot read backup file")
    result = run_cli("restore", str(path), "--id", "2", "--cluster", spec, "--data-dir",
                     str(tmp_path / "new"))
    assert_one_error_line(result, 2, contains="--id 2 is not in --cluster")
    assert not (tmp_path / "new").exists()
    # A backup of another state machine than the one named.
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "examples")
    env = _env(PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, examples]))
    result = run_cli("restore", str(path), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "new"), "--state-machine", "ledger:Ledger", env=env)
    assert_one_error_line(result, 1, contains="does not restore into the state machine")
    assert not (tmp_path / "new").exists()
    # An empty directory is fine, and is replaced whole.
    (tmp_path / "empty").mkdir()
    result = run_cli("restore", str(path), "--id", "1", "--cluster", spec, "--data-dir",
                     str(tmp_path / "empty"))
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(os.listdir(tmp_path / "empty")) == ["identity.json", "snapshots", "wal"]
    assert not [n for n in os.listdir(tmp_path) if ".restore-" in n]
