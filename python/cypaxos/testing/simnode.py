"""The simulator's replicas: production `ReplicaNode`s over a fake disk and network.

`SimStorage` is the node's `Storage` on the simulated disk: records become durable
only when a sync covering them ends (a scheduled event), a crash loses what was not
durable (a torn group commit may keep a prefix of it), snapshot files and the
incoming files of transfers are written and read by scheduled operations that a
crash cancels.  `SimTransport` hands messages and replies to the simulated network.
`SimReplica` is one replica process: it boots a core and a node from whatever its
disk holds, and crashes.

Nothing here re-implements a rule of the shell: the node decides what to persist,
when to sync, what to send and when; the fakes only decide *when things end*.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

from cypaxos.core import Replica
from cypaxos.replica.node import NodeOptions, ReplicaNode
from cypaxos.storage import snapshots

if TYPE_CHECKING:  # pragma: no cover
    from cypaxos.testing.sim import Simulation

__all__ = ["SimStorage", "SimTransport", "SimReplica"]


class SimStorage:
    """A replica's disk (`cypaxos.replica.node.Storage`), in simulated time.

    Record positions count from the first record ever written; `base` records at the
    front were deleted by compaction.  Every operation's end is an event scheduled on
    the simulation, tagged with the replica's incarnation so that a crash cancels it.
    """

    def __init__(self, sim: "Simulation", rid: int) -> None:
        self.sim = sim
        self.rid = rid
        self.node: Optional[ReplicaNode] = None
        self.base = 0
        self.durable: list = []
        self.unsynced: list = []
        self.sync_token = 0        # the sync in flight (0: none)
        self.sync_covers = 0       # the seq it makes durable
        self.files: dict[int, bytes] = {}      # durable snapshot files by index
        self.incoming: dict[int, bytearray] = {}
        self.incoming_writes: dict[int, int] = {}  # writes that built each incoming file
        self.chunked_transfers = 0  # incoming files built from several chunks, read back
        self.competing_transfers = 0  # transfers begun while another peer's was under way

    # -- the log

    @property
    def first_seq(self) -> int:
        return self.base + 1

    @property
    def last_seq(self) -> int:
        return self.base + len(self.durable) + len(self.unsynced)

    @property
    def durable_seq(self) -> int:
        return self.base + len(self.durable)

    @property
    def sync_in_flight(self) -> bool:
        return self.sync_token != 0

    def append(self, records: list) -> int:
        # Records stay tuples: the simulated disk is record-granular, and a torn write
        # loses whole trailing records (the WAL's recovery guarantees that).
        self.unsynced.extend(records)
        return 64 * len(records)

    def start_sync(self) -> bool:
        if self.sync_token:
            return False
        sim = self.sim
        self.sync_token = sim.new_id()
        self.sync_covers = self.last_seq
        sim.after_disk(self.rid, self.on_sync_end, self.sync_token)
        return True

    def on_sync_end(self, token: int) -> None:
        if token != self.sync_token:
            return
        self.sync_token = 0
        moved = self.sync_covers - self.durable_seq
        self.durable.extend(self.unsynced[:moved])
        del self.unsynced[:moved]
        self.node.on_sync_done(None)

    def sync(self) -> None:
        # Inline: the replica blocks until it is done (no simulated time passes for it:
        # nothing it would have done meanwhile is lost).
        self.durable.extend(self.unsynced)
        self.unsynced = []

    def truncate_before(self, seq: int) -> None:
        drop = min(seq - 1, self.durable_seq) - self.base
        if drop > 0:
            del self.durable[:drop]
            self.base += drop

    # -- snapshot files

    def write_snapshot(self, index: int, data: list) -> None:
        blob = b"".join(data)
        self.sim.after_disk(self.rid, self._snapshot_written, index, blob, scale=3)

    def _snapshot_written(self, index: int, blob: bytes) -> None:
        self.files[index] = blob
        for old in sorted(self.files)[:-snapshots.KEEP]:
            del self.files[old]
        self.node.on_snapshot_written(index, None)

    def read_snapshot(self, index: int) -> None:
        self.sim.after_disk(self.rid, self._snapshot_read, index)

    def _snapshot_read(self, index: int) -> None:
        data = self.files.get(index)
        error = None if data is not None else FileNotFoundError(f"no snapshot {index}")
        self.node.on_snapshot_read(index, data, error)

    def write_incoming(self, peer: int, offset: int, data: bytes) -> None:
        self.sim.after_disk(self.rid, self._incoming_written, peer, offset, data, scale=0.2)

    def _incoming_written(self, peer: int, offset: int, data: bytes) -> None:
        if offset == 0:
            self.incoming[peer] = bytearray()
            self.incoming_writes[peer] = 0
            if len(self.incoming) > 1:
                self.competing_transfers += 1   # another peer's transfer is under way
        buf = self.incoming[peer]
        buf[offset:offset + len(data)] = data
        self.incoming_writes[peer] += 1
        self.node.on_incoming_written(peer, None)

    def read_incoming(self, peer: int) -> None:
        self.sim.after_disk(self.rid, self._incoming_read, peer, scale=0.2)

    def _incoming_read(self, peer: int) -> None:
        if self.incoming_writes.get(peer, 0) > 1:
            self.chunked_transfers += 1
        self.node.on_incoming_read(peer, bytes(self.incoming.get(peer, b"")), None)

    def discard_incoming(self, peer: int) -> None:
        self.incoming.pop(peer, None)
        self.incoming_writes.pop(peer, None)

    def latest_snapshot(self, cluster_id: str) -> Optional[tuple]:
        """The newest durable snapshot, decoded (what a restart loads)."""
        if not self.files:
            return None
        index = max(self.files)
        return snapshots.decode(self.files[index], cluster_id, f"snapshot {index}")

    def crash(self, rng: random.Random, torn: bool) -> None:
        """Lose what was not durable; a torn group commit may keep part of it, in order."""
        keep = rng.randrange(len(self.unsynced) + 1) if torn and self.unsynced else 0
        self.durable.extend(self.unsynced[:keep])
        self.unsynced = []
        self.sync_token = 0
        self.incoming = {}   # never durable: the node starts transfers over
        self.incoming_writes = {}


class SimTransport:
    """`cypaxos.replica.node.Transport` onto the simulated network (no queueing)."""

    __slots__ = ("sim", "rid")

    def __init__(self, sim: "Simulation", rid: int) -> None:
        self.sim = sim
        self.rid = rid

    def send(self, peer: int, message: tuple) -> None:
        self.sim.send(self.rid, peer, message)

    def reply(self, conn, reply: list) -> None:
        self.sim.to_client(self.rid, conn, reply)

    def backlog(self, conn) -> int:
        return 0   # delivered at once

    def flush(self) -> None:
        pass


class SimReplica:
    """One replica process: a core and a node over its disk, up or crashed."""

    def __init__(self, sim: "Simulation", rid: int) -> None:
        self.sim = sim
        self.rid = rid
        self.storage = SimStorage(sim, rid)
        self.transport = SimTransport(sim, rid)
        self.up = False
        self.incarnation = 0
        self.node: Optional[ReplicaNode] = None
        self.core: Optional[Replica] = None
        self.checked_commit = 0
        self.drive_due = False
        self.totals: dict[str, int] = {}  # node counters of earlier incarnations
        rng = sim.rng
        self.rate = 1.0  # this replica's clock: its tick period is tick_us * rate
        self.rate_held = False  # the rate stays until the partition heals
        self.options = NodeOptions(
            replica_id=rid, cluster=sim.addresses, cluster_id=sim.cluster_id,
            snapshot_bytes=1 << 60,
            snapshot_slots=rng.randint(*sim.snapshot_slots) if sim.snapshots else 1 << 60,
            retain_slots=rng.randint(0, 5),
            follower_inline_sync=rng.random() < 0.5,
            chunk_bytes=rng.randint(48, 256),
            chunk_ack_ticks=rng.randint(4, 12),
            chunk_tries=10,
            incoming_bytes_max=1 << 20,
            check_invariants=True,
            fault=sim.node_fault)
        self.start()

    def start(self) -> None:
        """Boot (or reboot) from whatever is durable: the latest snapshot and the log."""
        sim = self.sim
        self.incarnation += 1
        storage = self.storage
        state_machine = sim.new_state_machine()
        self.core = Replica(self.rid, sim.ids, state_machine, sim.config,
                            seed=sim.seed * 1000 + self.rid * 10 + self.incarnation)
        self.node = ReplicaNode(self.options, self.core, storage, self.transport,
                                self.wake, validate_state=sim.validate_state)
        storage.node = self.node
        self.node.recover(list(storage.durable), storage.latest_snapshot(sim.cluster_id))
        self.checked_commit = 0
        self.drive_due = False
        self.up = True
        sim.check_commits(self)

    def wake(self) -> None:
        """The node wants its driver: it runs once the current event is over."""
        if self.node.fatal is not None:
            raise self.node.fatal
        if not self.drive_due:
            self.drive_due = True
            self.sim.schedule(self.sim.now + self.sim.rng.randint(0, 100), "drive",
                              self.rid, self.incarnation)

    def crash(self) -> None:
        """SIGKILL: everything in memory is gone, and so is the unsynced disk tail."""
        self.up = False
        self.add_totals()
        self.node = None
        self.storage.crash(self.sim.rng, self.sim.faults.torn_writes)

    def add_totals(self) -> None:
        for name, value in self.node.stats.items():
            self.totals[name] = self.totals.get(name, 0) + value

    def counter(self, name: str) -> int:
        """A node counter summed over every incarnation so far."""
        now = self.node.stats.get(name, 0) if self.up else 0
        return self.totals.get(name, 0) + now
