"""`cypaxos.testing.simulate`: users' state machines inside the production node, under
the simulator's faults (docs/state-machines.md, "Testing a state machine")."""
import json
import os
import random
import subprocess
import sys

import pytest

from cypaxos.testing import SimulationFailure, simulate

pytestmark = pytest.mark.fast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "docs", "examples"))

import ledger  # noqa: E402  (docs/examples/ledger.py)


def test_the_ledger_passes_and_is_sent_by_snapshot_transfer():
    report = simulate(ledger.Ledger, ledger.workload, seeds=range(30))
    assert report.seeds == 30
    assert report.commands > 30 * 100
    assert report.snapshots_installed >= 10


class Jittery:
    """Counts commands, plus a little noise: not deterministic."""

    def __init__(self):
        self.total = 0.0

    def apply(self, command: bytes) -> bytes:
        self.total += len(command) + random.random() / 1e6
        return b""

    def query(self, query: bytes) -> bytes:
        return repr(self.total).encode()

    def snapshot(self) -> bytes:
        return repr(self.total).encode()

    def restore(self, data: bytes) -> None:
        self.total = float(data)


class ForgetfulRestore:
    """Deterministic, but restore() drops the command count that snapshot() keeps."""

    def __init__(self):
        self.state = {"sum": 0, "count": 0}

    def apply(self, command: bytes) -> bytes:
        self.state["sum"] += command[0]
        self.state["count"] += 1
        return b""

    def query(self, query: bytes) -> bytes:
        return b""

    def snapshot(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def restore(self, data: bytes) -> None:
        self.state = {"sum": json.loads(data)["sum"], "count": 0}


def small_commands(rng):
    return bytes([rng.randrange(1, 256)])


def test_a_nondeterministic_state_machine_is_caught_with_its_seed():
    with pytest.raises(SimulationFailure) as caught:
        simulate(Jittery, small_commands, seeds=range(20))
    message = str(caught.value)
    assert message.startswith("seed ") and "snapshot() bytes differ" in message
    seed = int(message.split()[1].rstrip(":"))
    assert message.splitlines()[-1] == (
        f"reproduce: python -m cypaxos.testing.statemachines {__name__}:Jittery "
        f"{__name__}:small_commands --seed {seed} --replicas 3")


def test_a_snapshot_that_does_not_round_trip_is_caught():
    with pytest.raises(SimulationFailure, match="restore.snapshot.*does not give|differ"):
        simulate(ForgetfulRestore, small_commands, seeds=range(20))


def test_the_reproduction_line_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(HERE, "..", "docs", "examples"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "cypaxos.testing.statemachines", "ledger:Ledger",
                          "ledger:workload", "--seed", "3"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: 1 seeds")
    assert "Traceback" not in out.stderr
