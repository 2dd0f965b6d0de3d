"""The seeded simulator against the real core: hundreds of seeds with every fault.

CYPAXOS_SIM_SEEDS=N runs N seeds per group instead of the CI default;
CYPAXOS_SIM_SEED=S reruns only seed S (every failure message starts with its seed).
`python -m cypaxos.testing.sim --seed S -v` replays one seed with a trace.
"""
import os

import pytest

from cypaxos import core
from cypaxos.core import Config
from cypaxos.testing.sim import MS, Faults, Simulation, SimulationFailure

pytestmark = pytest.mark.fast

SEEDS = int(os.environ.get("CYPAXOS_SIM_SEEDS", "300"))
ONLY_SEED = os.environ.get("CYPAXOS_SIM_SEED")
CHUNK = 25

# Seeds that once failed (each found a real bug), kept as regression tests.
REGRESSION_SEEDS = [
    89,  # a leader asked a restarted peer (whose commit index went back) for catch-up forever
]


def config(fault=0):
    return Config(heartbeat_ticks=2, election_ticks=10, window_slots=8, resend_ticks=3,
                  batch_bytes_max=512, check_invariants=True, fault=fault)


def hostile():
    """Many crashes (preferring replicas with an unsynced tail), slow disks, heavy loss."""
    return Faults(drop=0.25, fault_interval_us=(20 * MS, 120 * MS),
                  disk_latency_us=(10 * MS, 80 * MS))


def seeds_for(group_size, offset=0):
    if ONLY_SEED is not None:
        return [[int(ONLY_SEED)]]
    seeds = list(range(offset, offset + group_size))
    return [seeds[i:i + CHUNK] for i in range(0, len(seeds), CHUNK)]


def run_seeds(seeds, **kwargs):
    totals = {"ops": 0, "faults": 0, "snapshots": 0, "installs": 0}
    for seed in seeds:
        result = Simulation(seed, **kwargs).run()  # raises SimulationFailure naming the seed
        totals["ops"] += result.ops_completed
        totals["faults"] += result.faults.get("crash", 0) + result.faults.get("partition", 0)
        totals["snapshots"] += result.faults.get("snapshot", 0)
        totals["installs"] += result.faults.get("snapshot_installed", 0)
    return totals


@pytest.mark.parametrize("seeds", seeds_for(SEEDS), ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_three_replicas(seeds):
    totals = run_seeds(seeds, replicas=3, config=config())
    assert totals["ops"] > 50 * len(seeds) and totals["faults"] >= len(seeds)
    # Snapshots, compaction and snapshot transfers happen inside these runs too.
    assert totals["snapshots"] >= len(seeds) and totals["installs"] >= 1


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 3, offset=100_000),
                         ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_five_replicas(seeds):
    totals = run_seeds(seeds, replicas=5, config=config())
    assert totals["ops"] > 50 * len(seeds) and totals["faults"] >= len(seeds)


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 6, offset=200_000),
                         ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_hostile_faults(seeds):
    run_seeds(seeds, replicas=3, config=config(), faults=hostile(), safety_us=4000 * MS)


@pytest.mark.parametrize("seed", REGRESSION_SEEDS)
def test_regression_seeds(seed):
    Simulation(seed, config=config()).run()


@pytest.mark.parametrize("seeds", seeds_for(SEEDS // 6, offset=300_000),
                         ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_without_snapshots(seeds):
    """The log-only path (no compaction, catch-up entirely from peers' logs)."""
    run_seeds(seeds, replicas=3, config=config(), snapshots=False)


def test_liveness_without_faults_is_quick():
    """With nothing going wrong every operation completes and the cluster converges."""
    sim = Simulation(1, faults=Faults.none(), config=config(), safety_us=1000 * MS)
    result = sim.run()
    assert result.ops_completed > 100
    assert "crash" not in result.faults and "partition" not in result.faults
    # Every client registered its session first (and ran in it).
    sessions = {c.session for c in sim.clients}
    assert None not in sessions and len(sessions) == len(sim.clients)
    assert all(n.core.statistics()["sessions"] == len(sim.clients) for n in sim.nodes.values())


def test_failure_names_its_seed():
    sim = Simulation(5, config=config())
    sim.chosen[1] = b"a value no replica chose"
    with pytest.raises(SimulationFailure, match=r"^seed 5: slot 1 chosen twice"):
        sim.run()


@pytest.mark.parametrize("fault, faults", [
    (core.FAULT_SKIP_ADOPTION, None),
    (core.FAULT_COMMIT_WITHOUT_QUORUM, None),
    (core.FAULT_REPLY_BEFORE_PERSIST, hostile()),
], ids=["skip-phase1-adoption", "commit-without-quorum", "reply-before-persist"])
def test_simulator_catches_broken_protocols(fault, faults):
    """A deliberately broken core must make the simulator report a violation."""
    for seed in range(200):
        try:
            Simulation(seed, config=config(fault), faults=faults, safety_us=4000 * MS).run()
        except SimulationFailure as exc:
            assert str(exc).startswith(f"seed {seed}:")
            return
    pytest.fail("the simulator did not notice a broken protocol in 200 seeds")
