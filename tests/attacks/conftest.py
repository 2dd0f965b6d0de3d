"""One cluster per trust mode, shared by every attack test of that mode (the
attacks leave the cluster as it was, which is what each test checks)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from attacks.tooling import MAX_SESSIONS, MODES, READY_TIMEOUT_S, Client, ModeCluster


@dataclass
class Target:
    """A running cluster under attack: `canaries` were written (and acknowledged)
    before any attack, `cluster_id` is what every replica's handshake names."""

    cluster: ModeCluster
    canaries: dict
    cluster_id: str

    @property
    def mode(self) -> str:
        return self.cluster.mode


@pytest.fixture(scope="session", params=MODES)
def target(request, tmp_path_factory) -> Target:
    """A 3-replica cluster in one mode (tls, secret, local) with canaries written;
    its replicas' exits and digests are checked by each test."""
    mode = request.param
    cluster = ModeCluster(mode, tmp_path_factory.mktemp(f"attacks-{mode}"),
                          extra_args=("--max-sessions", str(MAX_SESSIONS)))
    with cluster:
        cluster.wait_ready(timeout=READY_TIMEOUT_S)
        canaries = {f"canary-{i}".encode(): os.urandom(8 + 40 * i) for i in range(8)}
        with Client(cluster) as client:
            for key, value in canaries.items():
                client.put(key, value)
            cluster_id = client.status()["cluster_id"]
        yield Target(cluster, canaries, cluster_id)
