"""The `cypaxos` command line, run as real subprocesses against real replicas.

Covers docs/cli.md: argument errors are one line and exit 2, an unreachable cluster
exits 3, `serve` refuses a foreign data dir or a busy port with one line, the key-value
commands and `status --json` against a LocalCluster, `cypaxos local` stopping cleanly
on SIGINT/SIGTERM, and `cypaxos demo` passing.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cypaxos.tools.local import LocalCluster, child_env, free_ports


def _env(**extra) -> dict:
    # The children must import the same cypaxos as this test (an in-tree build or the
    # installed wheel), whatever the current directory is.
    env = child_env(extra)
    if "CYPAXOS_CLUSTER" not in extra:
        env.pop("CYPAXOS_CLUSTER", None)
    return env


def run_cli(*args, timeout: float = 60, env: dict | None = None, **kwargs):
    """Run `python -m cypaxos ARGS...` to completion; returns the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "-m", "cypaxos", *args], capture_output=True,
                          timeout=timeout, env=env or _env(), **kwargs)


def assert_one_error_line(result, code: int, *, contains: str = "") -> str:
    """The process exited `code` and said exactly one `cypaxos: error:` line."""
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cypaxos: error: "), err
    assert contains.lower() in lines[0].lower(), err
    return lines[0]


@contextlib.contextmanager
def started_local(*args, env: dict | None = None):
    """`cypaxos local ARGS...` running, its banner printed (so it has a leader).

    Yields (Popen with text pipes, the banner); the caller stops it (a signal) or
    it is killed when the block ends.
    """
    proc = subprocess.Popen([sys.executable, "-m", "cypaxos", "local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env or _env(), text=True)
    try:
        banner = []
        for line in proc.stdout:  # the banner comes once the cluster has a leader
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        text = "".join(banner)
        assert "Press Ctrl-C" in text, (text, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def replicas_alive(ports) -> list[int]:
    """Pids of `cypaxos serve` processes serving any of `ports` (from /proc)."""
    pids = []
    needles = [f"127.0.0.1:{p}".encode() for p in ports]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if b"serve" in cmdline and not zombie and any(n in cmdline for n in needles):
            pids.append(int(entry))
    return pids


# ------------------------------------------------------------------ bad usage


@pytest.mark.parametrize("args, contains", [
    ((), "required: COMMAND"),
    (("serve", "--insecure", "--id", "1"), "required"),
    (("serve", "--insecure", "--id", "x", "--cluster", "1=127.0.0.1:7001", "--data-dir", "d"), "--id"),
    (("serve", "--insecure", "--id", "4", "--cluster", "1=127.0.0.1:7001", "--data-dir", "d"), "--id 4"),
    (("serve", "--insecure", "--id", "1", "--cluster", "1=localhost", "--data-dir", "d"), "HOST:PORT"),
    (("serve", "--insecure", "--id", "1", "--cluster", "1=127.0.0.1:7001", "--data-dir", "d",
      "--fsync", "sometimes"), "--fsync"),
    (("put", "--cluster", "nonsense", "k", "v"), "--cluster"),
    (("get", "--cluster", "127.0.0.1:70000", "k"), "--cluster"),
    (("put", "k"), "required"),
    (("get", "--timeout", "-1", "k"), "--timeout"),
    (("cas", "k", "new"), "EXPECTED"),
    (("cas", "--absent", "k", "old", "new"), "--absent"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_usage_is_one_line_and_exit_2(args, contains):
    assert_one_error_line(run_cli(*args), 2, contains=contains)


def test_unreachable_cluster_is_one_line_and_exit_3():
    port = free_ports(1)[0]  # nothing listens there
    for args in (("put", "k", "v"), ("get", "k"), ("delete", "k"), ("cas", "k", "a", "b")):
        result = run_cli(*args, "--cluster", f"127.0.0.1:{port}", "--timeout", "0.5")
        assert_one_error_line(result, 3)
    result = run_cli("status", "--cluster", f"127.0.0.1:{port}", "--json", "--timeout", "0.5")
    assert_one_error_line(result, 3, contains="no replica")
    doc = json.loads(result.stdout)
    assert [r["reachable"] for r in doc["replicas"]] == [False]


# ---------------------------------------------------------------------- serve


def test_serve_refuses_a_data_dir_of_another_replica_or_cluster(tmp_path):
    ports = free_ports(1)
    with LocalCluster(replicas=1, ports=ports, data_dir=tmp_path) as cluster:
        cluster.wait_ready(timeout=30)
        data_dir = cluster.replica_data_dir(1)
        assert cluster.stop(1) == 0  # SIGTERM: a clean exit
    # The same dir, told it is replica 2 of a 2-replica cluster:
    spec = f"1=127.0.0.1:{ports[0]},2=127.0.0.1:{free_ports(1)[0]}"
    result = run_cli("serve", "--insecure", "--id", "2", "--cluster", spec, "--data-dir", data_dir)
    assert_one_error_line(result, 1, contains="belongs to")
    # ... or replica 1 of a cluster with another id:
    result = run_cli("serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{ports[0]}",
                     "--cluster-id", "another", "--data-dir", data_dir)
    assert_one_error_line(result, 1, contains="belongs to")
    # A directory holding something else is not taken over either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = run_cli("serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{ports[0]}",
                     "--data-dir", str(tmp_path / "other"))
    assert_one_error_line(result, 1, contains="not a cypaxos data dir")


def test_serve_on_a_busy_port_is_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{port}",
                         "--data-dir", str(tmp_path / "d"))
    assert_one_error_line(result, 1, contains=str(port))


# --------------------------------------------------------- client commands


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    """The module's 3-replica cluster (fsync off: these tests are about the CLI)."""
    return shared_cluster


def test_put_get_delete(cluster):
    c = ("--cluster", cluster.cluster_arg)
    put = run_cli("put", *c, "greeting", "hello world")
    assert (put.returncode, put.stdout, put.stderr) == (0, b"ok\n", b"")
    get = run_cli("get", *c, "greeting")
    assert (get.returncode, get.stdout, get.stderr) == (0, b"hello world", b"")
    stale = run_cli("get", "--stale", *c, "greeting")  # any replica; may lag, so poll
    deadline = time.monotonic() + 10
    while stale.stdout != b"hello world" and time.monotonic() < deadline:
        time.sleep(0.1)
        stale = run_cli("get", "--stale", *c, "greeting")
    assert (stale.returncode, stale.stdout) == (0, b"hello world")

    deleted = run_cli("delete", *c, "greeting")
    assert (deleted.returncode, deleted.stdout) == (0, b"deleted\n")
    again = run_cli("delete", *c, "greeting")
    assert (again.returncode, again.stdout, again.stderr) == (1, b"", b"(not found)\n")
    missing = run_cli("get", *c, "greeting")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, b"", b"(not found)\n")


def test_binary_values_pass_through_unchanged(cluster):
    value = bytes(range(1, 256))  # argv cannot hold NUL; every other byte
    put = run_cli("put", "--cluster", cluster.cluster_arg, b"bin\xff", value)
    assert put.returncode == 0, put.stderr
    get = run_cli("get", "--cluster", cluster.cluster_arg, b"bin\xff")
    assert (get.returncode, get.stdout) == (0, value)


def test_cluster_from_environment(cluster):
    env = _env(CYPAXOS_CLUSTER=cluster.cluster_arg)
    assert run_cli("put", "env-key", "from-env", env=env).returncode == 0
    get = run_cli("get", "env-key", env=env)
    assert (get.returncode, get.stdout) == (0, b"from-env")
    # The serve-style spec (ID=HOST:PORT) is accepted too.
    get = run_cli("get", "--cluster", cluster.cluster_spec, "env-key")
    assert (get.returncode, get.stdout) == (0, b"from-env")


def test_cas(cluster):
    c = ("--cluster", cluster.cluster_arg)
    created = run_cli("cas", *c, "--absent", "lock", "owner-1")
    assert (created.returncode, created.stdout) == (0, b"ok\n")
    taken = run_cli("cas", *c, "--absent", "lock", "owner-2")
    assert (taken.returncode, taken.stdout) == (1, b"failed\n")
    wrong = run_cli("cas", *c, "lock", "owner-2", "owner-3")
    assert (wrong.returncode, wrong.stdout) == (1, b"failed\n")
    swapped = run_cli("cas", *c, "lock", "owner-1", "owner-3")
    assert (swapped.returncode, swapped.stdout) == (0, b"ok\n")
    assert run_cli("get", *c, "lock").stdout == b"owner-3"


def test_status_json(cluster):
    result = run_cli("status", "--cluster", cluster.cluster_arg, "--json")
    assert result.returncode == 0, result.stderr
    replicas = json.loads(result.stdout)["replicas"]
    assert [r["address"] for r in replicas] == cluster.addresses
    for r in replicas:
        for name in ("id", "address", "reachable", "role", "ballot", "commit_index",
                     "applied_index", "state_digest"):
            assert name in r
        assert r["reachable"] is True
        assert r["role"] in ("leader", "follower", "candidate")
    assert sorted(r["id"] for r in replicas) == [1, 2, 3]
    assert sum(r["role"] == "leader" for r in replicas) >= 1


def test_status_table_and_an_unreachable_replica(cluster):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    result = run_cli("status", "--cluster", f"{cluster.cluster_arg},{dead}",
                     "--timeout", "1")
    assert result.returncode == 0, result.stderr  # some replicas answered
    text = result.stdout.decode()
    assert "leader" in text and "follower" in text
    assert re.search(rf"{re.escape(dead)}\s+unreachable", text), text


def test_snapshot_reports_every_replica(cluster):
    result = run_cli("snapshot", "--cluster", cluster.cluster_arg)
    lines = result.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == cluster.addresses
    # Every replica either took one (exit 0) or said why not (exit 1); never a crash.
    assert result.returncode in (0, 1), result.stderr
    assert b"Traceback" not in result.stderr


# ---------------------------------------------------------------------- local


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_runs_a_cluster_and_stops_cleanly(signum):
    ports = free_ports(3)
    with started_local("--port", str(ports[0]), "--fsync", "off") as (proc, text):
        cluster_arg = ",".join(f"127.0.0.1:{p}" for p in ports)
        assert f"--cluster {cluster_arg}" in text
        data_dir = re.search(r"^data dir: (\S+)", text, re.M).group(1)
        assert len(replicas_alive(ports)) == 3

        status = run_cli("status", "--cluster", cluster_arg, "--json")
        assert status.returncode == 0, status.stderr
        assert all(r["reachable"] for r in json.loads(status.stdout)["replicas"])

        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert "Traceback" not in proc.stderr.read()
        assert replicas_alive(ports) == []
        assert not os.path.exists(data_dir)  # a temporary dir is removed


def test_local_keeps_a_given_data_dir_and_recovers_from_it(tmp_path):
    ports = free_ports(1)
    args = ["--replicas", "1", "--port", str(ports[0]), "--data-dir", str(tmp_path)]
    for value in (b"first", b"second"):
        with started_local(*args) as (proc, _):
            c = ("--cluster", f"127.0.0.1:{ports[0]}")
            if value == b"second":  # written by the first run, recovered from disk
                assert run_cli("get", *c, "k").stdout == b"first"
            assert run_cli("put", *c, "k", value).returncode == 0
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
    assert (tmp_path / "replica1.log").exists()


# ----------------------------------------------------------------------- demo


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_passes_and_cleans_up():
    result = run_cli("demo", timeout=150)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert re.search(r"^  result\s+PASS$", out, re.M), out
    assert re.search(r"state digests\s+equal", out), out
    assert re.search(r"failover .* first write acknowledged after \d+\.\d\d s", out), out
    assert re.search(r"catch-up .* caught up in \d+\.\d\d s", out), out
    ports = [int(p) for p in re.findall(r"replica \d 127\.0\.0\.1:(\d+)", out)]
    assert len(ports) == 3, out
    assert replicas_alive(ports) == []
    data_dir = re.search(r"data and replica logs in (\S+)", out).group(1)
    assert not os.path.exists(data_dir)
