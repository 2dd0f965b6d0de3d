"""The seeded simulator against the production replica node and the real client:
thousands of seeds.

Every replica is a `ReplicaNode` (what the server runs) over the simulator's disk and
network, so these seeds prove the core *and* the rules around it: the after-persist
queue, group commit, snapshots, restatement and compaction, the chunked snapshot
transfer (chunks corrupted in flight, lost, duplicated, reordered, crashes
mid-transfer, transfers from two peers at once), client work and leases.  Every
client is the real client's calls and session (`cypaxos.testing.simclient`), so
they prove its batching, resends, retries, timeouts and `maybe_applied` too.

CYPAXOS_SIM_SEEDS=N scales every group (N seeds in the three-replica group, the
others in proportion); CYPAXOS_SIM_SEED=S reruns only seed S (every failure message
starts with its seed).  `python -m cypaxos.testing.sim --seed S -v` replays one seed
with a trace.
"""
import os

import pytest

from cypaxos import core
from cypaxos.core import Config
from cypaxos.replica import node
from cypaxos.testing.sim import MS, Faults, Simulation, SimulationFailure

pytestmark = pytest.mark.fast

SEEDS = int(os.environ.get("CYPAXOS_SIM_SEEDS", "1000"))
ONLY_SEED = os.environ.get("CYPAXOS_SIM_SEED")
CHUNK = 50

# Seeds that once failed (each found a real bug), kept as regression tests.
REGRESSION_SEEDS = [
    89,  # a leader asked a restarted peer (whose commit index went back) for catch-up forever
]


def config(fault=0, **settings):
    return Config(heartbeat_ticks=2, election_ticks=10, window_slots=8, resend_ticks=3,
                  batch_bytes_max=512, check_invariants=True, fault=fault, **settings)


def hostile():
    """Many crashes (preferring replicas with an unsynced tail), slow disks, heavy loss."""
    return Faults(drop=0.25, fault_interval_us=(20 * MS, 120 * MS),
                  disk_latency_us=(10 * MS, 80 * MS))


# Leases within the bound: lease 6 ticks, drift 2 (lease + drift + one tick of
# granularity <= the 10-tick election timeout); clocks within 0.95..1.05 and a cut-off
# leader slowed to 1.1: at most 1.16 apart, inside 1 + drift / lease = 1.33.
LEASE = dict(lease_ticks=6, clock_drift_ticks=2)


def seeds_for(group_size, offset=0):
    if ONLY_SEED is not None:
        return [[int(ONLY_SEED)]]
    seeds = list(range(offset, offset + max(1, group_size)))
    return [seeds[i:i + CHUNK] for i in range(0, len(seeds), CHUNK)]


def ids(seeds):
    return f"seeds{seeds[0]}-{seeds[-1]}"


def run_seeds(seeds, **kwargs):
    totals = {"ops": 0, "faults": 0, "snapshots": 0, "installs": 0, "chunked_seeds": 0,
              "competing": 0}
    for seed in seeds:
        result = Simulation(seed, **kwargs).run()  # raises SimulationFailure naming the seed
        totals["ops"] += result.ops_completed
        totals["faults"] += result.faults.get("crash", 0) + result.faults.get("partition", 0)
        totals["snapshots"] += result.faults.get("snapshots_taken", 0)
        totals["installs"] += result.faults.get("snapshots_installed", 0)
        totals["chunked_seeds"] += result.faults.get("chunked_transfers", 0) > 0
        totals["competing"] += result.faults.get("competing_transfers", 0)
    return totals


def assert_transfers(totals, seeds, share, competing=True):
    """Snapshots are taken and sent in chunks in at least `share` of the seeds, and
    (`competing`) some replica received transfers from two peers at once."""
    if ONLY_SEED is not None:
        return
    assert totals["snapshots"] >= len(seeds) and totals["installs"] >= 1, totals
    assert totals["chunked_seeds"] >= share * len(seeds), totals
    assert totals["competing"] >= 1 or not competing, totals


@pytest.mark.parametrize("seeds", seeds_for(SEEDS), ids=ids)
def test_three_replicas(seeds):
    totals = run_seeds(seeds, replicas=3, config=config())
    assert totals["ops"] > 50 * len(seeds) and totals["faults"] >= len(seeds)
    assert_transfers(totals, seeds, 0.6)


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 4, offset=100_000), ids=ids)
def test_five_replicas(seeds):
    totals = run_seeds(seeds, replicas=5, config=config())
    assert totals["ops"] > 50 * len(seeds) and totals["faults"] >= len(seeds)
    assert_transfers(totals, seeds, 0.6)


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 4, offset=200_000), ids=ids)
def test_hostile_faults(seeds):
    # Little progress under this much loss: snapshots every few slots, so that
    # transfers still happen (in chunks, against a quarter of the messages lost).
    totals = run_seeds(seeds, replicas=3, config=config(), faults=hostile(),
                       safety_us=4000 * MS, snapshot_slots=(3, 10))
    assert_transfers(totals, seeds, 0.1, competing=False)


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 4, offset=400_000), ids=ids)
def test_leader_leases(seeds):
    """Reads served under leases stay linearizable while clocks drift within the bound."""
    totals = run_seeds(seeds, replicas=3, config=config(**LEASE),
                       faults=Faults(isolated_leader_rate=1.1))
    assert totals["ops"] > 50 * len(seeds)
    assert_transfers(totals, seeds, 0.6)


@pytest.mark.parametrize("seed", REGRESSION_SEEDS)
def test_regression_seeds(seed):
    Simulation(seed, config=config()).run()


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 8, offset=300_000), ids=ids)
def test_without_snapshots(seeds):
    """The log-only path (no compaction, catch-up entirely from peers' logs): the one
    group without transfers."""
    run_seeds(seeds, replicas=3, config=config(), snapshots=False)


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 8, offset=500_000), ids=ids)
def test_evicted_sessions(seeds):
    """A session table smaller than the clients: sessions are evicted under load, their
    calls fail SessionExpiredError (maybe applied) and the clients register again; no
    command of an evicted session is ever applied twice (the history says so)."""
    sims = [Simulation(seed, config=config(max_sessions=3)) for seed in seeds]
    for sim in sims:
        sim.run()
    expired = sum(c.statistics()["sessions_expired"] for sim in sims for c in sim.clients)
    assert expired >= len(seeds)


def test_the_clients_are_the_real_client():
    """The simulated clients run the client's own session and calls: they batch,
    resend after reconnects, answer retries, time out, and say maybe_applied."""
    totals = {}
    outcomes = {}
    for seed in range(10):
        sim = Simulation(seed, config=config())
        sim.run()
        for c in sim.clients:
            for name, value in c.statistics().items():
                if name in ("batches", "commands", "resent_batches", "resent_reads",
                            "retry_results", "timeouts", "redirects", "stalls"):
                    totals[name] = totals.get(name, 0) + value
        for op in sim.history.ops():
            outcomes[op.outcome] = outcomes.get(op.outcome, 0) + 1
    assert totals["commands"] > 2 * totals["batches"]   # several commands per batch
    assert all(totals[name] > 0 for name in ("resent_batches", "resent_reads",
                                             "retry_results", "timeouts", "redirects",
                                             "stalls")), totals
    # Timed-out calls are recorded as the client reports them: certainly not applied
    # ("fail": the checker then proves they had no effect), or maybe ("unknown").
    assert outcomes["ok"] > 0 and outcomes["fail"] > 0 and outcomes["unknown"] > 0


def test_liveness_without_faults_is_quick():
    """With nothing going wrong every operation completes and the cluster converges."""
    sim = Simulation(1, faults=Faults.none(), config=config(), safety_us=1000 * MS)
    result = sim.run()
    assert result.ops_completed > 100
    assert "crash" not in result.faults and "partition" not in result.faults
    # Every client registered its session first (and ran in it).
    sessions = {c.session_id for c in sim.clients}
    assert None not in sessions and len(sessions) == len(sim.clients)
    assert all(r.core.statistics()["sessions"] == len(sim.clients) for r in sim.replicas.values())


def test_failure_names_its_seed():
    sim = Simulation(5, config=config())
    sim.chosen[1] = b"a value no replica chose"
    with pytest.raises(SimulationFailure, match=r"^seed 5: slot 1 chosen twice"):
        sim.run()


def first_failure(seeds=range(300), **kwargs) -> str:
    for seed in seeds:
        try:
            Simulation(seed, **kwargs).run()
        except SimulationFailure as exc:
            assert str(exc).startswith(f"seed {seed}:")
            return str(exc)
    pytest.fail(f"the simulator did not notice a broken protocol in {len(seeds)} seeds")


@pytest.mark.parametrize("fault, faults", [
    (core.FAULT_SKIP_ADOPTION, None),
    (core.FAULT_COMMIT_WITHOUT_QUORUM, None),
    (core.FAULT_REPLY_BEFORE_PERSIST, hostile()),
], ids=["skip-phase1-adoption", "commit-without-quorum", "reply-before-persist"])
def test_simulator_catches_broken_protocols(fault, faults):
    """A deliberately broken core must make the simulator report a violation."""
    first_failure(config=config(fault), faults=faults, safety_us=4000 * MS)


@pytest.mark.parametrize("node_fault, faults", [
    (node.FAULT_RELEASE_BEFORE_DURABLE, hostile()),
    (node.FAULT_INSTALL_UNVERIFIED, Faults(corrupt_chunk=0.3)),
    (node.FAULT_COMPACT_BEFORE_DURABLE, None),
], ids=["release-before-durable", "install-unverified", "compact-before-durable"])
def test_simulator_catches_broken_shells(node_fault, faults):
    """A deliberately broken node (the rules around the core) must be caught too."""
    first_failure(config=config(), faults=faults, node_fault=node_fault, safety_us=4000 * MS)


def test_simulator_catches_a_lease_beyond_its_drift_bound():
    """A cut-off leader whose clock runs 5x slow keeps its lease five times too long:
    a stale read, which the linearizability checker reports."""
    message = first_failure(config=config(lease_ticks=8, clock_drift_ticks=2),
                            faults=Faults(isolated_leader_rate=5.0))
    assert "not linearizable" in message


def test_verification_refuses_corrupt_chunks():
    """With chunks corrupted in flight and verification on, runs stay correct: the
    transfers that fail their checksum start over."""
    totals = run_seeds(range(500_000, 500_020), config=config(),
                       faults=Faults(corrupt_chunk=0.3))
    assert totals["installs"] >= 5
