"""A seeded, deterministic simulator for a cluster of production replica nodes.

Each replica is a `cypaxos.replica.node.ReplicaNode` (the code the server runs) over
a simulated disk and network (`cypaxos.testing.simnode`), and each client is the real
client's calls and session over simulated TCP connections
(`cypaxos.testing.simclient`).  One seed decides
everything: message loss, duplication, delay and reordering, corrupted snapshot
chunks, partitions (one-way too), crashes that lose whatever was not yet durable (and
may keep only part of a group commit), restarts from the durable records and
snapshot, every replica's clock rate (skewed, and drifting over the run), and the
clients' workload.  A run has a *safety phase* with faults, then a *liveness phase*
with every fault healed, and checks:

* agreement: no slot is ever chosen with two different values (checked on every
  replica's every commit);
* every replica applies a prefix of that one sequence, and replicas at equal applied
  indexes have equal states (`snapshot()` bytes, and `restore(snapshot())` gives
  them back);
* the clients' history (put/get/cas/delete through the client's session, with its
  retries, resends and timeouts) is linearizable per key, and a call it reported as
  certainly not applied had no effect (with the key-value workload);
* liveness: once faults stop, every submitted operation completes within a bound and
  all replicas converge to the same commit index and state.

Snapshots are taken every few dozen slots and the log compacted aggressively, so that
lagging replicas are sent snapshots in chunks (the transfer of
`cypaxos.replica.transfer`) under every fault above.

Time is in simulated microseconds.  `Simulation(seed).run()` returns a `SimResult`;
`SimulationFailure` carries the seed.  Run one seed from the command line:
`python -m cypaxos.testing.sim --seed 42 -v`.  `cypaxos.testing.simulate` runs a
user's own state machine the same way.
"""
from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass
from typing import Optional

from cypaxos import wire
from cypaxos.core import Config
from cypaxos.testing.linearizability import History
from cypaxos.testing.simclient import SimClient as Client
from cypaxos.testing.simnode import SimReplica
from cypaxos.testing.workloads import CommandWorkload, KVWorkload, WorkloadError

MS = 1000  # microseconds per millisecond

__all__ = ["Faults", "SimResult", "Simulation", "SimulationFailure", "KVWorkload",
           "CommandWorkload", "MS", "main"]


class SimulationFailure(AssertionError):
    """A safety or liveness check failed; the message starts with the seed."""


@dataclass
class Faults:
    """How hostile a run is.  Probabilities are per message or per fault event."""

    drop: float = 0.05
    duplicate: float = 0.03
    delay_us: tuple[int, int] = (100, 3 * MS)
    long_delay: float = 0.03  # some messages are held long enough to be reordered
    long_delay_us: int = 60 * MS
    fault_interval_us: tuple[int, int] = (80 * MS, 400 * MS)
    crash: bool = True
    partition: bool = True
    torn_writes: bool = True
    disk_latency_us: tuple[int, int] = (50, 15 * MS)
    corrupt_chunk: float = 0.03  # a snapshot chunk's bytes damaged in flight
    # Each replica's tick period is tick_us times a rate drawn from clock_rates, and
    # the rate changes every clock_change_us on average (drift).  With leases, the
    # ratio of the highest rate to the lowest must stay within the configured bound,
    # 1 + clock_drift_ticks / lease_ticks (docs/testing.md).
    clock_rates: tuple[float, float] = (0.95, 1.05)
    clock_change_us: int = 300 * MS
    # The worst drift: a leader cut off from its peers gets its clock slowed to this
    # rate (its lease then lasts longer in real time), None to leave it be.
    isolated_leader_rate: float | None = None

    @classmethod
    def none(cls) -> "Faults":
        """A fault-free network and disk (used for the liveness phase)."""
        return cls(drop=0.0, duplicate=0.0, long_delay=0.0, crash=False,
                   partition=False, torn_writes=False, corrupt_chunk=0.0)


@dataclass
class SimResult:
    """What one run did, for reports and assertions."""

    seed: int
    ops_completed: int
    ops_unknown: int
    faults: dict
    commit_index: int
    elections: int
    messages: int


class Simulation:
    """One seeded run of a cluster under faults, with safety and liveness checks.

    `node_fault` sets test-only `cypaxos.replica.node.FAULT_*` bits (a broken shell the
    run must catch).  `workload` is a `KVWorkload` (default) or a `CommandWorkload`.
    """

    def __init__(self, seed: int, replicas: int = 3, clients: int = 4,
                 faults: Faults | None = None, config: Config | None = None,
                 safety_us: int = 2_500 * MS, liveness_us: int = 6_000 * MS,
                 keys: int = 4, verbose: bool = False, snapshots: bool = True,
                 node_fault: int = 0, workload=None,
                 snapshot_slots: tuple[int, int] = (10, 60)) -> None:
        self.seed = seed
        self.snapshots = snapshots
        self.snapshot_slots = snapshot_slots  # each replica snapshots every N slots, N in it
        self.node_fault = node_fault
        self.rng = random.Random(seed)
        self.faults = faults if faults is not None else Faults()
        self.config = config if config is not None else Config(
            heartbeat_ticks=2, election_ticks=10, window_slots=8, resend_ticks=3,
            batch_bytes_max=512, check_invariants=True)
        if self.rng.random() < 0.5:
            # Half the runs use pre-vote, as the server does.
            settings = self.config.as_dict()
            settings["pre_vote"] = True
            self.config = Config(**settings)
        self.workload = workload if workload is not None else KVWorkload(keys)
        self.tick_us = 10 * MS
        self.safety_us = safety_us
        self.liveness_us = liveness_us
        self.verbose = verbose
        self.ids = list(range(1, replicas + 1))
        self.addresses = {i: f"sim-{i}:7000" for i in self.ids}
        self.address_ids = {a: i for i, a in self.addresses.items()}
        self.cluster_id = "sim"
        self.now = 0
        self.events: list = []
        self.seq = 0
        self.ids_issued = 0
        self.blocked: set[tuple[int, int]] = set()  # (src, dst) pairs that lose everything
        self.chosen: dict[int, bytes] = {}
        self.fault_counts: dict[str, int] = {}
        self.messages = 0
        self.healing = False
        self.replicas = {i: SimReplica(self, i) for i in self.ids}
        self.clients = [Client(self, 1000 + c, depth=1 + (c % 3)) for c in range(clients)]
        self.client_by_id = {c.cid: c for c in self.clients}

    @property
    def history(self) -> History:
        """The clients' history (key-value workload)."""
        return self.workload.history

    # -- plumbing

    def new_id(self) -> int:
        self.ids_issued += 1
        return self.ids_issued

    def new_state_machine(self):
        return self.workload.new_state_machine()

    def validate_state(self, state: bytes) -> None:
        """The nodes' check that a received state restores (a scratch state machine)."""
        self.new_state_machine().restore(state)

    def schedule(self, when: int, kind: str, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, args))

    def after_disk(self, rid: int, done, *args, scale: float = 1) -> None:
        """Run `done(*args)` once a disk operation of replica `rid` ends (never if the
        replica crashes first)."""
        low, high = self.faults.disk_latency_us
        due = self.now + int(scale * self.rng.randint(low, high))
        self.schedule(due, "disk", rid, self.replicas[rid].incarnation, done, args)

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"{self.now / MS:10.3f}ms {text}", file=sys.stderr)

    def delay(self) -> int:
        f = self.faults
        if not self.healing and self.rng.random() < f.long_delay:
            return self.rng.randint(f.delay_us[1], f.long_delay_us)
        return self.rng.randint(*f.delay_us)

    def lossy(self, src: int, dst: int) -> tuple[bool, bool]:
        """(deliver at all, deliver twice) for one message."""
        if (src, dst) in self.blocked:
            return False, False
        if self.healing:
            return True, False
        return self.rng.random() >= self.faults.drop, self.rng.random() < self.faults.duplicate

    def send(self, src: int, dst: int, msg: tuple) -> None:
        self.messages += 1
        deliver, twice = self.lossy(src, dst)
        if deliver:
            if (msg[0] == wire.SNAPSHOT_CHUNK and not self.healing and msg[5]
                    and self.rng.random() < self.faults.corrupt_chunk):
                data = bytearray(msg[5])
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
                msg = msg[:5] + (bytes(data),)
                self.count("corrupt_chunk")
            self.schedule(self.now + self.delay(), "deliver", src, dst, msg)
            if twice:
                self.schedule(self.now + self.delay(), "deliver", src, dst, msg)

    def to_client(self, rid: int, conn, reply: list) -> None:
        """Replica `rid`'s reply on a client's connection (a `simclient.SimConnection`)."""
        conn.reply(reply)

    # -- checks

    def check_commits(self, replica: SimReplica) -> None:
        """Agreement: every newly committed slot matches what any replica ever chose."""
        core = replica.core
        for slot in range(max(replica.checked_commit + 1, core.log_start), core.commit_index + 1):
            value = core.chosen_value(slot)
            seen = self.chosen.setdefault(slot, value)
            if seen != value:
                raise SimulationFailure(
                    f"seed {self.seed}: slot {slot} chosen twice with different values "
                    f"(replica {replica.rid} has {value[:40]!r}, another had {seen[:40]!r})")
        replica.checked_commit = max(replica.checked_commit, core.commit_index)

    def check_states(self) -> None:
        """Replicas at equal applied indexes hold equal states, and each state survives
        `restore(snapshot())`."""
        by_index: dict[int, tuple[int, bytes]] = {}
        for replica in self.replicas.values():
            if not replica.up:
                continue
            core = replica.core
            state = core.state_machine.snapshot()
            other = by_index.setdefault(core.applied_index, (replica.rid, state))
            if other[1] != state:
                raise SimulationFailure(
                    f"seed {self.seed}: replicas {other[0]} and {replica.rid} differ at "
                    f"applied index {core.applied_index} (snapshot() bytes differ)")
            scratch = self.new_state_machine()
            scratch.restore(state)
            if scratch.snapshot() != state:
                raise SimulationFailure(
                    f"seed {self.seed}: replica {replica.rid}: restore(snapshot()) does not "
                    f"give the same state back at applied index {core.applied_index}")

    # -- faults

    def count(self, name: str, n: int = 1) -> None:
        self.fault_counts[name] = self.fault_counts.get(name, 0) + n

    def leader(self) -> Optional[int]:
        return next((r.rid for r in self.replicas.values() if r.up and r.core.role == "leader"),
                    None)

    def inject_fault(self) -> None:
        f = self.faults
        choices = []
        if f.crash:
            choices += ["crash", "crash_leader"]
        if f.partition:
            choices += ["isolate", "isolate_leader", "one_way", "split", "heal", "heal"]
        if not choices:
            return
        kind = self.rng.choice(choices)
        leader = self.leader()
        if kind in ("crash", "crash_leader"):
            up = [r for r in self.replicas.values() if r.up]
            # Crashes that lose an unsynced tail are the interesting ones: prefer them.
            dirty = [r for r in up if r.storage.unsynced]
            pool = dirty if dirty and self.rng.random() < 0.7 else up
            target = leader if kind == "crash_leader" and leader else (
                self.rng.choice(pool).rid if pool else None)
            if target is None or not self.replicas[target].up:
                return
            self.replicas[target].crash()
            for client in self.clients:
                client.replica_crashed(target)   # its connections are reset
            self.count("crash")
            self.log(f"crash {target}")
            self.schedule(self.now + self.rng.randint(20 * MS, 600 * MS), "restart", target)
        elif kind in ("isolate", "isolate_leader"):
            target = leader if kind == "isolate_leader" and leader else self.rng.choice(self.ids)
            self.blocked |= {(target, o) for o in self.ids if o != target}
            self.blocked |= {(o, target) for o in self.ids if o != target}
            self.count("partition")
            self.log(f"isolate {target}")
            if target == leader and f.isolated_leader_rate is not None:
                self.replicas[target].rate = f.isolated_leader_rate
                self.replicas[target].rate_held = True
        elif kind == "one_way":
            a, b = self.rng.sample(self.ids, 2)
            self.blocked.add((a, b))
            self.count("partition")
            self.log(f"one-way {a} -x-> {b}")
        elif kind == "split":
            shuffled = self.ids[:]
            self.rng.shuffle(shuffled)
            cut = self.rng.randint(1, len(shuffled) - 1)
            left, right = shuffled[:cut], shuffled[cut:]
            self.blocked |= {(a, b) for a in left for b in right}
            self.blocked |= {(b, a) for a in left for b in right}
            self.count("partition")
            self.log(f"split {left} | {right}")
        else:
            self.heal()

    def heal(self) -> None:
        self.blocked = set()
        for replica in self.replicas.values():
            replica.rate_held = False
        self.log("heal")

    def new_rate(self) -> float:
        return self.rng.uniform(*self.faults.clock_rates)

    # -- the run

    def run(self) -> SimResult:
        """Run the safety phase, heal, run the liveness phase, and check everything."""
        try:
            return self._run()
        except SimulationFailure:
            raise
        except WorkloadError as exc:
            raise SimulationFailure(f"seed {self.seed}: {exc}") from exc
        except Exception as exc:  # an invariant or a crash inside the node is a failure too
            raise SimulationFailure(f"seed {self.seed}: {type(exc).__name__}: {exc}") from exc
        finally:
            for client in self.clients:
                client.shutdown()   # calls still parked end here (checked already)

    def _run(self) -> SimResult:
        for replica in self.replicas.values():
            replica.rate = self.new_rate()
            self.schedule(self.rng.randint(0, self.tick_us), "tick", replica.rid)
            if self.faults.clock_change_us:
                self.schedule(self.rng.randint(0, 2 * self.faults.clock_change_us),
                              "clock_change", replica.rid)
        for c in self.clients:
            self.schedule(self.rng.randint(0, 50 * MS), "client_start", c.cid)
        self.schedule(self.rng.randint(*self.faults.fault_interval_us), "fault")
        self.schedule(self.safety_us, "heal_all")
        deadline = self.safety_us + self.liveness_us
        while self.events:
            when, _, kind, args = heapq.heappop(self.events)
            if when > deadline:
                break
            self.now = when
            getattr(self, "on_" + kind)(*args)
            if self.healing and not any(c.busy() for c in self.clients) and self.converged():
                break
        return self.finish()

    def converged(self) -> bool:
        cores = [r.core for r in self.replicas.values() if r.up]
        return (len(cores) == len(self.replicas)
                and len({(c.commit_index, c.applied_index) for c in cores}) == 1
                and any(c.role == "leader" for c in cores))

    def live(self, rid: int, incarnation: int | None = None) -> Optional[SimReplica]:
        replica = self.replicas[rid]
        if not replica.up or (incarnation is not None and replica.incarnation != incarnation):
            return None
        return replica

    def after_node(self, replica: SimReplica) -> None:
        """Checks after a node handled an input."""
        if replica.up:
            if replica.node.fatal is not None:
                raise replica.node.fatal
            self.check_commits(replica)

    def on_tick(self, rid: int) -> None:
        replica = self.replicas[rid]
        if replica.up:
            replica.node.tick()
            replica.node.drive()
            self.after_node(replica)
        self.schedule(self.now + int(self.tick_us * replica.rate), "tick", rid)

    def on_clock_change(self, rid: int) -> None:
        replica = self.replicas[rid]
        if not replica.rate_held:
            replica.rate = self.new_rate()
        self.schedule(self.now + self.rng.randint(1, 2 * self.faults.clock_change_us),
                      "clock_change", rid)

    def on_drive(self, rid: int, incarnation: int) -> None:
        replica = self.live(rid, incarnation)
        if replica is not None:
            replica.drive_due = False
            replica.node.drive()
            self.after_node(replica)

    def on_disk(self, rid: int, incarnation: int, done, args) -> None:
        replica = self.live(rid, incarnation)
        if replica is not None:
            done(*args)
            self.after_node(replica)

    def on_deliver(self, src: int, dst: int, msg: tuple) -> None:
        replica = self.replicas[dst]
        if replica.up and (src, dst) not in self.blocked:
            node = replica.node
            if node.on_peer_message(src, msg):
                node.drive()
            self.after_node(replica)

    def on_restart(self, rid: int) -> None:
        replica = self.replicas[rid]
        if not replica.up:
            replica.start()
            self.log(f"restart {rid}")
            for other in self.replicas.values():
                if other.up:
                    self.check_commits(other)

    def on_client_start(self, cid: int) -> None:
        self.client_by_id[cid].on_timer()
        self.schedule(self.now + 5 * MS, "client_timer", cid)

    def on_client_timer(self, cid: int) -> None:
        self.client_by_id[cid].on_timer()
        self.schedule(self.now + 5 * MS, "client_timer", cid)

    def on_client_event(self, handler, *args) -> None:
        """Something on a client's simulated connection (`cypaxos.testing.simclient`)."""
        handler(*args)

    def client_request(self, rid: int, conn, request: tuple) -> None:
        """A client's request reaches replica `rid` (if it is up): its node handles it."""
        replica = self.replicas[rid]
        if replica.up:
            replica.node.on_client_request(conn, request)
            self.after_node(replica)

    def on_fault(self) -> None:
        if self.healing:
            return
        self.inject_fault()
        self.schedule(self.now + self.rng.randint(*self.faults.fault_interval_us), "fault")

    def on_heal_all(self) -> None:
        """End of the safety phase: heal everything, stop new operations."""
        self.healing = True
        self.heal()
        for replica in self.replicas.values():
            if not replica.up:
                replica.start()
        for c in self.clients:
            c.stopped = True
        self.log("heal all; liveness phase")

    def finish(self) -> SimResult:
        replicas = self.replicas.values()
        stuck = [c.cid for c in self.clients if c.busy()]
        if stuck:
            raise SimulationFailure(
                f"seed {self.seed}: liveness: clients {stuck} still waiting "
                f"{self.liveness_us / MS:.0f}ms after faults stopped "
                f"(roles {[r.core.role for r in replicas]}, "
                f"commits {[r.core.commit_index for r in replicas]})")
        if not self.converged():
            raise SimulationFailure(
                f"seed {self.seed}: liveness: replicas did not converge: "
                f"{[(r.rid, r.core.role, r.core.commit_index, r.core.applied_index) for r in replicas]}")
        for replica in replicas:
            self.check_commits(replica)
        self.check_states()
        self.workload.check(self)
        for name in ("snapshots_taken", "snapshots_installed", "snapshots_sent"):
            total = sum(r.counter(name) for r in replicas)
            if total:
                self.count(name, total)
        for name in ("chunked_transfers", "competing_transfers"):
            total = sum(getattr(r.storage, name) for r in replicas)
            if total:
                self.count(name, total)
        done, unknown = self.workload.completed()
        return SimResult(
            seed=self.seed,
            ops_completed=done,
            ops_unknown=unknown,
            faults=dict(self.fault_counts),
            commit_index=max(r.core.commit_index for r in replicas),
            elections=sum(r.core.statistics()["elections"] for r in replicas),
            messages=self.messages,
        )


def main(argv: list[str] | None = None) -> int:
    """Run one seed or a range of seeds and print what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--seeds", type=int, default=100, help="run seeds 0..N-1")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--fault", type=int, default=0, help="a core FAULT_* bitmask (tests only)")
    parser.add_argument("--node-fault", type=int, default=0,
                        help="a replica node FAULT_* bitmask (tests only)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.seeds)
    failed = 0
    for seed in seeds:
        config = Config(heartbeat_ticks=2, election_ticks=10, window_slots=8, resend_ticks=3,
                        batch_bytes_max=512, check_invariants=True, fault=args.fault)
        try:
            r = Simulation(seed, replicas=args.replicas, config=config, verbose=args.verbose,
                           node_fault=args.node_fault).run()
            print(f"seed {seed}: ok ops={r.ops_completed} unknown={r.ops_unknown} "
                  f"commit={r.commit_index} elections={r.elections} faults={r.faults}")
        except SimulationFailure as exc:
            failed += 1
            print(f"FAILED {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
