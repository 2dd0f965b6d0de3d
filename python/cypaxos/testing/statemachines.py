"""Run your own state machine inside the production replica node, under seeded faults.

    from cypaxos.testing import simulate
    import ledger

    def workload(rng):                      # one command (bytes) per call
        ...

    report = simulate(ledger.Ledger, workload, seeds=range(200))

Each seed runs a cluster of `replicas` production `ReplicaNode`s with your state
machine over the simulator's disk and network (`cypaxos.testing.sim`: loss,
duplication, reordering, partitions, crashes losing unsynced writes, snapshots every
few dozen slots and snapshot transfers to lagging replicas, corrupted chunks,
drifting clocks), with clients submitting `workload(rng)` commands through sessions.
After the faults heal every command must complete, and:

* every replica applied the same sequence of commands (agreement, checked on every
  commit);
* replicas at equal applied indexes return equal `snapshot()` bytes;
* `restore(snapshot())` into a fresh instance gives the same `snapshot()` back.

A state machine that is not deterministic (a clock, randomness, iteration over an
unordered set leaking into its state or snapshot) or whose snapshot does not round-trip
makes a seed fail: `simulate` raises `SimulationFailure` whose message starts with the
seed and ends with a one-line reproduction:

    python -m cypaxos.testing.statemachines ledger:Ledger mymodule:workload --seed 17
"""
from __future__ import annotations

import argparse
import importlib
import random
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from cypaxos.core import Config
from cypaxos.testing.sim import MS, CommandWorkload, Faults, Simulation, SimulationFailure

__all__ = ["simulate", "SimulateReport", "main"]


@dataclass
class SimulateReport:
    """What `simulate` ran: seeds, commands completed, snapshots sent between replicas."""

    seeds: int
    commands: int
    snapshots_installed: int


def _name(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def simulate(state_machine_class: type, workload: Callable[[random.Random], bytes], *,
             seeds: Iterable[int] = range(100), replicas: int = 3, clients: int = 4,
             faults: Optional[Faults] = None, safety_ms: int = 2500,
             liveness_ms: int = 6000) -> SimulateReport:
    """Run `state_machine_class` (apply/query/snapshot/restore, as for
    `--state-machine`) in every replica of a simulated cluster, once per seed.

    `workload(rng)` returns the next command's bytes (use only `rng` for randomness,
    so that a seed replays).  Raises `SimulationFailure` at the first failing seed.
    """
    commands = installed = count = 0
    for seed in seeds:
        sim = Simulation(seed, replicas=replicas, clients=clients, faults=faults,
                         config=Config(heartbeat_ticks=2, election_ticks=10, window_slots=8,
                                       resend_ticks=3, batch_bytes_max=512,
                                       check_invariants=True),
                         safety_us=safety_ms * MS, liveness_us=liveness_ms * MS,
                         workload=CommandWorkload(state_machine_class, workload))
        try:
            result = sim.run()
        except SimulationFailure as exc:
            repro = (f"python -m cypaxos.testing.statemachines {_name(state_machine_class)} "
                     f"{_name(workload)} --seed {seed} --replicas {replicas}")
            raise SimulationFailure(f"{exc}\nreproduce: {repro}") from exc
        count += 1
        commands += result.ops_completed
        installed += result.faults.get("snapshots_installed", 0)
    return SimulateReport(seeds=count, commands=commands, snapshots_installed=installed)


def _load(spec: str) -> Any:
    module, sep, name = spec.partition(":")
    if not sep:
        raise SystemExit(f"{spec!r} is not module:name")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> int:
    """`python -m cypaxos.testing.statemachines SM_CLASS WORKLOAD [--seed S | --seeds N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_machine", help="module:Class of the state machine")
    parser.add_argument("workload", help="module:function(rng) -> command bytes")
    parser.add_argument("--seed", type=int, help="run just this seed")
    parser.add_argument("--seeds", type=int, default=100, help="run seeds 0..N-1")
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.seeds)
    try:
        report = simulate(_load(args.state_machine), _load(args.workload), seeds=seeds,
                          replicas=args.replicas)
    except SimulationFailure as exc:
        print(f"FAILED {exc}")
        return 1
    print(f"ok: {report.seeds} seeds, {report.commands} commands, "
          f"{report.snapshots_installed} snapshots installed by transfer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
