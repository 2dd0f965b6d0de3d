"""Clusters of real replica processes under mutual TLS, and real clients dialing them.

`LocalCluster(tls=True)` writes a CA and certificates into its data dir and starts
every replica with ``--tls-ca/--tls-cert/--tls-key``; the clients here are the Python
API (`cypaxos.connect(tls=...)`) and the command line with the CYPAXOS_TLS_*
variables (docs/cli.md), each refused, when it must be, with one clear line.
"""
from __future__ import annotations

import json
import os
import re

import pytest

import cypaxos
from cypaxos.errors import UnavailableError
from cypaxos.security.secrets import generate_key
from cypaxos.tools.local import LocalCluster, child_env

from conftest import READY_TIMEOUT_S, ClusterFactory
from test_cli import assert_one_error_line, replicas_alive, run_cli

CLIENT_TIMEOUT_S = 20.0
"""Generous: the machine running the tests may be busy."""


def cli_env(**extra) -> dict:
    """The environment of a client command: this cypaxos, none of the caller's
    CYPAXOS_* client settings, then `extra`."""
    env = child_env()
    for name in ("CYPAXOS_CLUSTER", "CYPAXOS_TLS_CA", "CYPAXOS_TLS_CERT", "CYPAXOS_TLS_KEY",
                 "CYPAXOS_TOKEN_FILE"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """One started 3-replica cluster under mutual TLS (fsync off), with a leader."""
    factory = ClusterFactory(tmp_path_factory.mktemp("tls"))
    cluster = factory(fsync=False, tls=True)
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=READY_TIMEOUT_S)
        yield cluster
    finally:
        factory.close()


def test_the_cluster_writes_its_certificates(tls_cluster):
    names = sorted(os.listdir(tls_cluster.tls_dir))
    assert names == sorted(f"{stem}.{suffix}" for stem in
                           ("ca", "replica-1", "replica-2", "replica-3", "client")
                           for suffix in ("pem", "key"))
    assert os.stat(os.path.join(tls_cluster.tls_dir, "client.key")).st_mode & 0o077 == 0
    command = tls_cluster.command(2)
    assert command[command.index("--tls-cert") + 1].endswith("replica-2.pem")
    # The probes that found the leader went over TLS: the replicas take nothing else.
    assert tls_cluster.leader_id() in tls_cluster.ids


def test_put_get_status_backup_through_connect(tls_cluster, tmp_path):
    with cypaxos.connect(tls_cluster.addresses, timeout=CLIENT_TIMEOUT_S,
                         tls=tls_cluster.client_tls) as kv:
        kv.put(b"tls-key", b"over TLS")
        assert kv.get(b"tls-key") == b"over TLS"
        assert kv.cas(b"tls-key", b"over TLS", b"swapped")
        assert kv.get(b"tls-key", stale=True) in (b"over TLS", b"swapped")
        answers = kv.status()
        assert [a["reachable"] for a in answers] == [True, True, True], answers
        done = kv.backup(tmp_path / "tls.cpxbak")
        assert done.size_bytes > 0 and done.index >= 1


def test_cli_with_the_environment(tls_cluster):
    env = cli_env(**tls_cluster.client_env())
    put = run_cli("put", "cli-key", "cli-value", env=env)
    assert (put.returncode, put.stdout) == (0, b"ok\n"), put.stderr.decode()
    got = run_cli("get", "cli-key", env=env)
    assert (got.returncode, got.stdout) == (0, b"cli-value"), got.stderr.decode()
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr.decode()
    rows = json.loads(status.stdout)["replicas"]
    assert [r["reachable"] for r in rows] == [True, True, True]
    # The same with flags instead of the environment.
    tls = tls_cluster.client_tls
    got = run_cli("get", "--cluster", tls_cluster.cluster_arg, "--tls-ca", str(tls.ca),
                  "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "cli-key",
                  env=cli_env())
    assert (got.returncode, got.stdout) == (0, b"cli-value"), got.stderr.decode()


def test_a_client_without_a_certificate_is_refused(tls_cluster):
    ca_only = cypaxos.TLS(ca=tls_cluster.client_tls.ca)
    with cypaxos.connect(tls_cluster.addresses, timeout=CLIENT_TIMEOUT_S, tls=ca_only) as kv:
        with pytest.raises(UnavailableError, match="authentication failed: the replica "
                                                   "requires a client certificate"):
            kv.put(b"k", b"v")
    env = cli_env(CYPAXOS_CLUSTER=tls_cluster.cluster_arg,
                  CYPAXOS_TLS_CA=str(tls_cluster.client_tls.ca))
    line = assert_one_error_line(run_cli("put", "k", "v", env=env), 3,
                                 contains="authentication failed: the replica requires a "
                                          "client certificate")
    assert "--tls-cert" in line


def test_a_client_trusting_another_ca_fails_verification(tls_cluster, foreign_certs):
    foreign = cypaxos.TLS(ca=foreign_certs / "ca.pem", cert=foreign_certs / "client.pem",
                          key=foreign_certs / "client.key")
    with cypaxos.connect(tls_cluster.addresses, timeout=CLIENT_TIMEOUT_S, tls=foreign) as kv:
        with pytest.raises(UnavailableError, match="TLS: the replica's certificate is not "
                                                   "signed by the CA given"):
            kv.get(b"k")
    env = cli_env(CYPAXOS_CLUSTER=tls_cluster.cluster_arg,
                  CYPAXOS_TLS_CA=str(foreign_certs / "ca.pem"),
                  CYPAXOS_TLS_CERT=str(foreign_certs / "client.pem"),
                  CYPAXOS_TLS_KEY=str(foreign_certs / "client.key"))
    assert_one_error_line(run_cli("get", "k", env=env), 3,
                          contains="TLS: the replica's certificate is not signed by the CA")
    # status says why for each replica, after its table.
    status = run_cli("status", env=env)
    assert status.returncode == 3
    assert status.stdout.decode().count("TLS: the replica's certificate is not signed") == 3


def test_a_client_without_tls_is_told_to_use_it(tls_cluster):
    result = run_cli("get", "k", env=cli_env(CYPAXOS_CLUSTER=tls_cluster.cluster_arg))
    assert result.returncode == 3, result.stderr.decode()
    assert "--tls-ca" in result.stderr.decode()


def test_bad_tls_files_are_one_line_exit_2(tls_cluster, tmp_path):
    env = cli_env(CYPAXOS_CLUSTER=tls_cluster.cluster_arg)
    assert_one_error_line(run_cli("put", "--tls-ca", str(tmp_path / "none.pem"), "k", "v",
                                  env=env), 2, contains="TLS CA file")
    assert_one_error_line(run_cli("get", "--tls-ca", str(tls_cluster.client_tls.ca),
                                  "--tls-cert", str(tls_cluster.client_tls.cert), "k",
                                  env=env), 2, contains="--tls-cert needs --tls-key")
    (tmp_path / "short.token").write_text("abc\n")
    os.chmod(tmp_path / "short.token", 0o600)
    assert_one_error_line(run_cli("status", "--token-file", str(tmp_path / "short.token"),
                                  env=env), 2, contains="token file")


def test_tokens(new_cluster, tmp_path):
    """Replicas with --token-file under TLS take a client with the CA only and a token
    it lists; a wrong token is refused."""
    token, wrong = generate_key(), generate_key()
    tokens = tmp_path / "tokens"
    tokens.write_bytes(b"# the clients' tokens\n" + token + b"\n")
    os.chmod(tokens, 0o600)
    mine = tmp_path / "my.token"
    mine.write_bytes(token + b"\n")
    os.chmod(mine, 0o600)
    cluster = new_cluster(fsync=False, tls=True, extra_args=("--token-file", str(tokens)))
    cluster.start_all()
    cluster.wait_ready(timeout=READY_TIMEOUT_S)
    ca_only = cypaxos.TLS(ca=cluster.client_tls.ca)
    with cypaxos.connect(cluster.addresses, timeout=CLIENT_TIMEOUT_S, tls=ca_only,
                         token=token) as kv:
        kv.put(b"token-key", b"v")
        assert kv.get(b"token-key") == b"v"
    with cypaxos.connect(cluster.addresses, timeout=CLIENT_TIMEOUT_S, tls=ca_only,
                         token=wrong.decode()) as kv:
        with pytest.raises(UnavailableError, match="authentication failed: client token "
                                                   "not accepted"):
            kv.get(b"token-key")
    env = cli_env(CYPAXOS_CLUSTER=cluster.cluster_arg, CYPAXOS_TLS_CA=str(ca_only.ca),
                  CYPAXOS_TOKEN_FILE=str(mine))
    got = run_cli("get", "token-key", env=env)
    assert (got.returncode, got.stdout) == (0, b"v"), got.stderr.decode()
    (tmp_path / "wrong.token").write_bytes(wrong + b"\n")
    os.chmod(tmp_path / "wrong.token", 0o600)
    assert_one_error_line(run_cli("get", "--token-file", str(tmp_path / "wrong.token"),
                                  "token-key", env=env), 3,
                          contains="authentication failed: client token not accepted")


def test_local_tls_prints_what_clients_need(tmp_path):
    from test_cli import started_local
    from cypaxos.tools.local import free_ports

    port = free_ports(3)[0]
    with started_local("--tls", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                       env=cli_env()) as (proc, banner):
        match = re.search(r"^\s+e\.g\. (.*) cypaxos put --cluster (\S+) greeting hello$",
                          banner, re.M)
        assert match, banner
        env = cli_env(CYPAXOS_CLUSTER=match.group(2))
        for assignment in match.group(1).split():
            name, value = assignment.split("=", 1)
            env[name] = value
        assert env["CYPAXOS_TLS_CA"] == str(tmp_path / "data" / "tls" / "ca.pem")
        put = run_cli("put", "greeting", "hello", env=env)
        assert (put.returncode, put.stdout) == (0, b"ok\n"), put.stderr.decode()
        proc.terminate()
        assert proc.wait(60) == 0


def test_demo_tls_passes():
    result = run_cli("demo", "--tls", "--duration", "6", timeout=150, env=cli_env())
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert re.search(r"^  cluster .*mutual TLS", out, re.M), out
    assert re.search(r"^  result\s+PASS$", out, re.M), out
    ports = [int(p) for p in re.findall(r"replica \d 127\.0\.0\.1:(\d+)", out)]
    assert len(ports) == 3 and replicas_alive(ports) == []


def test_bench_tls(tmp_path):
    result = run_cli("bench", "--tls", "--duration", "1", "--warmup", "0.5", "--clients", "2",
                     "--processes", "1", "--outstanding", "8", "--json", timeout=150,
                     env=cli_env())
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["settings"]["tls"] is True
    assert report["writes"] > 0 and report["errors"] == 0, report


def test_plain_local_cluster_is_unchanged(new_cluster):
    cluster = new_cluster(fsync=False)
    assert cluster.tls_dir is None and cluster.client_tls is None
    assert "--tls-ca" not in cluster.command(1)
    assert isinstance(cluster, LocalCluster)
