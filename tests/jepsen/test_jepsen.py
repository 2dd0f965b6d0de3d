"""The fault-injection tier: thin tests over scenario.run_scenario (docs/testing.md).

CI tier (always runs): `test_ci_mixed_faults` (3 replicas, every fault kind this
machine supports, 20,000+ client operations, 40+ fault events) and
`test_ci_five_replicas` (a 5-replica cluster: ring partitions of overlapping
majorities, f=2 crashes, power outages).  Soak tier: `test_soak`, only with
CYPAXOS_SOAK=1, for CYPAXOS_SOAK_SECONDS (default 600).

Each test's counts go to pytest's JUnit properties (`record_property`), to
``results/jepsen-*/summary.json`` and into its assertion message; the one-line
summary is also emitted as a warning so that it shows in the warnings summary of a
plain ``pytest -q`` run.  Where namespaces, a packet filter or libfaketime are
missing the same tests run with the faults that still apply (on loopback, with
proxy-made partitions) and say what was left out in the summary's ``notes`` and
``kinds_skipped``.
"""
import time
import warnings

import pytest

from . import netns
from .conftest import seed_from_env, soak_enabled, soak_seconds
from .nemesis import ALL_KINDS
from .scenario import ScenarioConfig, run_scenario
from .workload import WorkloadConfig


class JepsenSummary(UserWarning):
    """The counts of a fault-injection run (shown in pytest's warnings summary)."""


def _report(result, record_property, *, min_ops=0, min_faults=0):
    s = result.summary
    record_property("jepsen_summary", result.line())
    record_property("jepsen_results", result.results_dir)
    for key in ("seed", "bed", "runtime_s", "events"):
        record_property(f"jepsen_{key}", s.get(key))
    record_property("jepsen_ops", s.get("ops"))
    record_property("jepsen_faults", s.get("faults"))
    record_property("jepsen_anomalies", len(s.get("anomalies", [])))
    record_property("jepsen_lost_writes", len(s.get("lost_writes", [])))
    warnings.warn(JepsenSummary(result.line()
                                + (f" notes={s['notes']}" if s.get("notes") else "")
                                + (f" skipped_kinds={sorted(s['kinds_skipped'])}"
                                   if s.get("kinds_skipped") else "")))
    assert result.ok, result.report()
    assert s["ops"]["total"] >= min_ops, f"too few operations: {result.line()}"
    assert sum(s["faults"].values()) >= min_faults, f"too few faults: {result.line()}"
    assert not s["anomalies"] and not s["lost_writes"], result.report()
    assert s["digests_equal"], result.report()


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_ci_mixed_faults(record_property):
    cfg = ScenarioConfig(name="ci-mixed", replicas=3, events=44, seed=seed_from_env(),
                         workload=WorkloadConfig(workers=12))
    result = run_scenario(cfg)
    _report(result, record_property, min_ops=20_000, min_faults=40)
    faults = result.summary["faults"]
    expected = [k for k in ALL_KINDS if k not in result.summary["kinds_skipped"]
                and k != "kill_minority"]
    missing = [k for k in expected if k not in faults]
    assert not missing, f"fault kinds never injected: {missing}; {result.line()}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ci_five_replicas(record_property):
    cfg = ScenarioConfig(
        name="ci-five", replicas=5, events=12, seed=seed_from_env(),
        kinds=["partition_ring", "partition_halves", "partition_leader", "kill_minority",
               "kill_leader", "power_outage", "pause_leader", "loss", "slow_disk"],
        workload=WorkloadConfig(workers=8))
    result = run_scenario(cfg)
    _report(result, record_property, min_faults=12)


@pytest.mark.soak
@pytest.mark.skipif(not soak_enabled(), reason="soak tier: set CYPAXOS_SOAK=1 "
                    "(and CYPAXOS_SOAK_SECONDS, default 600)")
@pytest.mark.timeout(0)
def test_soak(record_property):
    seconds = soak_seconds()
    cfg = ScenarioConfig(name="soak", replicas=3, duration_s=seconds, seed=seed_from_env(),
                         workload=WorkloadConfig(workers=12))
    result = run_scenario(cfg)
    _report(result, record_property)


# ------------------------------------------------------------ the levers work


@pytest.mark.skipif(not netns.capabilities()["firewall"],
                    reason="needs network namespaces and nftables or iptables "
                           "(apt-get install iproute2 nftables): "
                           + (netns.capabilities()["firewall_reason"] or "n/a"))
def test_partition_rules_depose_the_isolated_leader(tmp_path):
    """An nftables partition really cuts a replica off: the others elect a new leader."""
    from .cluster import JepsenCluster
    bed = netns.NetnsBed(3)
    cluster = JepsenCluster(bed, 3, str(tmp_path), proxy=False)
    try:
        cluster.start_all()
        old = cluster.wait_healthy(60)
        others = [i for i in cluster.ids if i != old]
        for j in others:
            bed.block(f"r{j}", [f"r{old}"])
            bed.block(f"r{old}", [f"r{j}"])
        deadline = time.monotonic() + 30
        while True:
            sts = cluster.statuses()
            new = cluster.leader_of({i: sts[i] for i in others})
            if new is not None and new != old:
                break
            assert time.monotonic() < deadline, f"no new leader among {others}: {sts}"
            time.sleep(0.05)
        bed.heal()
        cluster.wait_converged(60)
    finally:
        cluster.close()
        bed.close()


_CAPS = netns.capabilities()


@pytest.mark.parametrize("what", ["network namespaces", "packet filter", "libfaketime"])
def test_capability(what):
    """One visible line per tool the fault tier uses: a skip names what is missing and
    which faults the scenarios then leave out or make another way."""
    if what == "network namespaces":
        if not _CAPS["netns"]:
            pytest.skip(f"{_CAPS['netns_reason']}: scenarios run on loopback (127.0.0.1), "
                        "with partitions made by the proxy instead of packet filters")
    elif what == "packet filter":
        if not _CAPS["firewall"]:
            pytest.skip(f"{_CAPS['firewall_reason']}: partitions are made by the proxy "
                        "(frames blackholed) instead of nftables/iptables rules")
    elif not _CAPS["faketime"]:
        pytest.skip(f"{_CAPS['faketime_reason']}: clock_forward and clock_backward are "
                    "left out of every scenario")


@pytest.mark.skipif(not _CAPS["faketime"], reason=_CAPS["faketime_reason"] or "n/a")
def test_clock_jump_reaches_the_replicas_monotonic_clock(tmp_path):
    """libfaketime moves CLOCK_MONOTONIC too (what Trio's timers use): after a 4 s jump
    back, the replica's tick counter stands still for a while, then goes on."""
    from .cluster import JepsenCluster
    bed = netns.LoopbackBed()
    cluster = JepsenCluster(bed, 1, str(tmp_path), faketime=_CAPS["faketime"])

    def ticks():
        return cluster.status(1)["statistics"]["tick"]
    try:
        cluster.start_all()
        cluster.wait_healthy(60)
        cluster.jump_clock(1, -4.0)
        deadline = time.monotonic() + 3.0  # the offset file is re-read within ~1 s
        last, since, still = ticks(), time.monotonic(), 0.0
        while time.monotonic() < deadline and still < 1.0:
            time.sleep(0.05)
            now = ticks()
            if now != last:
                last, since = now, time.monotonic()
            still = time.monotonic() - since
        assert still >= 1.0, "the tick counter never stopped: the jump did not reach the replica"
        deadline = time.monotonic() + 15
        while ticks() == last:
            assert time.monotonic() < deadline, "the replica never ticked again"
            time.sleep(0.05)
    finally:
        cluster.close()
        bed.close()


# ------------------------------------------------------- the power-loss emulation

_WRITER = r'''
import os, sys
shim, synced, data, scenario = sys.argv[1:]
sys.path.insert(0, os.path.dirname(shim))
import replica_shim
replica_shim.install(synced, data)
from cypaxos.storage.wal import Wal
wal = Wal.open(os.path.join(data, "wal"), segment_bytes_max=4096)
n = 0
def put(count):
    global n
    for _ in range(count):
        n += 1
        wal.append(b"record %4d " % n + b"x" * 40)
put(10)
wal.sync()                      # 1..10 durable
put(5)
if scenario == "rotate":
    put(150)                    # rotations: each fdatasyncs the finished segment
elif scenario == "rotate_sync":
    put(150)
    wal.sync()                  # the new segments' directory entries durable too
    put(5)
wal.flush()                     # the rest reached the kernel only
print(n, wal.durable_seq, len(wal._segments), flush=True)
os._exit(0)                     # like SIGKILL: no close, nothing more synced
'''


@pytest.mark.parametrize("scenario", ["one_segment", "rotate", "rotate_sync"])
def test_power_loss_emulation_undoes_exactly_the_unsynced_writes(tmp_path, scenario):
    """The shim's records + JepsenCluster.drop_unsynced keep what the WAL's syncs made
    durable and undo the rest: unsynced records zeroed, segments whose directory entry
    was never synced gone."""
    import os
    import subprocess
    import sys
    import types
    from cypaxos.storage.wal import Wal
    from .cluster import SHIM_SCRIPT, JepsenCluster

    data, synced = tmp_path / "data", tmp_path / "synced"
    (data / "wal").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-c", _WRITER, SHIM_SCRIPT, str(synced), str(data),
                          scenario], capture_output=True, text=True, check=True).stdout
    written, durable, segments = map(int, out.split())
    before = sorted(name for name in os.listdir(data / "wal") if name.endswith(".wal"))
    notes = []
    stub = types.SimpleNamespace(
        replicas={1: types.SimpleNamespace(running=lambda: False, data_dir=str(data))},
        synced_log=lambda i: str(synced), note=notes.append)
    JepsenCluster.drop_unsynced(stub, 1)
    with Wal.open(data / "wal", segment_bytes_max=4096) as wal:
        seqs = [seq for seq, _ in wal.replay()]
        assert wal.warnings == []
    if scenario != "rotate":
        assert "from 1 segment(s)" in notes[0] and "vanished" not in notes[0]
    if scenario == "one_segment":
        assert segments == 1 and seqs == list(range(1, 11))
    elif scenario == "rotate":
        # Rotations fdatasync the finished segment, but the directory is synced only by
        # the next sync: every segment created since the last one may vanish.
        assert segments > 2 and len(before) == segments and durable == 10
        assert f"{segments - 1} new segment(s) vanished" in notes[0]
        assert seqs == list(range(1, int(before[1][:20])))
        assert sorted(n for n in os.listdir(data / "wal") if n.endswith(".wal")) == before[:1]
    else:
        assert seqs == list(range(1, durable + 1)) and durable == written - 5
