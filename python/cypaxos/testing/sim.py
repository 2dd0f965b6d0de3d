"""A seeded, deterministic simulator for a cluster of cypaxos cores.

One seed decides everything: message loss, duplication, delay and reordering,
partitions (one-way too), crashes that lose whatever was not yet durable (and may keep
only part of a group commit), restarts from the durable records, and the clients'
workload.  A run has a *safety phase* with faults, then a *liveness phase* with every
fault healed, and checks:

* agreement: no slot is ever chosen with two different values (checked on every
  replica's every commit);
* every replica applies a prefix of that one sequence, and replicas at equal applied
  indexes have equal state digests;
* the clients' history (put/get/cas/delete through the real client's session, with
  its retries, resends and timeouts: `cypaxos.testing.simclient`) is linearizable
  per key, and a call it reported as certainly not applied had no effect;
* liveness: once faults stop, every submitted operation completes within a bound and
  all replicas converge to the same commit index and state digest.

Time is in simulated microseconds; each replica ticks on its own slightly skewed clock.
`Simulation(seed).run()` returns a `SimResult`; `SimulationFailure` carries the seed.
Run one seed from the command line: `python -m cypaxos.testing.sim --seed 42 -v`.
"""
from __future__ import annotations

import argparse
import heapq
import random
import struct
import sys
from dataclasses import dataclass, field

from cypaxos import wire
from cypaxos.core import NOT_LEADER, PROPOSED, BatchError, Config, Replica
from cypaxos.statemachine import KVStore
from cypaxos.testing.linearizability import History, check
from cypaxos.testing.simclient import SimClient as Client

MS = 1000  # microseconds per millisecond



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
    clock_skew: float = 0.05  # each replica's tick period differs by up to this fraction

    @classmethod
    def none(cls) -> "Faults":
        """A fault-free network and disk (used for the liveness phase)."""
        return cls(drop=0.0, duplicate=0.0, long_delay=0.0, crash=False,
                   partition=False, torn_writes=False)


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


class Disk:
    """A replica's disk: records become durable only when a sync covering them ends.

    Record positions count from the first record ever written; `base` records at the
    front were deleted by log compaction.
    """

    def __init__(self) -> None:
        self.base = 0
        self.durable: list = []
        self.unsynced: list = []
        self.sync_due: int | None = None  # when the sync in flight ends
        self.sync_covers = 0  # position up to which the sync in flight makes records durable
        self.snapshot = None  # the latest durable snapshot (index, promised, sessions, state)

    @property
    def written(self) -> int:
        """Position after the last record handed to the disk (durable or not)."""
        return self.base + len(self.durable) + len(self.unsynced)

    @property
    def durable_end(self) -> int:
        return self.base + len(self.durable)

    def truncate_before(self, position: int) -> None:
        """Delete durable records before `position` (they are covered by a snapshot)."""
        drop = min(position, self.durable_end) - self.base
        if drop > 0:
            del self.durable[:drop]
            self.base += drop

    def crash(self, rng: random.Random, torn: bool) -> None:
        """Lose what was not durable; a torn group commit may keep part of it, in order."""
        keep = rng.randrange(len(self.unsynced) + 1) if torn and self.unsynced else 0
        self.durable.extend(self.unsynced[:keep])
        self.unsynced = []
        self.sync_due = None
        self.sync_covers = 0


class Node:
    """One replica process: its core, disk, clock and the shell's pending client work."""

    def __init__(self, sim: "Simulation", rid: int) -> None:
        self.sim = sim
        self.rid = rid
        self.disk = Disk()
        self.up = True
        self.incarnation = 0
        skew = 1 + sim.rng.uniform(-sim.faults.clock_skew, sim.faults.clock_skew)
        self.tick_us = int(sim.tick_us * skew)
        self.core: Replica = None  # type: ignore[assignment]
        self.after: list = []  # (records_written_required, persist_id, messages)
        self.pending_batches: dict = {}  # (session, first_seq) -> (connection, request id)
        self.pending_reads: dict = {}  # read id -> (connection, request id, queries)
        self.checked_commit = 0
        self.snapshot_every = sim.rng.randint(10, 60) if sim.snapshots else 0
        self.start()

    def start(self) -> None:
        """Boot (or reboot) from whatever is durable: the latest snapshot and the log."""
        self.incarnation += 1
        self.core = Replica(self.rid, self.sim.ids, KVStore(), self.sim.config,
                            seed=self.sim.seed * 1000 + self.rid * 10 + self.incarnation)
        self.core.recover(list(self.sim.decode_records(self.disk.durable)), self.disk.snapshot)
        self.after = []
        self.pending_batches = {}
        self.pending_reads = {}
        self.checked_commit = 0
        self.snapshot_writing = False  # a snapshot file is being written
        self.restating = None  # (snapshot, cut): the next Ready restates the log
        self.compaction = None  # (snapshot, cut, restate_end) waiting to become durable
        self.sending_snapshot: set[int] = set()
        self.up = True
        self.sim.check_commits(self)

    def maybe_snapshot(self) -> None:
        """Take a snapshot every `snapshot_every` applied slots (one at a time)."""
        core = self.core
        last = self.disk.snapshot[0] if self.disk.snapshot else 0
        if (self.snapshot_every and not self.snapshot_writing and self.compaction is None
                and core.applied_index - last >= self.snapshot_every):
            self.restating = (core.snapshot(), self.disk.written)
            self.snapshot_writing = True
            self.sim.count("snapshot")

    def after_restatement(self, snapshot, cut: int, write_snapshot: bool) -> None:
        """The Ready just handled restated the log: compaction may follow once durable."""
        self.compaction = (snapshot, cut, self.disk.written)
        if write_snapshot:
            # Writing the snapshot file takes a while; a crash meanwhile loses it.
            due = self.sim.now + 3 * self.sim.rng.randint(*self.sim.faults.disk_latency_us)
            self.sim.schedule(due, "snapshot_written", self.rid, self.incarnation)
        else:
            self.maybe_compact()

    def snapshot_written(self) -> None:
        snapshot = self.compaction[0]
        if self.disk.snapshot is None or snapshot[0] > self.disk.snapshot[0]:
            self.disk.snapshot = snapshot
        self.snapshot_writing = False
        self.maybe_compact()

    def maybe_compact(self) -> None:
        """Delete covered log records once the snapshot and the restatement are durable."""
        if self.compaction is None or self.snapshot_writing:
            return
        snapshot, cut, restate_end = self.compaction
        if self.disk.durable_end < restate_end:
            return
        self.disk.truncate_before(cut)
        # Keep a few slots in memory for slightly lagging peers; the rest go.
        self.core.compact(snapshot[0] - self.sim.rng.randint(0, 5))
        self.compaction = None
        self.sim.count("compaction")

    def install(self, snapshot) -> None:
        """A peer's snapshot arrived and was written durably: adopt it if newer."""
        if self.disk.snapshot is None or snapshot[0] > self.disk.snapshot[0]:
            self.disk.snapshot = snapshot
        index, _, sessions, state = snapshot
        if self.compaction is None and not self.snapshot_writing:
            if self.core.install_snapshot(index, sessions, state):
                self.sim.count("snapshot_installed")
                self.restating = (snapshot, self.disk.written)
                self.process(written=True)
                self.sim.check_commits(self)

    def crash(self) -> None:
        """SIGKILL: everything in memory is gone, and so is the unsynced disk tail."""
        self.up = False
        self.disk.crash(self.sim.rng, self.sim.faults.torn_writes)
        self.after = []

    def process(self, written: bool = False) -> None:
        """Carry out what the core asks (the shell's loop body)."""
        while self.up:
            if self.restating is None:
                self.maybe_snapshot()
            restating = self.restating
            self.restating = None
            rd = self.core.ready()
            if rd is None:
                return
            sim = self.sim
            for peer in rd.snapshot_to:
                if self.disk.snapshot is not None and peer not in self.sending_snapshot:
                    self.sending_snapshot.add(peer)
                    sim.send(self.rid, peer, ("SNAPSHOT", self.disk.snapshot))
                    sim.schedule(sim.now + 200 * MS, "snapshot_sent", self.rid, peer)
            if rd.records:
                self.disk.unsynced.extend(sim.encode_records(rd.records))
                if self.disk.sync_due is None:
                    self.disk.sync_due = sim.now + sim.rng.randint(*sim.faults.disk_latency_us)
                    self.disk.sync_covers = self.disk.written
                    sim.schedule(self.disk.sync_due, "sync", self.rid, self.incarnation)
            for to, msg in rd.messages:
                sim.send(self.rid, to, msg)
            if rd.messages_after_persist or rd.records:
                self.after.append((self.disk.written, rd.persist_id, rd.messages_after_persist))
            for sid, first, packed in rd.results:
                waiter = self.pending_batches.pop((sid, first), None)
                if waiter is not None:
                    waiter[0].reply(wire.ok(waiter[1], packed))
            for rid in rd.reads:
                conn, request_id, queries = self.pending_reads.pop(rid)
                query = self.core.state_machine.query
                conn.reply(wire.ok(request_id, [query(q) for q in queries]))
            for rid in rd.reads_failed:
                conn, request_id, _ = self.pending_reads.pop(rid)
                conn.reply(wire.redirect(request_id, self.leader_address()))
            if rd.lost_leadership:
                for conn, request_id in self.pending_batches.values():
                    conn.reply(wire.redirect(request_id, self.leader_address()))
                self.pending_batches = {}
            if restating is not None:
                self.after_restatement(restating[0], restating[1], write_snapshot=not written)
                written = False
            sim.check_commits(self)

    def sync_done(self) -> None:
        """The fsync in flight finished: release what waited for it."""
        disk = self.disk
        covered = disk.sync_covers
        moved = covered - disk.durable_end
        disk.durable.extend(disk.unsynced[:moved])
        del disk.unsynced[:moved]
        disk.sync_due = None
        ready_upto = 0
        keep = []
        for required, persist_id, msgs in self.after:
            if required <= covered:
                for to, msg in msgs:
                    self.sim.send(self.rid, to, msg)
                ready_upto = max(ready_upto, persist_id)
            else:
                keep.append((required, persist_id, msgs))
        self.after = keep
        if ready_upto:
            self.core.persisted(ready_upto)
        self.maybe_compact()
        if disk.unsynced:
            disk.sync_due = self.sim.now + self.sim.rng.randint(*self.sim.faults.disk_latency_us)
            disk.sync_covers = disk.written
            self.sim.schedule(disk.sync_due, "sync", self.rid, self.incarnation)
        self.process()

    def leader_address(self) -> str | None:
        leader = self.core.leader_id
        return self.sim.addresses.get(leader) if leader else None

    def on_client(self, conn, request: tuple) -> None:
        """A client's request (parsed by `wire.parse_client_request`) arrives on `conn`,
        which takes the replies; handled as the server handles it."""
        kind, request_id = request[0], request[1]
        if kind == "submit":
            batch = request[2]
            try:
                status = self.core.propose(batch)
            except BatchError as exc:
                conn.reply(wire.error(request_id, "bad_request", str(exc)))
                return
            if status == PROPOSED:
                self.pending_batches[struct.unpack_from("<QQ", batch)] = (conn, request_id)
            elif status == NOT_LEADER:
                conn.reply(wire.redirect(request_id, self.leader_address()))
            else:
                conn.reply(wire.error(request_id, "busy", "the leader's queue is full"))
        elif kind == "read":
            queries, stale = request[2], request[3]
            if stale:
                query = self.core.state_machine.query
                conn.reply(wire.ok(request_id, [query(q) for q in queries]))
                return
            read_id = self.sim.new_id()
            if self.core.read(read_id):
                self.pending_reads[read_id] = (conn, request_id, queries)
            else:
                conn.reply(wire.redirect(request_id, self.leader_address()))
        else:
            conn.reply(wire.error(request_id, "bad_request", f"no {kind} in the simulation"))
        self.process()


class Simulation:
    """One seeded run of a cluster under faults, with safety and liveness checks."""

    def __init__(self, seed: int, replicas: int = 3, clients: int = 4,
                 faults: Faults | None = None, config: Config | None = None,
                 safety_us: int = 2_500 * MS, liveness_us: int = 6_000 * MS,
                 keys: int = 4, verbose: bool = False, snapshots: bool = True) -> None:
        self.seed = seed
        self.snapshots = snapshots
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
        self.tick_us = 10 * MS
        self.safety_us = safety_us
        self.liveness_us = liveness_us
        self.verbose = verbose
        self.ids = list(range(1, replicas + 1))
        self.keys = [b"k%d" % i for i in range(keys)]
        self.written: dict = {k: [] for k in self.keys}
        self.now = 0
        self.events: list = []
        self.seq = 0
        self.ids_issued = 0
        self.blocked: set[tuple[int, int]] = set()  # (src, dst) pairs that lose everything
        self.chosen: dict[int, bytes] = {}
        self.history = History()
        self.fault_counts: dict[str, int] = {}
        self.messages = 0
        self.healing = False
        self.addresses = {i: f"sim-{i}:7000" for i in self.ids}
        self.address_ids = {a: i for i, a in self.addresses.items()}
        self.nodes = {i: Node(self, i) for i in self.ids}
        self.clients = [Client(self, 1000 + c, depth=1 + (c % 3)) for c in range(clients)]
        self.client_by_id = {c.cid: c for c in self.clients}

    # -- plumbing

    def new_id(self) -> int:
        self.ids_issued += 1
        return self.ids_issued

    def schedule(self, when: int, kind: str, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, args))

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"{self.now / MS:10.3f}ms {text}", file=sys.stderr)

    @staticmethod
    def encode_records(records: list) -> list:
        # Records stay tuples: the simulated disk is record-granular, and a torn
        # write loses whole trailing records (the WAL's recovery guarantees that).
        return records

    @staticmethod
    def decode_records(records: list):
        return records

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
            self.schedule(self.now + self.delay(), "deliver", src, dst, msg)
            if twice:
                self.schedule(self.now + self.delay(), "deliver", src, dst, msg)

    # -- checks

    def check_commits(self, node: Node) -> None:
        """Agreement: every newly committed slot matches what any replica ever chose."""
        core = node.core
        for slot in range(max(node.checked_commit + 1, core.log_start), core.commit_index + 1):
            value = core.chosen_value(slot)
            seen = self.chosen.setdefault(slot, value)
            if seen != value:
                raise SimulationFailure(
                    f"seed {self.seed}: slot {slot} chosen twice with different values "
                    f"(replica {node.rid} has {value[:40]!r}, another had {seen[:40]!r})")
        node.checked_commit = max(node.checked_commit, core.commit_index)

    def check_digests(self) -> None:
        by_index: dict[int, tuple[int, str]] = {}
        for node in self.nodes.values():
            if not node.up:
                continue
            core = node.core
            digest = core.state_machine.state_digest()
            other = by_index.setdefault(core.applied_index, (node.rid, digest))
            if other[1] != digest:
                raise SimulationFailure(
                    f"seed {self.seed}: replicas {other[0]} and {node.rid} differ at applied "
                    f"index {core.applied_index}: {other[1]} != {digest}")

    # -- faults

    def count(self, name: str) -> None:
        self.fault_counts[name] = self.fault_counts.get(name, 0) + 1

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
        leader = next((n.rid for n in self.nodes.values() if n.up and n.core.role == "leader"), None)
        if kind in ("crash", "crash_leader"):
            up = [n for n in self.nodes.values() if n.up]
            # Crashes that lose an unsynced tail are the interesting ones: prefer them.
            dirty = [n for n in up if n.disk.unsynced]
            pool = dirty if dirty and self.rng.random() < 0.7 else up
            target = leader if kind == "crash_leader" and leader else (
                self.rng.choice(pool).rid if pool else None)
            if target is None or not self.nodes[target].up:
                return
            self.nodes[target].crash()
            for client in self.clients:
                client.replica_crashed(target)   # their connections to it are reset
            self.count("crash")
            self.log(f"crash {target}")
            self.schedule(self.now + self.rng.randint(20 * MS, 600 * MS), "restart", target)
        elif kind in ("isolate", "isolate_leader"):
            target = leader if kind == "isolate_leader" and leader else self.rng.choice(self.ids)
            self.blocked |= {(target, o) for o in self.ids if o != target}
            self.blocked |= {(o, target) for o in self.ids if o != target}
            self.count("partition")
            self.log(f"isolate {target}")
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
            self.blocked = set()
            self.log("heal")

    # -- the run

    def run(self) -> SimResult:
        """Run the safety phase, heal, run the liveness phase, and check everything."""
        try:
            return self._run()
        except SimulationFailure:
            raise
        except Exception as exc:  # an invariant or a crash inside the core is a failure too
            raise SimulationFailure(f"seed {self.seed}: {type(exc).__name__}: {exc}") from exc
        finally:
            for client in self.clients:
                client.shutdown()   # calls still parked end here (checked already)

    def _run(self) -> SimResult:
        for node in self.nodes.values():
            self.schedule(self.rng.randint(0, node.tick_us), "tick", node.rid)
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
        cores = [n.core for n in self.nodes.values() if n.up]
        return (len(cores) == len(self.nodes)
                and len({(c.commit_index, c.applied_index) for c in cores}) == 1
                and any(c.role == "leader" for c in cores))

    def on_tick(self, rid: int) -> None:
        node = self.nodes[rid]
        if node.up:
            node.core.tick()
            node.process()
        self.schedule(self.now + node.tick_us, "tick", rid)

    def on_deliver(self, src: int, dst: int, msg: tuple) -> None:
        node = self.nodes[dst]
        if node.up and (src, dst) not in self.blocked:
            if msg[0] == "SNAPSHOT":
                # The receiver writes it durably before installing; a crash meanwhile loses it.
                due = self.now + 3 * self.rng.randint(*self.faults.disk_latency_us)
                self.schedule(due, "snapshot_received", dst, node.incarnation, msg[1])
                return
            node.core.step(msg)
            node.process()

    def on_snapshot_received(self, rid: int, incarnation: int, snapshot) -> None:
        node = self.nodes[rid]
        if node.up and node.incarnation == incarnation:
            node.install(snapshot)

    def on_snapshot_written(self, rid: int, incarnation: int) -> None:
        node = self.nodes[rid]
        if node.up and node.incarnation == incarnation:
            node.snapshot_written()

    def on_snapshot_sent(self, rid: int, peer: int) -> None:
        self.nodes[rid].sending_snapshot.discard(peer)

    def on_sync(self, rid: int, incarnation: int) -> None:
        node = self.nodes[rid]
        if node.up and node.incarnation == incarnation and node.disk.sync_due == self.now:
            node.sync_done()

    def on_restart(self, rid: int) -> None:
        node = self.nodes[rid]
        if not node.up:
            node.start()
            self.log(f"restart {rid}")
            for other in self.nodes.values():
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

    def on_fault(self) -> None:
        if self.healing:
            return
        self.inject_fault()
        self.schedule(self.now + self.rng.randint(*self.faults.fault_interval_us), "fault")

    def on_heal_all(self) -> None:
        """End of the safety phase: heal everything, stop new operations."""
        self.healing = True
        self.blocked = set()
        for node in self.nodes.values():
            if not node.up:
                node.start()
        for c in self.clients:
            c.stopped = True
        self.log("heal all; liveness phase")

    def finish(self) -> SimResult:
        stuck = [c.cid for c in self.clients if c.busy()]
        if stuck:
            raise SimulationFailure(
                f"seed {self.seed}: liveness: clients {stuck} still waiting "
                f"{self.liveness_us / MS:.0f}ms after faults stopped "
                f"(roles {[n.core.role for n in self.nodes.values()]}, "
                f"commits {[n.core.commit_index for n in self.nodes.values()]})")
        if not self.converged():
            raise SimulationFailure(
                f"seed {self.seed}: liveness: replicas did not converge: "
                f"{[(n.rid, n.core.role, n.core.commit_index, n.core.applied_index) for n in self.nodes.values()]}")
        for node in self.nodes.values():
            self.check_commits(node)
        self.check_digests()
        ops = self.history.ops()
        result = check(ops)
        if not result.ok:
            raise SimulationFailure(f"seed {self.seed}: not linearizable: {result.message}")
        return SimResult(
            seed=self.seed,
            ops_completed=sum(1 for o in ops if o.outcome == "ok"),
            ops_unknown=sum(1 for o in ops if o.outcome == "unknown"),
            faults=dict(self.fault_counts),
            commit_index=max(n.core.commit_index for n in self.nodes.values()),
            elections=sum(n.core.statistics()["elections"] for n in self.nodes.values()),
            messages=self.messages,
        )


def main(argv: list[str] | None = None) -> int:
    """Run one seed or a range of seeds and print what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--seeds", type=int, default=100, help="run seeds 0..N-1")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--fault", type=int, default=0, help="a core FAULT_* bitmask (tests only)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.seeds)
    failed = 0
    for seed in seeds:
        config = Config(heartbeat_ticks=2, election_ticks=10, window_slots=8, resend_ticks=3,
                        batch_bytes_max=512, check_invariants=True, fault=args.fault)
        try:
            r = Simulation(seed, replicas=args.replicas, config=config, verbose=args.verbose).run()
            print(f"seed {seed}: ok ops={r.ops_completed} unknown={r.ops_unknown} "
                  f"commit={r.commit_index} elections={r.elections} faults={r.faults}")
        except SimulationFailure as exc:
            failed += 1
            print(f"FAILED {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
