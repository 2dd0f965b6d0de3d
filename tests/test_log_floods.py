"""Logs without floods: a warning that can repeat is logged once, then once a minute
per source and kind with a count (`cypaxos.logs.RateLimitedLog` in `replica/`).

The burst: a would-be new replica pointed at a running cluster (its --cluster names
a fourth replica, so its cluster id is another one, and it has no cluster secret).
It dials each member 20 times a second and each member refuses its handshake: both
sides would log every attempt (about 56 lines a second) without the rate limit.  Real processes; the burst's size is read from the members' own
counters, not from a sleep.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clusterwait import statuses, wait_for
from cypaxos.tools.local import free_ports
from test_cli import _env

pytestmark = pytest.mark.timeout(240)

ATTEMPTS = 60   # dropped hellos per member before the lines are counted


async def test_a_replica_of_another_cluster_does_not_flood_the_logs(new_cluster, tmp_path):
    cluster = new_cluster(fsync=False)
    cluster.start_all()
    cluster.wait_ready(timeout=60)
    port = free_ports(1)[0]
    spec = cluster.cluster_spec + f",4=127.0.0.1:{port}"
    log_path = tmp_path / "stranger.log"
    with open(log_path, "wb") as log:
        stranger = subprocess.Popen(
            [sys.executable, "-m", "cypaxos", "serve", "--insecure", "--id", "4", "--cluster", spec,
             "--data-dir", str(tmp_path / "stranger"), "--fsync", "off"],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        async def burst_done():
            st = await statuses(cluster)
            counts = [s["statistics"]["auth_failures"] if s else 0 for s in st.values()]
            return min(counts) >= ATTEMPTS and counts
        counts = await wait_for(burst_done, 120, "every member to refuse the stranger "
                                f"{ATTEMPTS} times")
    finally:
        stranger.terminate()
        stranger.wait(timeout=30)
    for replica_id in cluster.ids:
        lines = [line for line in open(cluster.log_path(replica_id))
                 if "refused a peer connection" in line]
        # The first refusal at once; the rest are counted, and within a minute not logged.
        assert 1 <= len(lines) <= 2, (counts, lines)
        assert "wrong cluster id" in lines[0]
    own = [line for line in open(log_path) if "it refused us" in line]
    # At most the first loss per member (plus one count line each if a minute passed).
    assert 1 <= len(own) <= 2 * len(cluster.ids), own
    assert os.path.getsize(log_path) < 16_000
