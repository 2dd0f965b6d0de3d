"""Fixtures shared by the test modules: local clusters of real replica processes on
free loopback ports, with their data under the test's temporary directory.

`tests/` is on sys.path (``pythonpath = ["tests"]`` in pyproject.toml), so the test
modules import the fault harness as the package it is (``from jepsen.cluster import
...``), the transcript runner as ``transcript`` and the Trio-side waits on a cluster
as ``clusterwait`` and the Trio loop in a thread that serves another loop's client
as ``triothread``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cypaxos.tools.local import LocalCluster, child_env, free_ports

READY_TIMEOUT_S = 60.0
"""How long a fixture's cluster may take to elect its first leader."""


class ClusterFactory:
    """Makes clusters on free ports with data dirs under one directory; closes them all."""

    def __init__(self, root) -> None:
        self.root = root
        self.clusters: list[LocalCluster] = []

    def __call__(self, replicas: int = 3, *, cls=LocalCluster, **kwargs) -> LocalCluster:
        """A `cls` (LocalCluster, OptionsCluster...) of `replicas`, not started yet.

        Its data dir is ``ROOT/cluster`` (``cluster2``, ... for later ones) unless
        `data_dir` is given; other keyword arguments go to `cls`.
        """
        n = len(self.clusters) + 1
        kwargs.setdefault("data_dir", self.root / ("cluster" if n == 1 else f"cluster{n}"))
        cluster = cls(replicas, ports=free_ports(replicas), **kwargs)
        self.clusters.append(cluster)
        return cluster

    def close(self) -> None:
        for cluster in reversed(self.clusters):
            cluster.close()


@pytest.fixture
def new_cluster(tmp_path):
    """``new_cluster(replicas=3, *, cls=LocalCluster, **kwargs)``: a cluster on free
    ports, data in tmp_path, not started (use ``with``, ``start_all()``, ...); every one
    is closed when the test ends."""
    factory = ClusterFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def running_cluster(new_cluster):
    """A started 3-replica cluster (fsync always) with a leader."""
    cluster = new_cluster()
    cluster.start_all()
    cluster.wait_ready(timeout=READY_TIMEOUT_S)
    return cluster


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One started 3-replica cluster (fsync off) with a leader, shared by a module's
    non-destructive tests."""
    factory = ClusterFactory(tmp_path_factory.mktemp("shared"))
    cluster = factory(fsync=False)
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=READY_TIMEOUT_S)
        yield cluster
    finally:
        factory.close()


@pytest.fixture
def cypaxos_env():
    """An environment for child processes that must import this very cypaxos."""
    return child_env()


# -- TLS files written by `cypaxos certs` (the security tests)

CERT_HOSTS = ("db1.example", "10.9.8.7")


def write_certs(directory: Path, replicas: int = 3, hosts=CERT_HOSTS) -> Path:
    """Run `cypaxos certs` as a subprocess, as an operator would."""
    from test_cli import run_cli

    args = ["certs", str(directory), "--replicas", str(replicas)]
    for host in hosts:
        args += ["--host", host]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return directory


@pytest.fixture(scope="session")
def cluster_certs(tmp_path_factory) -> Path:
    """A CA, replica-1..3 (with CERT_HOSTS) and a client certificate."""
    return write_certs(tmp_path_factory.mktemp("certs") / "cluster")


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory) -> Path:
    """The same set from another CA (another cluster's)."""
    return write_certs(tmp_path_factory.mktemp("certs") / "foreign")
