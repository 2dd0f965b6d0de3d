"""The commands a new user found missing or rough, as real subprocesses: submit and
query against a custom state machine run by `cypaxos local --state-machine`, exit 4
for a state machine's refusal, `status` on 80 columns and `--wide`, help that stands
alone, `--port` on bench and demo."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from cypaxos.tools.local import free_ports
from test_cli import _env, assert_one_error_line, run_cli, started_local

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))
import ledger  # noqa: E402 - the example state machine of docs/examples

COMMANDS = ("serve", "local", "demo", "put", "get", "delete", "cas", "submit", "query",
            "status", "snapshot", "bench", "certs", "range", "txn")


# ------------------------------------------------------------- help and version


@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_help_stands_alone(command):
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    # A pip user has no repository: help describes, it does not point at files.
    assert not re.search(r"docs/|DESIGN|\.md\b|README", text), text
    if command in ("", "serve", "put", "submit", "status"):
        assert "Exit status: 0 done" in text and "4 the cluster refused" in text


def test_version():
    import importlib.metadata

    import cypaxos

    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"cypaxos {cypaxos.__version__}\n".encode())
    # The installed metadata takes its version from cypaxos.__version__ (one source).
    assert importlib.metadata.version("cypaxos") == cypaxos.__version__


def test_docs_cite_no_file_a_user_does_not_have():
    docs = REPO / "docs"
    if not docs.is_dir():
        pytest.skip("no docs/ beside the tests")
    for path in docs.glob("*.md"):
        assert "DESIGN" not in path.read_text(), path


# --------------------------------------------------- a custom state machine


@pytest.fixture(scope="module")
def ledger_local(tmp_path_factory):
    """`cypaxos local --state-machine ledger:Ledger` running; yields its --cluster."""
    ports = free_ports(3)
    env = _env(PYTHONPATH=os.pathsep.join([str(EXAMPLES), _env()["PYTHONPATH"]]))
    data_dir = tmp_path_factory.mktemp("ledger")
    with started_local("--port", str(ports[0]), "--fsync", "off", "--state-machine",
                       "ledger:Ledger", "--data-dir", str(data_dir), env=env) as (proc, _):
        yield ",".join(f"127.0.0.1:{p}" for p in ports)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def cli(cluster, *args, **kwargs):
    return run_cli(*args, "--cluster", cluster, **kwargs)


def test_submit_and_query_raw_commands(ledger_local, tmp_path):
    opened = cli(ledger_local, "submit", ledger.open_account("alice").hex())
    assert (opened.returncode, opened.stderr) == (0, b""), opened
    assert bytes.fromhex(opened.stdout.decode()) == b'{"alice":0}'
    # @FILE gives a file's bytes; --raw prints the result's bytes.
    (tmp_path / "deposit").write_bytes(ledger.deposit("alice", 100))
    deposited = cli(ledger_local, "submit", "--raw", f"@{tmp_path / 'deposit'}")
    assert (deposited.returncode, deposited.stdout) == (0, b'{"alice":100}')
    # @- reads stdin; hex may be spaced.
    bob = cli(ledger_local, "submit", "@-", input=ledger.open_account("bob"))
    assert bob.returncode == 0, bob
    spaced = " ".join(ledger.transfer("alice", "bob", 30).hex()[i:i + 2]
                      for i in range(0, 2 * len(ledger.transfer("alice", "bob", 30)), 2))
    moved = cli(ledger_local, "submit", "--raw", spaced)
    assert ledger.decode(moved.stdout) == {"alice": 70, "bob": 30}

    answer = cli(ledger_local, "query", "--raw", ledger.balance("bob").hex())
    assert (answer.returncode, ledger.decode(answer.stdout)) == (0, 30)
    stale = cli(ledger_local, "query", "--stale", ledger.total().hex())
    assert stale.returncode == 0, stale
    assert ledger.decode(bytes.fromhex(stale.stdout.decode()))["total"] in (0, 100)


def test_a_state_machine_refusal_has_its_own_exit_status(ledger_local):
    refused = cli(ledger_local, "submit", ledger.withdraw("nobody", 5).hex())
    line = assert_one_error_line(refused, 4, contains="the state machine refused")
    assert "UnknownAccount" in line and "may have been applied" not in line
    # The key-value commands against it are refused the same way.
    assert_one_error_line(cli(ledger_local, "put", "k", "v"), 4, contains="BadCommand")
    # A query the state machine raises on: exit 4 too.
    assert_one_error_line(cli(ledger_local, "query", ledger.balance("carol").hex()), 4,
                          contains="query failed")


@pytest.mark.parametrize("args, contains", [
    (("submit", "zz"), "COMMAND 'zz' is neither hex digits nor @FILE"),
    (("query", "abc"), "QUERY 'abc'"),
    (("submit", "@/nonexistent/cmd"), "cannot read COMMAND file /nonexistent/cmd"),
])
def test_bad_raw_input_is_bad_usage(args, contains):
    # Refused before any replica is asked (nothing listens at the default cluster).
    assert_one_error_line(run_cli(*args, "--cluster", f"127.0.0.1:{free_ports(1)[0]}"), 2,
                          contains=contains)


def test_local_refuses_a_state_machine_it_cannot_load():
    for spec, contains in (("nosuchmodule:Thing", "cannot load state machine"),
                           ("ledger", "is not PKG.MOD:CLASS")):
        result = run_cli("local", "--port", str(free_ports(3)[0]), "--state-machine", spec)
        assert_one_error_line(result, 2, contains=contains)


# ------------------------------------------------------------------- status


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


def run_on_terminal(args, columns: int = 80, timeout: float = 60) -> str:
    """Run `python -m cypaxos ARGS` with stdout on a terminal `columns` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = _env(TERM="xterm")
    env.pop("COLUMNS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cypaxos", *args], stdout=slave,
                            stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError(f"no output within {timeout} s")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode()).replace("\r", "")


def test_status_fits_80_columns_on_a_terminal(cluster):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    text = run_on_terminal(["status", "--cluster", f"{cluster.cluster_arg},{dead}",
                            "--timeout", "1"])
    lines = text.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), text
    assert "…" not in text, text  # nothing cut short
    assert lines[0].split() == ["id", "address", "role", "ballot", "commit", "applied",
                                "digest"]
    rows = {line.split()[1]: line.split() for line in lines[2:2 + 4]}
    for address in cluster.addresses:
        row = rows[address]
        assert row[2] in ("leader", "follower", "candidate") and re.fullmatch(
            r"[0-9a-f]{8}", row[-1]), text
    assert rows[dead][2] == "unreachable"
    assert f"{dead}: connection refused" in text


def test_status_off_a_terminal_fits_80_columns_and_wide_has_everything(cluster):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    args = ("status", "--cluster", f"{cluster.cluster_arg},{dead}", "--timeout", "1")
    narrow = run_cli(*args)
    assert narrow.returncode == 0, narrow.stderr
    assert all(len(line) <= 80 for line in narrow.stdout.decode().splitlines()), narrow.stdout
    wide = run_cli(*args, "--wide")
    assert wide.returncode == 0, wide.stderr
    lines = wide.stdout.decode().splitlines()
    header = lines[0].split()
    for name in ("id", "address", "role", "leader_id", "leader", "ballot", "commit_index",
                 "applied_index", "snapshot_index", "wal_durable_seq", "fsync", "cluster_id",
                 "state_digest"):
        assert name in header, header
    replicas = json.loads(run_cli(*args, "--json").stdout)["replicas"]
    digests = {r["state_digest"] for r in replicas if r["reachable"]}
    assert any(d in wide.stdout.decode() for d in digests)  # in full (16 digits)
    wide_json = json.loads(run_cli(*args, "--json", "--wide").stdout)["replicas"]
    assert all("statistics" in r and "cluster_id" in r for r in wide_json if r["reachable"])
    assert [r["address"] for r in wide_json] == [*cluster.addresses, dead]


# ------------------------------------------------------- --port on bench and demo


def test_bench_port_puts_its_local_cluster_there():
    port = free_ports(3)[0]
    result = run_cli("bench", "--port", str(port), "--duration", "1", "--warmup", "0",
                     "--clients", "1", "--outstanding", "4", "--keys", "10", "--json",
                     timeout=120)
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert settings["cluster"] == ",".join(f"127.0.0.1:{p}" for p in range(port, port + 3))


@pytest.mark.slow
def test_demo_port_puts_its_cluster_there():
    port = free_ports(3)[0]
    result = run_cli("demo", "--port", str(port), "--duration", "3", timeout=150)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert re.search(rf"replica 1 127\.0\.0\.1:{port}, replica 2 127\.0\.0\.1:{port + 1}, "
                     rf"replica 3 127\.0\.0\.1:{port + 2}", out), out
    assert re.search(r"^  result\s+PASS$", out, re.M), out


def test_demo_on_a_busy_port_fails_in_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if port > 65533:
            pytest.skip("the kernel gave a port too high for three replicas")
        result = run_cli("demo", "--port", str(port), "--duration", "1", timeout=120)
    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert "Traceback" not in out + result.stderr.decode()
    assert re.search(rf"FAILED: replica 1 exited .*127\.0\.0\.1:{port}", out), out
