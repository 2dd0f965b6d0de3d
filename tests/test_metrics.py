"""`serve --metrics-address`: Prometheus /metrics and /healthz of real replicas.

The metrics move as they should during a `cypaxos bench` run against a real cluster:
the commit index grows, the fsync histogram counts grow, a follower paused with
SIGSTOP shows lag at the leader that goes away after SIGCONT.  /healthz flips to 503
when a replica loses its leader (the quorum is lost) and back once it is regained.
The counters behind them are unit-tested at the end.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cypaxos.replica.counters import Histogram, slot_commands
from cypaxos.commands import pack_client_batch
from cypaxos.tools.local import free_ports
from test_cli import _env

pytestmark = pytest.mark.timeout(300)


def poll(check, timeout: float, what):
    """Call `check()` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
        except (OSError, urllib.error.URLError) as exc:   # a paused replica, say
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(0.1)


def scrape(address: str) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample at /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def health(address: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_cluster(new_cluster, **kwargs):
    cluster = new_cluster(metrics_ports=free_ports(3), **kwargs)
    cluster.start_all()
    cluster.wait_ready(timeout=60)
    return cluster


def test_metrics_move_during_a_bench_run(new_cluster):
    cluster = metrics_cluster(new_cluster)
    bench = subprocess.Popen(
        [sys.executable, "-m", "cypaxos", "bench", "--cluster", cluster.cluster_arg,
         "--duration", "60", "--warmup", "0", "--clients", "2", "--processes", "1",
         "--outstanding", "8", "--rate", "400", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        leader = cluster.leader_id()
        address = cluster.metrics_address(leader)
        first = scrape(address)
        assert first[("cypaxos_role", (("role", "leader"),))] == 1
        assert first[("cypaxos_healthy", ())] == 1

        def grown():
            now = scrape(address)
            return (now[("cypaxos_commit_index", ())] >= first[("cypaxos_commit_index", ())] + 200
                    and now[("cypaxos_fsync_seconds_count", ())]
                    > first[("cypaxos_fsync_seconds_count", ())] + 50
                    and now)
        now = poll(grown, 60, "the commit index and the fsync count to grow under load")
        assert now[("cypaxos_proposals_total", ())] > first[("cypaxos_proposals_total", ())]
        assert now[("cypaxos_batch_commands_count", ())] > first[("cypaxos_batch_commands_count", ())]
        assert now[("cypaxos_applied_index", ())] > first[("cypaxos_applied_index", ())]
        assert now[("cypaxos_client_connections", ())] >= 2
        # Every follower fsyncs too.
        for replica_id in cluster.ids:
            assert scrape(cluster.metrics_address(replica_id))[
                ("cypaxos_fsync_seconds_count", ())] > 0

        follower = next(i for i in cluster.ids if i != leader)
        lag_key = ("cypaxos_peer_lag_slots", (("peer", str(follower)),))
        cluster.pause(follower)
        try:
            poll(lambda: scrape(address)[lag_key] >= 100, 60,
                 f"replica {follower}'s lag to show while it is paused")
        finally:
            cluster.resume(follower)
        poll(lambda: scrape(address)[lag_key] <= 10, 120,
             f"replica {follower}'s lag to go away after SIGCONT")
        assert scrape(address)[("cypaxos_peer_connected", (("peer", str(follower)),))] == 1
        assert cluster.leader_id() == leader
    finally:
        bench.kill()
        bench.wait()


def test_healthz_flips_when_the_quorum_is_lost(new_cluster):
    cluster = metrics_cluster(new_cluster, fsync=False)
    for replica_id in cluster.ids:
        poll(lambda: health(cluster.metrics_address(replica_id))[0] == 200, 30,
             f"replica {replica_id} to be healthy")
    leader = cluster.leader_id()
    followers = [i for i in cluster.ids if i != leader]
    status, text = health(cluster.metrics_address(leader))
    assert text.startswith("ok: leader")
    status, text = health(cluster.metrics_address(followers[0]))
    assert text == f"ok: follower of replica {leader}\n"

    # The leader alone: it steps down (it hears no quorum) and knows no leader.
    for i in followers:
        cluster.pause(i)
    try:
        status, text = poll(lambda: (lambda h: h[0] == 503 and h)(
            health(cluster.metrics_address(leader))), 30, "the lone leader's /healthz to fail")
        assert text == "no leader known\n", text
        assert scrape(cluster.metrics_address(leader))[("cypaxos_healthy", ())] == 0
    finally:
        for i in followers:
            cluster.resume(i)
    cluster.wait_ready(timeout=60)
    for replica_id in cluster.ids:
        poll(lambda: health(cluster.metrics_address(replica_id))[0] == 200, 60,
             f"replica {replica_id} to be healthy again")

    # A follower cut off from the leader and the other follower.
    leader = cluster.leader_id()
    lone, other = [i for i in cluster.ids if i != leader]
    cluster.pause(leader)
    cluster.pause(other)
    try:
        status, text = poll(lambda: (lambda h: h[0] == 503 and h)(
            health(cluster.metrics_address(lone))), 30, "the cut-off follower's /healthz to fail")
        assert text.startswith(f"no leader: last heard from replica {leader} ") or \
            text == "no leader known\n", text
    finally:
        cluster.resume(leader)
        cluster.resume(other)
    for replica_id in cluster.ids:
        poll(lambda: health(cluster.metrics_address(replica_id))[0] == 200, 60,
             f"replica {replica_id} to be healthy again")


def http(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_the_endpoint_answers_only_what_it_serves(new_cluster):
    cluster = metrics_cluster(new_cluster, fsync=False)
    address = cluster.metrics_address(1)
    assert http(address, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 404 ")
    assert http(address, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 405 ")
    head = http(address, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert http(address, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    try:
        # Answered 431, or reset: the replica closes with the rest of it unread.
        big = http(address, b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431 "), big[:100]
    except ConnectionResetError:
        pass
    # The replica serves on, and so does the endpoint.
    assert scrape(address)[("cypaxos_info", (("cluster_id", cluster_id(cluster)),
                                             ("replica_id", "1"),
                                             ("version", version())))] == 1


def cluster_id(cluster) -> str:
    return cluster.status(1)["cluster_id"]


def version() -> str:
    import cypaxos
    return cypaxos.__version__


# ---------------------------------------------------------------- counters


@pytest.mark.fast
def test_histogram_buckets_are_cumulative_at_export():
    h = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe(value)
    assert h.count == 5 and h.sum == pytest.approx(3.0535)
    assert h.cumulative() == [(0.001, 2), (0.01, 3), (0.1, 4), (float("inf"), 5)]
    with pytest.raises(ValueError):
        Histogram((1, 1))


@pytest.mark.fast
def test_slot_commands_counts_every_batch_of_a_slot():
    one = pack_client_batch(7, 1, 0, [b"a", b"bc"])
    two = pack_client_batch(8, 5, 4, [b"x"] * 5)
    assert slot_commands(b"") == 0
    assert slot_commands(one) == 2
    assert slot_commands(one + two) == 7
    assert slot_commands(one + two[:10]) == 2   # a torn header counts nothing more


@pytest.mark.fast
def test_auth_failures_have_a_home_that_counts_and_logs_once_a_minute(tmp_path, caplog):
    from prometheus_client import CollectorRegistry, generate_latest

    from cypaxos.replica.metrics import ReplicaCollector, answer
    from cypaxos.replica.options import ServerOptions
    from cypaxos.replica.server import ReplicaServer

    cluster = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}
    server = ReplicaServer(ServerOptions(replica_id=2, cluster=cluster, insecure=True,
                                         data_dir=str(tmp_path / "r2")))
    try:
        caplog.set_level(logging.INFO, logger="cypaxos.server")
        for _ in range(5):
            server.auth_failed("10.0.0.9", "wrong cluster secret", kind="peer")
        server.auth_failed("10.0.0.8", "no client token", kind="client")
        lines = [r.getMessage() for r in caplog.records if "refused a" in r.getMessage()]
        assert lines == ["refused a peer connection from 10.0.0.9: wrong cluster secret",
                         "refused a client connection from 10.0.0.8: no client token"]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ReplicaCollector(server))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(
                       generate_latest(registry).decode()) for s in family.samples}
        assert samples[("cypaxos_auth_failures_total", (("kind", "peer"),))] == 5
        assert samples[("cypaxos_auth_failures_total", (("kind", "client"),))] == 1
        # Never started: it knows no leader.
        response = answer(server, registry, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 503 ") and response.endswith(b"\r\n\r\nno leader known\n")
    finally:
        server.close()
