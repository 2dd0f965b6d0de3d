"""Failures a new user meets when starting things: one line, a documented exit status.

Real processes and real files: a data dir whose newest snapshot file was deleted, a
`snapshots/` directory that cannot be written (made immutable when the tests run as
root, whom file modes do not stop), port ranges past 65535, bad log settings.
"""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys

import pytest

from cypaxos import cborenc
from cypaxos.client import connect
from cypaxos.protocol import REC_PROMISE
from cypaxos.storage.datadir import WAL_DIR
from cypaxos.storage.snapshots import SNAPSHOT_DIR
from cypaxos.storage.wal import Wal
from cypaxos.tools.local import LocalCluster, PARENT_PID_ENV, free_ports, probe_status
from test_cli import _env, assert_one_error_line, run_cli

pytestmark = pytest.mark.timeout(180)

SMALL_LOG = ("--wal-segment-bytes", "4096", "--retain-slots", "0")
"""Segments that fill after a few commands, so a snapshot lets whole ones go."""


def serve_argv(cluster: LocalCluster, replica_id: int = 1) -> list[str]:
    """`cluster`'s serve command line for a replica, as a user would type it."""
    return ["serve", *cluster.command(replica_id)[4:]]


def serve_once(cluster: LocalCluster, replica_id: int = 1, timeout: float = 60):
    """Run `cypaxos serve` for one of `cluster`'s replicas (stopped) to its exit."""
    env = _env()
    env.pop(PARENT_PID_ENV, None)
    return run_cli(*serve_argv(cluster, replica_id), env=env, timeout=timeout)


@contextlib.contextmanager
def read_only_dir(path: str):
    """Make directory `path` unwritable for this user (root included) while inside."""
    if os.geteuid() == 0:
        # Root ignores modes; an immutable directory refuses it too (ext4, xfs, ...).
        made = subprocess.run(["chattr", "+i", path], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make {path} immutable: {made.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    else:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)


def snapshot_rounds(cluster: LocalCluster, rounds: int, puts: int = 100) -> list[int]:
    """Write `puts` keys and take a snapshot, `rounds` times; the snapshots' indexes."""
    indexes = []
    with connect(cluster.cluster_arg, timeout=30) as kv:
        for r in range(rounds):
            for i in range(puts):
                kv.put(b"k%03d" % i, b"round %d" % r)
            answers = kv.snapshot()
            assert all(a.get("error") is None for a in answers), answers
            indexes.append(answers[0]["applied_index"])
    return indexes


# ------------------------------------------------------------------- snapshots


def test_a_deleted_newest_snapshot_is_one_line_and_exit_1(tmp_path):
    cluster = LocalCluster(1, ports=free_ports(1), data_dir=tmp_path, fsync=False,
                           extra_args=SMALL_LOG)
    with cluster:
        cluster.wait_ready(timeout=60)
        indexes = snapshot_rounds(cluster, 3)
        assert cluster.stop(1) == 0
    data_dir = cluster.replica_data_dir(1)
    snapshots = os.path.join(data_dir, SNAPSHOT_DIR)
    # The log was compacted behind the newest snapshot: it alone holds the early slots.
    assert sorted(os.listdir(snapshots)) == [f"snapshot-{i:020d}.snap" for i in indexes[-2:]]
    os.unlink(os.path.join(snapshots, f"snapshot-{indexes[-1]:020d}.snap"))

    line = assert_one_error_line(serve_once(cluster), 1, contains="cannot recover")
    assert data_dir in line

    # With no snapshot left at all: the same.
    for name in os.listdir(snapshots):
        os.unlink(os.path.join(snapshots, name))
    assert_one_error_line(serve_once(cluster), 1, contains=data_dir)


def test_a_promise_outside_the_ballot_space_is_one_line_and_exit_1(tmp_path):
    """What an older version persisted after a forged PREPARE with a round near 2**47
    (every later ballot overflowed): the replica refuses to start instead of wedging
    its cluster (docs/internals.md, "Ballots")."""
    cluster = LocalCluster(1, ports=free_ports(1), data_dir=tmp_path, fsync=False)
    with cluster:
        cluster.wait_ready(timeout=60)
        assert cluster.stop(1) == 0
    data_dir = cluster.replica_data_dir(1)
    wal = Wal.open(os.path.join(data_dir, WAL_DIR), fsync=False)
    try:
        wal.append(cborenc.dumps((REC_PROMISE, ((1 << 47) - 1) << 16 | 1)))
        wal.sync()
    finally:
        wal.close()
    line = assert_one_error_line(serve_once(cluster), 1, contains="outside the ballot space")
    assert data_dir in line and "replace it" in line


def test_a_read_only_snapshot_dir_stops_the_replica_with_one_line(tmp_path):
    cluster = LocalCluster(1, ports=free_ports(1), data_dir=tmp_path, fsync=False)
    data_dir = cluster.replica_data_dir(1)
    snapshots = os.path.join(data_dir, SNAPSHOT_DIR)
    with cluster:
        cluster.wait_ready(timeout=60)
        with connect(cluster.cluster_arg, timeout=30) as kv:
            kv.put(b"k", b"v")
        with read_only_dir(snapshots):
            result = run_cli("snapshot", "--cluster", cluster.cluster_arg)
            assert result.returncode in (1, 3), result  # the replica stops meanwhile
            assert cluster.process(1).wait(timeout=60) == 1
    with open(cluster.log_path(1)) as f:
        log = f.read()
    assert "Traceback" not in log, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("cypaxos: error: replica 1 stopped: storage failed: cannot write "
                           "snapshot file "), log
    assert snapshots in last

    # At start-up, a leftover temporary file it cannot remove: one line, exit 1.
    stray = os.path.join(snapshots, f"snapshot-{1:020d}.snap.tmp")
    with open(stray, "wb") as f:
        f.write(b"half a snapshot")
    with read_only_dir(snapshots):
        assert_one_error_line(serve_once(cluster), 1,
                              contains=f"cannot use the snapshot directory {snapshots}")
    # Writable again: it starts, and removes the leftover.
    with LocalCluster(1, ports=[int(cluster.address(1).rsplit(":", 1)[1])],
                      data_dir=tmp_path, fsync=False) as again:
        again.wait_ready(timeout=60)
        assert not os.path.exists(stray)
        with connect(again.cluster_arg, timeout=30) as kv:
            assert kv.get(b"k") == b"v"


# ------------------------------------------------------------------- port ranges


@pytest.mark.parametrize("args, contains", [
    (("local", "--port", "65535"), "65535..65537"),
    (("local", "--port", "65500", "--replicas", "63"), "65500..65562"),
    (("local", "--replicas", "64"), "--replicas"),
    (("demo", "--port", "65534"), "65534..65536"),
    (("bench", "--port", "65534"), "65534..65536"),
    (("bench", "--port", "7001", "--cluster", "127.0.0.1:7001"), "--cluster"),
    (("local", "--port", "65536"), "--port"),
    (("demo", "--port", "0"), "--port"),
])
def test_port_ranges_past_65535_are_bad_usage(args, contains):
    assert_one_error_line(run_cli(*args), 2, contains=contains)


# ------------------------------------------------------------------ log settings


def test_log_level_env_in_lower_case(tmp_path):
    port = free_ports(1)[0]
    env = _env(CYPAXOS_LOG_LEVEL="debug")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cypaxos", "serve", "--insecure", "--id", "1", "--cluster",
         f"1=127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
        stderr=subprocess.PIPE, env=env, text=True)
    try:
        seen = []
        for line in proc.stderr:  # the replica logs this line once it serves
            seen.append(line)
            if "serving on" in line:
                break
        assert "serving on" in seen[-1], "".join(seen)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("env, args, contains", [
    ({"CYPAXOS_LOG_LEVEL": "loud"}, (), "CYPAXOS_LOG_LEVEL 'loud'"),
    ({"CYPAXOS_LOG_FORMAT": "xml"}, (), "CYPAXOS_LOG_FORMAT 'xml'"),
    ({}, ("--log-level", "loud"), "--log-level"),
    ({}, ("--log-format", "yaml"), "--log-format"),
])
def test_bad_log_settings_are_bad_usage(tmp_path, env, args, contains):
    for command in (["serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{free_ports(1)[0]}",
                     "--data-dir", str(tmp_path / "d")],
                    ["local", "--port", str(free_ports(1)[0]), "--replicas", "1"]):
        result = run_cli(*command, *args, env=_env(**env))
        assert_one_error_line(result, 2, contains=contains)
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_the_replica_launcher_takes_a_lower_case_level_too(tmp_path, monkeypatch):
    # run_server() itself (what OptionsCluster and embedders call) reads the variable.
    from cypaxos.tools.local import OptionsCluster

    monkeypatch.setenv("CYPAXOS_LOG_LEVEL", "warning")
    with OptionsCluster(1, ports=free_ports(1), data_dir=tmp_path, fsync=False) as cluster:
        cluster.wait_ready(timeout=60)
        assert probe_status(cluster.address(1))["role"] == "leader"
        assert cluster.stop(1) == 0
    with open(cluster.log_path(1)) as f:
        log = f.read()
    assert "serving on" not in log  # an INFO line, below the level asked for
    assert "Traceback" not in log
