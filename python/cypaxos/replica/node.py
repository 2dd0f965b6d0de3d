"""One replica, everything around its core, with no I/O: `ReplicaNode`.

Theory of operation
-------------------
(One class, about 700 lines: every rule around the core has this one owner; the
interfaces it is given are in `replica.interfaces`, the transfer's state machines in
`replica.transfer`.)

The core (`cypaxos.core.Replica`) is pure: inputs in, a `Ready` out.  The rules for
carrying out a Ready and for what surrounds the core live here, once, for every
runner: the Trio server (`replica/server.py`), the seeded simulator
(`cypaxos.testing.sim`) and the transcript tests.  A runner gives the node three
small interfaces and calls its input methods; the node reads no clock, opens no
socket or file and starts no thread:

* `Storage`: the write-ahead log (append records, start a sync or sync inline,
  durable and last sequence numbers, truncate) and snapshot files, whose reads and
  writes are *operations*: the node starts one, and the runner reports its end
  through `on_snapshot_written`, `on_snapshot_read`, `on_incoming_written`,
  `on_incoming_read` (a worker thread in the server, a scheduled event in the
  simulator).
* `Transport`: send a message to a peer, reply to a client connection (an opaque
  handle the runner chose), flush.  Sends are queued; `flush` lets them go.
* time: the runner calls `tick()`; the node counts ticks, never seconds.

Inputs: `on_peer_message`, `on_client_request`, `tick`, `drive` (take and carry out
what the core has to say), `on_sync_done` and the storage operations' completions.

The rules, each with one owner:

* **Messages before records.**  A Ready's `messages` never depend on this replica's
  disk: they are sent first, so the peers' work overlaps our own write and fsync.
* **After-persist.**  `messages_after_persist` leave only once every record handed
  out so far is durable (`Storage.durable_seq >= ` the WAL sequence number the Ready's
  records ended at); until then they wait in `after`, in order, and only then does the
  core hear `persisted()`.
* **Who fsyncs.**  A leader starts a sync (`Storage.start_sync`: the server's fsync
  thread) and keeps working; its end (`on_sync_done`) releases what waited and starts
  the next, covering everything appended meanwhile (group commit).  A follower (or
  candidate) syncs inline at the end of `drive`, once what needs no sync has been
  flushed: it has nothing else to do until its vote can go.
* **Client work.**  A submit or linearizable read accepted by the core waits in
  `pending_submits` / `pending_reads` until a Ready answers it; a lone request is
  driven at once, others wake the runner's driver (`wake`) so that requests from many
  connections share one slot.  Losing leadership redirects every pending submit.
* **Snapshot, restatement, compaction.**  `take_snapshot` captures the state, writes
  the restating Ready (the core's `snapshot()` hands it out) and the snapshot file;
  once the file is written *and* the restatement is durable, WAL records before the
  restatement are truncated and the core forgets slots up to `retain_slots` before
  the snapshot.  One snapshot or install at a time.
* **Snapshot transfer** (`cypaxos.replica.transfer`): a peer the core names in
  `snapshot_to` gets the latest snapshot file in chunks; chunks from a peer go to an
  incoming file; a complete file is read back, verified (checksum, cluster id, the
  state restores into a scratch state machine) and only then written as a durable
  snapshot and installed, restated and compacted like one of our own.
* **Storage faults fail-stop** (DESIGN.md section 8).  A storage error
  (`STORAGE_ERRORS`: a full disk, EIO, a read-only file system) raised in any input
  or reported to a completion sets `fatal` and wakes the runner, which stops the
  replica.  From then on the node does nothing (`drive`, `tick` and the completions
  return at once): nothing that waited for the failed write leaves, and no input's
  handler (a peer's connection, a client's) ever sees the error.

Test-only faults (`NodeOptions.fault`, never set in production) break one rule each,
so that the simulator can prove it notices: `FAULT_RELEASE_BEFORE_DURABLE`,
`FAULT_INSTALL_UNVERIFIED`, `FAULT_COMPACT_BEFORE_DURABLE`.
"""
from __future__ import annotations

import functools
import logging
import struct
from collections import deque
from typing import Any, Callable, Iterable, Optional

from .. import wire
from ..core import NOT_LEADER, PROPOSED, BatchError, MessageError, Replica
from ..errors import StorageError
from ..logs import RateLimitedLog
from ..protocol import REC_ACCEPT
from ..storage import snapshots
from .counters import BATCH_COMMANDS_BUCKETS, Histogram, slot_commands
from .interfaces import NodeOptions, Storage, Transport
from .transfer import Ack, SnapshotReceiver, SnapshotSender, TransferError, Verify, Write

__all__ = ["Storage", "Transport", "NodeOptions", "ReplicaNode",
           "FAULT_RELEASE_BEFORE_DURABLE", "FAULT_INSTALL_UNVERIFIED",
           "FAULT_COMPACT_BEFORE_DURABLE", "STORAGE_ERRORS"]

log = logging.getLogger("cypaxos.server")  # the name in log lines, kept across moves

FAULT_RELEASE_BEFORE_DURABLE = 1   # messages_after_persist leave with their records unsynced
FAULT_INSTALL_UNVERIFIED = 2       # a received snapshot is installed without verification
FAULT_COMPACT_BEFORE_DURABLE = 4   # the WAL is truncated before the snapshot is durable

STORAGE_ERRORS = (OSError, StorageError)
"""What storage raises when it cannot write (the node then fail-stops: `fatal`)."""

_SESSION_HEADER = struct.Struct("<QQ")
_SNAPSHOT_CHUNK = wire.SNAPSHOT_CHUNK   # module globals: read for every peer message
_SNAPSHOT_ACK = wire.SNAPSHOT_ACK
_ACCEPTED = wire.ACCEPTED
_HEARTBEAT_ACK = wire.HEARTBEAT_ACK


def _fail_stop(method):
    """For an input that may write to storage (a completion, a transfer's chunk): it
    does nothing once `fatal` is set, and a storage error raised inside becomes
    `fatal` instead of reaching the caller (a worker task, a peer's connection)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.fatal is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except STORAGE_ERRORS as exc:
            self.fail(exc)
            return None
    return guarded


class _SnapshotJob:
    """The one snapshot (our own, or one received) between its start and compaction."""

    __slots__ = ("index", "cut", "restate_end", "written", "install", "peer")

    def __init__(self, index: int, install: Optional[tuple] = None, peer: int = 0) -> None:
        self.index = index
        self.cut = 0          # WAL seq of the first restating record
        self.restate_end = 0  # WAL seq of the last one
        self.written = False  # the snapshot file is durable
        self.install = install  # a received snapshot, until it is in the core
        self.peer = peer


class ReplicaNode:
    """One replica around its core, over injected storage, transport and ticks.

    `wake` asks the runner to call `drive()` soon (the server's driver task); `fatal`
    is set when storage failed and the replica must stop (the runner checks it after
    `wake`).  `validate_state(state: bytes)` raises if a received snapshot's state does
    not restore (the server's restores it into a scratch state machine).
    """

    def __init__(self, options: NodeOptions, core: Replica, storage: Storage,
                 transport: Transport, wake: Callable[[], None],
                 validate_state: Optional[Callable[[bytes], None]] = None) -> None:
        self.options = options
        self.replica_id = options.replica_id
        self.cluster = dict(options.cluster)
        self.cluster_id = options.cluster_id
        self.core = core
        self.state_machine = core.state_machine
        self.storage = storage
        self.transport = transport
        self.wake = wake
        self.validate_state = validate_state
        self.fault = options.fault
        self.fatal: Optional[BaseException] = None
        # Counters (status "statistics", the metrics endpoint).  The connection ones
        # are counted by the runner, which owns the connections.
        self.stats = {"peer_drops": 0, "client_drops": 0, "bad_frames": 0, "fsyncs": 0,
                      "snapshots_taken": 0, "snapshots_sent": 0, "snapshots_installed": 0,
                      "snapshots_refused": 0, "snapshots_corrupt": 0,
                      "snapshot_sends_failed": 0, "transfer_chunks": 0,
                      "leader_changes": 0, "hello_timeouts": 0, "connection_errors": 0,
                      "connections_refused": 0, "auth_failures": 0,
                      # The bounds on one client (replica.limits): what was refused.
                      "client_idle_timeouts": 0, "client_frame_timeouts": 0,
                      "reads_too_large": 0, "reads_busy": 0, "snapshot_requests_refused": 0}
        # Commands per slot this replica proposed as leader (one observation a slot).
        self.batch_commands = Histogram(BATCH_COMMANDS_BUCKETS)
        # The commit index each peer last reported (ACCEPTED, HEARTBEAT_ACK): a
        # leader's view of how far behind each follower is.
        self.peer_commit: dict[int, int] = {}
        self.last_leader_id = 0
        # Warnings that can repeat (a peer's corrupt snapshots, failed sends): once,
        # then once per interval with a count.  Its clock is the core's ticks.
        self.limited_log = RateLimitedLog(log, options.log_interval_ticks,
                                          clock=lambda: self.core.now)
        # Client work the core accepted and has not answered yet.
        self.pending_submits: dict[tuple[int, int], tuple[Any, int]] = {}
        self.pending_reads: dict[int, tuple[Any, int, list]] = {}
        self.next_read_id = 1
        # (WAL seq required, persist_id, messages): released in order once
        # durable_seq >= the seq.  Invariant: the seqs and persist_ids never decrease.
        self.after: deque = deque()
        # Invariant: persisted_id <= every persist_id in `after`; only grows.
        self.persisted_id = 0
        self.snapshot_index = 0   # the newest durable snapshot file's index
        self.wal_bytes_since_snapshot = 0
        self.snapshot_job: Optional[_SnapshotJob] = None
        self.snapshot_waiters: list = []   # (conn, request_id) answered after the next snapshot
        self.snapshot_again = False        # a snapshot was asked for while one ran
        # Ticks at which the snapshot requests of the last window were accepted
        # (at most snapshot_requests_max of them, oldest first).
        self.snapshot_requests: deque = deque()
        self.pending_install: Optional[tuple] = None  # (peer, index, snapshot) waiting for the job
        self.senders: dict[int, SnapshotSender] = {}
        self.reading_snapshot = 0     # the index of a snapshot file being read for senders
        self.send_waiting: set[int] = set()   # peers whose transfer waits for that read
        self.outgoing: Optional[tuple[int, bytes]] = None  # (index, file bytes) last read
        self.receivers: dict[int, SnapshotReceiver] = {
            p: SnapshotReceiver(options.incoming_bytes_max)
            for p in self.cluster if p != self.replica_id}
        self._send = transport.send
        self.digest_at: Optional[tuple] = None   # (applied index, its state digest)
        self._reply = transport.reply
        self._backlog = transport.backlog

    # ------------------------------------------------------------------ recovery

    def recover(self, records: Iterable, snapshot: Optional[tuple]) -> None:
        """Rebuild the core from the latest durable snapshot and the WAL's records."""
        self.core.recover(records, snapshot)
        self.snapshot_index = snapshot[0] if snapshot else 0

    # ------------------------------------------------------------------ the loop

    def drive(self) -> None:
        """Handle everything the core has to say now, sync inline if this replica
        does, and flush.  Does nothing once storage failed (`fatal`)."""
        if self.fatal is not None:
            return
        core = self.core
        storage = self.storage
        try:
            while True:
                while (rd := core.ready()) is not None:
                    self.handle_ready(rd)
                if not self.after or storage.sync_in_flight:
                    break
                if not self.sync_inline():
                    storage.start_sync()   # records appended while we were syncing inline
                    break
                # What needs no sync leaves first; then the sync, in this thread.
                self.transport.flush()
                try:
                    storage.sync()
                except BaseException as exc:
                    self.fail(exc)
                    return
                self.release_durable()
        except STORAGE_ERRORS as exc:
            # Mid-Ready: what it had left to send depended on the failed write.
            self.fail(exc)
            return
        self.transport.flush()
        if self.options.check_invariants:
            self.check_invariants()

    def check_invariants(self) -> None:
        """Assert the invariants written next to the fields (tests and the simulator)."""
        storage = self.storage
        assert storage.durable_seq <= storage.last_seq
        last = (0, self.persisted_id)
        for seq, persist_id, _ in self.after:
            assert seq >= last[0] and persist_id >= last[1], (seq, persist_id, last)
            assert seq <= storage.last_seq
            last = (seq, persist_id)
        if self.after and not (self.fault & FAULT_RELEASE_BEFORE_DURABLE):
            assert self.after[0][0] > storage.durable_seq or storage.sync_in_flight or \
                self.fatal is not None, "durable messages left waiting"
        job = self.snapshot_job
        if job is not None and job.written:
            assert job.cut <= job.restate_end + 1
        assert self.pending_install is None or job is not None
        for receiver in self.receivers.values():
            assert 0 <= receiver.held <= receiver.total
            assert not (receiver.writing and receiver.verifying)
            assert not receiver.verifying or receiver.held == receiver.total
        for sender in self.senders.values():
            assert 0 <= sender.offset <= sender.total and not sender.finished

    def sync_inline(self) -> bool:
        """Whether to sync in the caller's thread, blocking it (see the module doc).

        A follower does: it has nothing to do but wait for the sync its vote waits
        for, and handing it to a thread and back costs two wake-ups (about 150 us on
        a busy 2-core machine: more than half an fdatasync).  A leader does not: it
        keeps taking requests and sending accepts while its sync runs.  Never while a
        sync is in flight.
        """
        return (self.options.follower_inline_sync and not self.storage.sync_in_flight
                and self.core.role != "leader")

    def handle_ready(self, rd) -> None:
        """Carry out one Ready (the rules in the module docstring)."""
        storage = self.storage
        send = self._send
        if rd.messages:
            # These never depend on our own disk (a leader's accepts, say): out first,
            # so the peers' work overlaps our WAL write and fsync.
            for to, msg in rd.messages:
                send(to, msg)
            self.transport.flush()
        if rd.records:
            self.wal_bytes_since_snapshot += storage.append(rd.records)
            if self.core.leader_id == self.replica_id:
                self.observe_proposals(rd.records)
            if not self.sync_inline():
                # Group commit: starts a sync unless one is running (its end starts
                # the next, covering everything appended meanwhile).
                storage.start_sync()
        if rd.snapshot_to:
            for peer in rd.snapshot_to:
                self.offer_snapshot(peer)
        if rd.records or rd.messages_after_persist:
            required = storage.last_seq
            if storage.durable_seq >= required and not self.after:
                for to, msg in rd.messages_after_persist:
                    send(to, msg)
                self.mark_persisted(rd.persist_id)
            elif self.fault & FAULT_RELEASE_BEFORE_DURABLE:
                for to, msg in rd.messages_after_persist:
                    send(to, msg)
                self.after.append((required, rd.persist_id, []))
            else:
                self.after.append((required, rd.persist_id, rd.messages_after_persist))
        if rd.results:
            pending = self.pending_submits
            reply = self._reply
            for sid, first, packed in rd.results:
                waiter = pending.pop((sid, first), None)
                if waiter is not None:
                    reply(waiter[0], wire.ok(waiter[1], packed))
        backups = None
        if rd.reads:
            for read_id in rd.reads:
                conn, request_id, queries = self.pending_reads.pop(read_id)
                if queries is None:   # a backup's linearizable point is reached
                    backups = backups or []
                    backups.append((conn, request_id))
                else:
                    self.answer_read(conn, request_id, queries)
        if rd.reads_failed:
            for read_id in rd.reads_failed:
                conn, request_id, _ = self.pending_reads.pop(read_id)
                self._reply(conn, wire.redirect(request_id, self.leader_address()))
        if rd.lost_leadership:
            leader = self.leader_address()
            for conn, request_id in self.pending_submits.values():
                self._reply(conn, wire.redirect(request_id, leader))
            self.pending_submits.clear()
        if backups:
            # Once this Ready is carried out whole: the snapshot restates the log
            # through Readies of its own.
            self.snapshot_for(backups)

    def observe_proposals(self, records: list) -> None:
        """Count the commands of every slot a leader's ACCEPT records propose."""
        observe = self.batch_commands.observe
        for record in records:
            if record[0] == REC_ACCEPT:
                for value in record[3]:
                    if value:   # b"" fills a hole: a no-op, not a batch
                        observe(slot_commands(value))

    def mark_persisted(self, persist_id: int) -> None:
        """Tell the core its records up to `persist_id` are durable (callers then take
        its output: they are inside a ready() loop, or drive())."""
        if persist_id > self.persisted_id:
            self.persisted_id = persist_id
            self.core.persisted(persist_id)

    def release_durable(self) -> None:
        """Send the messages whose records are now durable, tell the core, and compact
        if a snapshot waited for that (without taking the core's output)."""
        storage = self.storage
        durable = storage.durable_seq
        self.stats["fsyncs"] += 1
        persist_id = 0
        after = self.after
        send = self._send
        while after and after[0][0] <= durable:
            _, pid, msgs = after.popleft()
            for to, msg in msgs:
                send(to, msg)
            persist_id = max(persist_id, pid)
        if persist_id:
            self.mark_persisted(persist_id)
        job = self.snapshot_job
        if job is not None and job.written:
            self.maybe_compact()

    def on_sync_done(self, error: Optional[BaseException]) -> None:
        """A sync started by `Storage.start_sync` ended (None, or why it failed).

        Releases what waited for it (a follower's votes go out from here), starts the
        next sync if records arrived meanwhile, and drives the core.  Never raises: a
        failure is handed to the runner through `fatal`.
        """
        if self.fatal is not None:
            return
        try:
            if error is not None:
                raise error
            self.release_durable()
            storage = self.storage
            if storage.last_seq > storage.durable_seq and not self.sync_inline():
                storage.start_sync()   # the next group, before the core's output is handled
            self.drive()
        except BaseException as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Storage failed: the replica must stop (the runner raises `fatal`, the
        first failure: later ones are its consequences)."""
        if self.fatal is None:
            self.fatal = exc
        self.wake()

    def tick(self) -> None:
        """One tick of logical time: the core's, the transfers' timers, and a snapshot
        when enough was written or applied since the last (the caller drives).
        Does nothing once storage failed (`fatal`)."""
        if self.fatal is not None:
            return
        core = self.core
        core.tick()
        if core.leader_id != self.last_leader_id:
            self.last_leader_id = core.leader_id
            if core.leader_id:
                self.stats["leader_changes"] += 1
        if self.senders:
            for peer, sender in list(self.senders.items()):
                chunk = sender.on_tick()
                if chunk is not None:
                    self.send_chunk(peer, chunk)
                elif sender.failed:
                    self.end_send(peer)
        if self.snapshot_job is None and self.pending_install is None and (
                self.wal_bytes_since_snapshot >= self.options.snapshot_bytes
                or core.applied_index - self.snapshot_index >= self.options.snapshot_slots):
            try:
                self.take_snapshot()
            except STORAGE_ERRORS as exc:   # writing the restatement
                self.fail(exc)

    # ------------------------------------------------------------------ peers

    def on_peer_message(self, peer: int, msg: tuple) -> bool:
        """A checked peer message (`wire.parse_peer_message`); True if it went into the
        core (the caller then drives), False if it was the transfer's (already
        handled; the caller flushes).  Raises `wire.ProtocolError` for a message the
        core or the transfer refuses: drop the connection."""
        kind = msg[0]
        if kind == _SNAPSHOT_CHUNK:
            self.on_snapshot_chunk(peer, msg[2], msg[3], msg[4], msg[5])
            return False
        if kind == _SNAPSHOT_ACK:
            self.on_snapshot_ack(peer, msg[2], msg[3])
            return False
        if kind == _ACCEPTED:
            self.peer_commit[peer] = msg[5]
        elif kind == _HEARTBEAT_ACK:
            self.peer_commit[peer] = msg[4]
        try:
            self.core.step(msg)
        except MessageError as exc:
            raise wire.ProtocolError(str(exc)) from None
        return True

    # ------------------------------------------------------------------ clients

    def on_client_request(self, conn: Any, request: tuple) -> None:
        """A checked client request (`wire.parse_client_request`) from connection
        `conn`; its reply goes to `Transport.reply(conn, ...)`, now or later."""
        op = request[0]
        request_id = request[1]
        if op == "submit":
            batch = request[2]
            try:
                code = self.core.propose(batch)
            except BatchError as exc:
                self._reply(conn, wire.error(request_id, "bad_request", str(exc)))
                return
            if code == PROPOSED:
                self.pending_submits[_SESSION_HEADER.unpack_from(batch)] = (conn, request_id)
                self.start_or_wake()
            elif code == NOT_LEADER:
                self._reply(conn, wire.redirect(request_id, self.leader_address()))
            else:
                self._reply(conn, wire.error(request_id, "busy", "the leader's queue is full"))
        elif op == "read":
            queries, stale = request[2], request[3]
            if len(queries) > self.options.queries_per_read_max:
                self.stats["reads_too_large"] += 1
                self._reply(conn, wire.error(
                    request_id, "too_large",
                    f"{len(queries)} queries in one read; a replica answers at most "
                    f"{self.options.queries_per_read_max} (--queries-per-read-max)"))
                return
            if stale:
                self.answer_read(conn, request_id, queries)
                return
            read_id = self.next_read_id
            self.next_read_id += 1
            if self.core.read(read_id):
                self.pending_reads[read_id] = (conn, request_id, queries)
                self.start_or_wake()
            else:
                self._reply(conn, wire.redirect(request_id, self.leader_address()))
        elif op == "status":
            self._reply(conn, wire.ok(request_id, self.status()))
        elif op == "backup":
            # A linearizable read first (the leader confirms it still leads and waits
            # to apply what it had committed), then a snapshot at or past that
            # point: it holds every write acknowledged before the request.  Answered
            # like "snapshot", with the index of a snapshot file the runner streams.
            read_id = self.next_read_id
            self.next_read_id += 1
            if self.core.read(read_id):
                self.pending_reads[read_id] = (conn, request_id, None)
                self.start_or_wake()
            else:
                self._reply(conn, wire.redirect(request_id, self.leader_address()))
        else:  # snapshot
            if self.fatal is not None:
                return   # never answered: the replica is stopping
            refusal = self.snapshot_request_refusal()
            if refusal is not None:
                self.stats["snapshot_requests_refused"] += 1
                self._reply(conn, wire.error(request_id, "busy", refusal))
                return
            try:
                self.snapshot_for([(conn, request_id)])
            except STORAGE_ERRORS as exc:   # writing the restatement
                self.fail(exc)
                return
            self.drive()

    def snapshot_request_refusal(self) -> Optional[str]:
        """None, counting one more snapshot request in this window, or why it is
        refused: `snapshot_requests_max` were accepted in the last window already
        (each may write the whole state to disk)."""
        limit = self.options.snapshot_requests_max
        if not limit:
            return None
        now = self.core.now
        window = self.options.snapshot_window_ticks
        accepted = self.snapshot_requests
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        if len(accepted) >= limit:
            wait_s = -(-(accepted[0] + window - now) * 60 // window)   # rounded up
            return (f"this replica takes at most {limit} snapshot requests a minute "
                    f"(--snapshot-requests-per-minute); try again in {wait_s} s")
        accepted.append(now)
        return None

    def start_or_wake(self) -> None:
        """A client request reached the core: drive now if it is alone, else batch.

        With other requests in flight, waking the driver lets every request that
        arrives meanwhile (from any connection) share one slot and one round.  A
        request alone has nothing to wait for: handling it here saves a task switch.
        """
        if (self.options.drive_lone_requests
                and len(self.pending_submits) + len(self.pending_reads) == 1):
            self.drive()
        else:
            self.wake()

    def answer_read(self, conn: Any, request_id: int, queries: list) -> None:
        """Serve a read from the state machine (linearizable once the core said so).

        Bounded: a connection with more than `backlog_bytes_max` reply bytes unsent is
        answered ``busy`` (nothing evaluated), and a read whose results pass
        `reply_bytes_max` is refused ``too_large`` as soon as they do, so a frame of
        gets of one big value never builds more than one reply's worth."""
        options = self.options
        if self._backlog(conn) >= options.backlog_bytes_max:
            self.stats["reads_busy"] += 1
            self._reply(conn, wire.error(request_id, "busy",
                                         "replies to this connection are waiting to be read"))
            return
        budget = options.reply_bytes_max
        results = []
        append = results.append
        try:
            query = self.state_machine.query
            for q in queries:
                result = query(q)
                budget -= len(result)
                if budget < 0:
                    self.stats["reads_too_large"] += 1
                    what = (f"{len(queries)} queries' results pass" if len(queries) > 1
                            else "the result alone passes")
                    self._reply(conn, wire.error(
                        request_id, "too_large",
                        f"{what} {options.reply_bytes_max} bytes, the most a replica "
                        f"answers in one reply (--reply-bytes-max)"))
                    return
                append(result)
        except Exception as exc:
            self._reply(conn, wire.error(request_id, "bad_request", f"query failed: {exc}"))
            return
        self._reply(conn, wire.ok(request_id, results))

    def leader_address(self) -> Optional[str]:
        """The address of the replica this one believes leads, None if it knows none."""
        leader = self.core.leader_id
        return self.cluster.get(leader) if leader else None

    def leader_heard_ticks(self) -> Optional[int]:
        """Ticks since this replica last heard from the leader it knows (0 while it
        leads); None if it knows of none."""
        core = self.core
        leader = core.leader_id
        if not leader:
            return None
        if leader == self.replica_id:
            return 0
        return core.now - core.statistics()["leader_heard_tick"]

    def state_digest(self) -> Any:
        """The state machine's digest, computed once per applied index: it hashes the
        whole state, and a client may ask for status many times a frame (the state
        changes only by applying, restores included, both of which move the index)."""
        applied = self.core.applied_index
        if self.digest_at is None or self.digest_at[0] != applied:
            self.digest_at = (applied, self.state_machine.state_digest())
        return self.digest_at[1]

    def status(self) -> dict:
        """This replica's status fields (DESIGN.md section 4) and counters."""
        core = self.core
        storage = self.storage
        stats = core.statistics()
        status = {
            "id": self.replica_id,
            "address": self.cluster[self.replica_id],
            "cluster_id": self.cluster_id,
            "role": core.role,
            "ballot": core.ballot,
            "leader_id": core.leader_id,
            "leader": self.leader_address(),
            "commit_index": core.commit_index,
            "applied_index": core.applied_index,
            "state_digest": self.state_digest(),
            "snapshot_index": self.snapshot_index,
            "log_start": core.log_start,
            "wal_first_seq": storage.first_seq,
            "wal_last_seq": storage.last_seq,
            "wal_durable_seq": storage.durable_seq,
        }
        status.update(self.options.status)
        status["statistics"] = {k: v for k, v in stats.items() if k not in status}
        status["statistics"].update(self.stats)
        return status

    # ------------------------------------------------------------------ snapshots

    def snapshot_for(self, waiters: list) -> None:
        """Answer `waiters` (connection, request id) with the index of a snapshot taken
        at or after now: a new one, or the newest if nothing was applied since."""
        self.snapshot_waiters.extend(waiters)
        if not self.take_snapshot():
            if self.snapshot_job is not None or self.pending_install is not None:
                self.snapshot_again = True   # answered after the one running, and the next
            else:
                self.answer_snapshot_waiters()

    def take_snapshot(self) -> bool:
        """Snapshot the state at the applied index: restate the log, write the file;
        compaction follows once both are durable.  False if one is already running
        or nothing was applied since the last."""
        core = self.core
        if (self.snapshot_job is not None or self.pending_install is not None
                or core.applied_index <= self.snapshot_index):
            return False
        snapshot = core.snapshot()
        job = self.snapshot_job = _SnapshotJob(snapshot[0])
        self.restate(job)
        parts = snapshots.encode_parts(self.cluster_id, snapshot)
        del snapshot
        self.storage.write_snapshot(job.index, parts)
        if self.fault & FAULT_COMPACT_BEFORE_DURABLE:
            self.storage.truncate_before(job.cut)
        return True

    def restate(self, job: _SnapshotJob) -> None:
        """Write the Ready that restates the log; note where it starts and ends."""
        storage = self.storage
        job.cut = storage.last_seq + 1
        while (rd := self.core.ready()) is not None:
            self.handle_ready(rd)
        job.restate_end = storage.last_seq
        self.wal_bytes_since_snapshot = 0

    @_fail_stop
    def on_snapshot_written(self, index: int, error: Optional[BaseException]) -> None:
        """A snapshot file is durable (or could not be written: the replica stops)."""
        job = self.snapshot_job
        if error is not None:
            self.fail(error)
            return
        if job is None or job.index != index:
            return
        self.snapshot_index = max(self.snapshot_index, index)
        if job.install is not None:
            _, sessions, state = job.install
            job.install = None
            if not self.core.install_snapshot(index, sessions, state):
                # Overtaken: we committed past it meanwhile.
                self.send_ack(job.peer, self.receivers[job.peer].on_verified(True))
                self.end_snapshot_job()
                self.drive()
                return
            self.stats["snapshots_installed"] += 1
            log.info("installed snapshot at slot %d from replica %d", index, job.peer)
            self.restate(job)
            self.send_ack(job.peer, self.receivers[job.peer].on_verified(True))
        else:
            self.stats["snapshots_taken"] += 1
        job.written = True
        self.maybe_compact()
        self.drive()

    def maybe_compact(self) -> None:
        """Once the snapshot file and the restatement are durable: truncate the WAL
        before the restatement and forget old slots."""
        job = self.snapshot_job
        storage = self.storage
        if storage.durable_seq < job.restate_end:
            return
        storage.truncate_before(job.cut)
        self.core.compact(job.index - self.options.retain_slots)
        self.end_snapshot_job()

    def end_snapshot_job(self) -> None:
        self.snapshot_job = None
        if self.pending_install is not None:
            peer, index, snapshot = self.pending_install
            self.pending_install = None
            self.install(peer, index, snapshot)
            return
        if self.snapshot_again:
            self.snapshot_again = False
            if self.take_snapshot():
                return
        self.answer_snapshot_waiters()

    def answer_snapshot_waiters(self) -> None:
        waiters, self.snapshot_waiters = self.snapshot_waiters, []
        for conn, request_id in waiters:
            self._reply(conn, wire.ok(request_id, self.snapshot_index))

    # ------------------------------------------------------------------ transfer: sending

    def offer_snapshot(self, peer: int) -> None:
        """The core says `peer` needs slots we compacted: send it our latest snapshot."""
        index = self.snapshot_index
        if not index or peer not in self.receivers:
            return
        sender = self.senders.get(peer)
        if sender is not None and sender.index >= index:
            return   # already on its way
        if self.outgoing is not None and self.outgoing[0] == index:
            self.start_send(peer, index, self.outgoing[1])
            return
        self.senders.pop(peer, None)
        self.send_waiting.add(peer)
        if self.reading_snapshot != index:
            self.reading_snapshot = index
            self.storage.read_snapshot(index)

    @_fail_stop
    def on_snapshot_read(self, index: int, data: Optional[bytes],
                         error: Optional[BaseException]) -> None:
        """A snapshot file read for sending is in (or could not be read: not sent)."""
        if self.reading_snapshot == index:
            self.reading_snapshot = 0
        waiting = self.send_waiting
        if error is not None:
            self.stats["snapshot_sends_failed"] += len(waiting)
            self.limited_log.warning("snapshot_read", "cannot send snapshot %d: %s", index, error)
            waiting.clear()
            return
        self.outgoing = (index, data)
        peers = sorted(waiting)
        waiting.clear()
        for peer in peers:
            self.start_send(peer, index, data)
        self.transport.flush()

    def start_send(self, peer: int, index: int, data: bytes) -> None:
        options = self.options
        sender = self.senders[peer] = SnapshotSender(
            index, data, chunk_bytes=options.chunk_bytes,
            ack_timeout_ticks=options.chunk_ack_ticks, tries=options.chunk_tries)
        self.send_chunk(peer, sender.chunk())

    def send_chunk(self, peer: int, chunk) -> None:
        self.stats["transfer_chunks"] += 1
        self._send(peer, (wire.SNAPSHOT_CHUNK, self.replica_id) + tuple(chunk))

    def on_snapshot_ack(self, peer: int, index: int, next_offset: int) -> None:
        sender = self.senders.get(peer)
        if sender is None:
            return
        chunk = sender.on_ack(index, next_offset)
        if chunk is not None:
            self.send_chunk(peer, chunk)
        elif sender.finished:
            self.end_send(peer)
        self.transport.flush()

    def end_send(self, peer: int) -> None:
        sender = self.senders.pop(peer)
        if sender.done:
            self.stats["snapshots_sent"] += 1
            log.info("sent snapshot at slot %d (%d bytes) to replica %d",
                     sender.index, sender.total, peer)
        else:
            self.stats["snapshot_sends_failed"] += 1
            self.limited_log.warning(("snapshot_send", peer),
                                     "gave up sending snapshot %d to replica %d at byte %d",
                                     sender.index, peer, sender.offset)
        if not self.senders:
            self.outgoing = None   # the file's bytes are held only while someone is sent them

    # ------------------------------------------------------------------ transfer: receiving

    @_fail_stop
    def on_snapshot_chunk(self, peer: int, index: int, offset: int, total: int,
                          data: bytes) -> None:
        receiver = self.receivers[peer]
        job = self.snapshot_job
        needed = index > self.core.commit_index and not (
            (job is not None and job.install is not None and job.index >= index)
            or (self.pending_install is not None and self.pending_install[1] >= index))
        was_active = receiver.active
        try:
            out = receiver.on_chunk(index, offset, total, data, needed)
        except TransferError as exc:
            raise wire.ProtocolError(str(exc)) from None
        if was_active and not receiver.active:
            self.storage.discard_incoming(peer)
        if type(out) is Write:
            self.storage.write_incoming(peer, out.offset, out.data)
            return
        if out is not None:
            if needed and out.next_offset == total and index == out.index:
                self.stats["snapshots_refused"] += 1
                self.limited_log.warning(
                    ("snapshot_refused", peer),
                    "refused a snapshot of %d bytes from replica %d (at most %d)",
                    total, peer, self.options.incoming_bytes_max)
            self.send_ack(peer, out)

    def send_ack(self, peer: int, ack: Ack) -> None:
        self._send(peer, (wire.SNAPSHOT_ACK, self.replica_id, ack.index, ack.next_offset))
        self.transport.flush()

    @_fail_stop
    def on_incoming_written(self, peer: int, error: Optional[BaseException]) -> None:
        """The write started by `write_incoming` for `peer` ended."""
        if error is not None:
            self.fail(error)
            return
        out = self.receivers[peer].on_written()
        if type(out) is Verify:
            self.storage.read_incoming(peer)
        else:
            self.send_ack(peer, out)

    @_fail_stop
    def on_incoming_read(self, peer: int, data: Optional[bytes],
                         error: Optional[BaseException]) -> None:
        """The whole incoming file from `peer` is read back: verify it, then install."""
        receiver = self.receivers[peer]
        if error is not None:
            self.fail(error)
            return
        index = receiver.index
        snapshot = self.verify(peer, index, data)
        if snapshot is None:
            self.storage.discard_incoming(peer)
            self.send_ack(peer, receiver.on_verified(False))
            return
        self.storage.discard_incoming(peer)
        if index <= self.core.commit_index:
            self.send_ack(peer, receiver.on_verified(True))   # overtaken meanwhile
            return
        if self.snapshot_job is not None:
            # One snapshot at a time: this one follows the job running now (a newer
            # arrival replaces an older one waiting).
            if self.pending_install is None or self.pending_install[1] < index:
                if self.pending_install is not None:   # replaced: it need not come again
                    older = self.pending_install[0]
                    self.send_ack(older, self.receivers[older].on_verified(True))
                self.pending_install = (peer, index, snapshot)
            else:
                self.send_ack(peer, receiver.on_verified(True))
            return
        self.install(peer, index, snapshot)

    def verify(self, peer: int, index: int, data: bytes) -> Optional[tuple]:
        """A received snapshot file's (index, promised, sessions, state), or None if it
        fails its checksum, belongs to another cluster or index, or does not restore."""
        origin = f"snapshot {index} from replica {peer}"
        if self.fault & FAULT_INSTALL_UNVERIFIED:
            return snapshots.decode_unchecked(data)
        try:
            snapshot = snapshots.decode(data, self.cluster_id, origin)
            if snapshot[0] != index:
                raise snapshots.SnapshotCorruptError(f"{origin} holds index {snapshot[0]}")
            if self.validate_state is not None:
                try:
                    self.validate_state(snapshot[3])
                except Exception as exc:
                    raise snapshots.SnapshotCorruptError(
                        f"{origin}: its state does not restore: {exc}") from None
        except snapshots.SnapshotCorruptError as exc:
            self.stats["snapshots_corrupt"] += 1
            self.limited_log.warning(("snapshot_corrupt", peer), "%s; discarded", exc)
            return None
        return snapshot

    def install(self, peer: int, index: int, snapshot: tuple) -> None:
        """Write a verified snapshot durably; `on_snapshot_written` installs it."""
        if index <= self.core.commit_index:
            self.send_ack(peer, self.receivers[peer].on_verified(True))   # overtaken
            self.answer_snapshot_waiters()
            return
        _, promised, sessions, state = snapshot
        self.snapshot_job = _SnapshotJob(index, (promised, sessions, state), peer)
        self.storage.write_snapshot(index, snapshots.encode_parts(self.cluster_id, snapshot))
