"""Fixtures shared by the security tests: TLS files written by `cypaxos certs`."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import run_cli

CERT_HOSTS = ("db1.example", "10.9.8.7")


def write_certs(directory: Path, replicas: int = 3, hosts=CERT_HOSTS) -> Path:
    """Run `cypaxos certs` as a subprocess, as an operator would."""
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
