"""`serve` and its data dir: nothing is written before the port is bound, and an
identity that does not match the command line says what differs and the way out.

Real processes and real files: a serve that cannot bind (an address that is not this
host's, a port in use, a metrics address in use) must leave the data dir exactly as
it was, so that the corrected command works.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from cypaxos.tools.local import LocalCluster, free_ports
from test_cli import _env, assert_one_error_line, run_cli

pytestmark = pytest.mark.timeout(180)

NOT_LOCAL = "203.0.113.7"   # TEST-NET-3: never an address of this host


def tree(path) -> dict:
    """Every file and directory under `path` with its size and mtime (None: missing)."""
    if not os.path.exists(path):
        return {}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


def serve_args(port: int, data_dir, *extra: str) -> list[str]:
    return ["serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{port}", "--data-dir",
            str(data_dir), "--fsync", "off", *extra]


def serve_until_serving(args: list[str]) -> None:
    """Run `cypaxos ARGS` until it logs that it serves, then stop it (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "cypaxos", *args],
                            stderr=subprocess.PIPE, env=_env(), text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                break
        else:
            raise AssertionError("serve did not start: " + "".join(lines))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_serve_that_cannot_bind_creates_no_data_dir(tmp_path):
    port = free_ports(1)[0]
    fresh = tmp_path / "fresh"
    result = run_cli(*serve_args(port, fresh, "--listen", f"{NOT_LOCAL}:{port}"))
    line = assert_one_error_line(result, 1, contains=f"cannot listen on {NOT_LOCAL}:{port}")
    assert "not an address of this host" in line
    assert not fresh.exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_cli(*serve_args(port, fresh))
        assert_one_error_line(result, 1, contains="another process holds the port")
    assert not fresh.exists()
    # The corrected command works at once.
    serve_until_serving(serve_args(port, fresh))
    assert (fresh / "identity.json").exists()


def used_data_dir(tmp_path, port: int) -> str:
    """The data dir of a one-replica cluster on `port` that ran and stopped cleanly."""
    with LocalCluster(1, ports=[port], data_dir=tmp_path, fsync=False) as cluster:
        cluster.wait_ready(timeout=60)
        assert cluster.stop(1) == 0
        return cluster.replica_data_dir(1)


def test_a_serve_that_cannot_bind_leaves_a_data_dir_as_it_was(tmp_path):
    ports = free_ports(2)
    data_dir = used_data_dir(tmp_path, ports[0])
    before = tree(data_dir)
    assert before
    result = run_cli(*serve_args(ports[0], data_dir, "--listen", f"{NOT_LOCAL}:{ports[0]}"))
    assert_one_error_line(result, 1, contains="cannot listen on")
    assert tree(data_dir) == before
    # A metrics address that cannot be bound is refused before the data dir too.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[1]))
        busy.listen()
        result = run_cli(*serve_args(ports[0], data_dir, "--metrics-address",
                                     f"127.0.0.1:{ports[1]}"))
        assert_one_error_line(result, 1, contains=f"--metrics-address 127.0.0.1:{ports[1]}")
    assert tree(data_dir) == before
    serve_until_serving(serve_args(ports[0], data_dir))


def test_an_identity_mismatch_says_what_differs_and_the_way_out(tmp_path):
    ports = free_ports(2)
    data_dir = used_data_dir(tmp_path, ports[0])
    before = tree(data_dir)
    one = f"1=127.0.0.1:{ports[0]}"
    two = f"2=127.0.0.1:{ports[1]}"

    # The replica id differs (same cluster: --cluster-id names it).
    from cypaxos.replica.options import default_cluster_id
    cluster_id = default_cluster_id({1: f"127.0.0.1:{ports[0]}"})
    result = run_cli("serve", "--insecure", "--id", "2", "--cluster", f"{one},{two}", "--cluster-id",
                     cluster_id, "--data-dir", data_dir)
    line = assert_one_error_line(result, 1, contains="replica 1, not replica 2 (--id)")
    assert "start replica 1 with it (--id 1)" in line and "its own --data-dir" in line
    assert "cluster" not in line.split("belongs to", 1)[1].split(";")[0]

    # The cluster differs because --cluster does (a new address for replica 1).
    moved = f"1=127.0.0.1:{ports[1]}"
    result = run_cli("serve", "--insecure", "--id", "1", "--cluster", moved, "--data-dir", data_dir)
    line = assert_one_error_line(result, 1, contains=f"cluster {cluster_id!r}, not")
    assert "derived from --cluster" in line
    assert f"pass --cluster-id {cluster_id} to every replica" in line
    assert "move this data dir away" in line

    # An explicit --cluster-id that differs names that flag.
    result = run_cli("serve", "--insecure", "--id", "1", "--cluster", one, "--cluster-id", "another",
                     "--data-dir", data_dir)
    line = assert_one_error_line(result, 1, contains="not 'another' (--cluster-id)")

    # Both at once.
    result = run_cli("serve", "--insecure", "--id", "2", "--cluster", f"{one},{two}", "--data-dir",
                     data_dir)
    line = assert_one_error_line(result, 1, contains="replica 1, not replica 2")
    assert f"cluster {cluster_id!r}, not" in line
    assert tree(data_dir) == before

    # The way out it names works: the same data dir at a new address.
    serve_until_serving(["serve", "--insecure", "--id", "1", "--cluster", moved, "--cluster-id",
                         cluster_id, "--data-dir", data_dir, "--fsync", "off"])
