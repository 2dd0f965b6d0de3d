"""One replica process: the Trio shell around the pure core.

Still the big module of the package (about 750 lines, over the ~600 the layout aims
for): ReplicaServer keeps the loop around the core, peer links, client connections
and snapshot transfer together until they move into an I/O-free replica node and
thin Trio adapters.  Its options are in `options`, its send queues in `outbox`, the
WAL's fsync adapter in `walsync`.

The shell owns everything the core may not touch.  It turns real time into ticks,
frames messages over TCP (one port serves peers and clients), writes the core's
records to the write-ahead log with group commit (the fsync runs in a native thread,
`cypaxos.fsyncthread`, driven by `WalSync`), and feeds everything back into the core:

* a client request is handed to the core at once; if it is the only request in
  flight it is handled right there, otherwise the *driver* task is woken, and by the
  time it runs many requests (from every connection) may have accumulated, so one
  `ready()` puts them all in one slot;
* a peer's messages are stepped into the core and the core's output is handled in
  the receiving task (`drive()`), with no task switch on the protocol's critical path;
* handling a Ready sends its `messages` first (they never wait for our disk), then
  appends its records to the WAL and starts an fsync unless one is running, answers
  clients, and queues `messages_after_persist` behind the WAL sequence number they
  depend on;
* when an fsync ends (`on_sync`, called in the event loop) the queued messages go
  out, the core hears `persisted()`, its output is handled, and the next fsync starts
  if records arrived meanwhile (group commit).

Sending: every connection has an `Outbox`.  Frames are queued during a round and
written with one non-blocking `os.write` per connection at its end (`flush()`); only
what the kernel does not take goes through the connection's writer task.  A peer
link that is down or slow never blocks anyone: its queue is bounded and overflowing
messages are dropped (the core resends what matters).  A peer or client that sends a
malformed or oversized frame is disconnected with one log line.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
from collections import deque

import cbor2
import trio

from .. import logs, wire
from ..addresses import split_address
from ..cbordec import FALLBACK as CBOR_FALLBACK
from ..cbordec import decode as cbor_decode
from ..cborenc import dumps as cbor_dumps
from ..core import NOT_LEADER, PROPOSED, BatchError, MessageError, Replica
from ..errors import ConfigError, Error, WalCorruptError
from ..groups import BaseExceptionGroup, expected_error
from ..storage import snapshots
from ..storage.datadir import open_data_dir
from .options import ServerOptions, default_cluster_id, load_state_machine
from .outbox import Conn, Outbox
from .walsync import WalSync

__all__ = ["ReplicaServer", "serve", "run_server", "read_frames", "receive_into"]

log = logging.getLogger("cypaxos.server")  # the name in log lines, kept across moves

PEER_QUEUE_MAX = 4096  # messages waiting for one peer link before we drop
CLIENT_QUEUE_MAX = 65536  # replies waiting for one client before it is cut off
HELLO_TIMEOUT_S = 5.0
PEER_BACKOFF_MAX_S = 0.05
SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_ACK_TIMEOUT_S = 2.0
SNAPSHOT_SEND_TRIES = 10  # unanswered chunks in a row before a transfer is abandoned
RECEIVE_BYTES = 1 << 18
_SESSION_HEADER = struct.Struct("<QQ")


async def read_frames(stream: trio.SocketStream, decoder: wire.FrameDecoder):
    """Yield decoded frame bodies until EOF (ProtocolError on a bad frame)."""
    while True:
        # Frames that arrived with an earlier read (a hello and the first request in
        # one packet, say) come out before we wait for more bytes.
        while (frame := decoder.next_frame()) is not None:
            yield frame
        if not await receive_into(stream, decoder):
            return


async def receive_into(stream: trio.SocketStream, decoder: wire.FrameDecoder) -> bool:
    """Wait for bytes and feed them to `decoder`; False at EOF between frames
    (ProtocolError at EOF in the middle of one)."""
    data = await stream.receive_some(RECEIVE_BYTES)
    if not data:
        if decoder.buffered:
            raise wire.ProtocolError("connection closed in the middle of a frame")
        return False
    decoder.feed(data)
    return True


class ReplicaServer:
    """A running replica: the core, its WAL and its network."""

    def __init__(self, options: ServerOptions) -> None:
        if options.replica_id not in options.cluster:
            raise ConfigError(f"--id {options.replica_id} is not in --cluster "
                              f"({', '.join(str(i) for i in sorted(options.cluster))})")
        self.options = options
        self.replica_id = options.replica_id
        self.cluster = dict(options.cluster)
        self.address = self.cluster[self.replica_id]
        self.cluster_id = options.cluster_id or default_cluster_id(self.cluster)
        self.member_ids = frozenset(self.cluster)
        self.state_machine = load_state_machine(options.state_machine)
        self.data_dir = open_data_dir(options.data_dir, self.cluster_id, self.replica_id)
        self.wal = None
        try:
            self.snapshots = snapshots.SnapshotStore(options.data_dir)
            snapshot = self.snapshots.load_latest(self.cluster_id)
            self.snapshot_index = snapshot[0] if snapshot else 0
            self.wal = self.data_dir.open_wal(fsync=options.fsync,
                                              segment_bytes_max=options.wal_segment_bytes)
            self.core = Replica(self.replica_id, sorted(self.cluster), self.state_machine,
                                options.core_config(), seed=int.from_bytes(os.urandom(8), "little"))
            try:
                self.core.recover(self._replayed_records(), snapshot)
            except (ValueError, WalCorruptError) as exc:  # e.g. a snapshot file was deleted
                raise WalCorruptError(f"cannot recover {options.data_dir}: {exc}") from None
            del snapshot
        except BaseException:
            if self.wal is not None:
                self.wal.close()
            self.data_dir.close()
            raise
        self.peer_links = {p: Outbox(PEER_QUEUE_MAX) for p in self.cluster if p != self.replica_id}
        self.last_peer_msg = None    # the last message send_peer encoded, and its frame
        self.last_peer_frame = b""
        self.dirty: set[Outbox] = set()  # outboxes with frames put since the last flush
        self.pending_submits: dict[tuple[int, int], tuple[Conn, int]] = {}
        self.pending_reads: dict[int, tuple[Conn, int, list]] = {}
        self.next_read_id = 1
        self.after: deque = deque()  # (wal seq required, persist_id, messages)
        self.wake = trio.Event()
        self.fatal: BaseException | None = None  # the driver raises it (a failed fsync)
        self.wal_sync = WalSync(self.wal)   # the WAL's fsyncs, driven from this Trio run
        self.wal_sync.on_sync = self.on_sync
        self.persisted_id = 0
        self.stats = {"peer_drops": 0, "client_drops": 0, "bad_frames": 0, "fsyncs": 0,
                      "snapshots_taken": 0, "snapshots_sent": 0, "snapshots_installed": 0}
        self.nursery: trio.Nursery | None = None
        self.wal_bytes_since_snapshot = 0
        self.snapshot_lock = trio.Lock()  # one snapshot or install at a time
        self.sending_snapshot: set[int] = set()
        self.incoming: dict[int, list] = {}  # peer -> [index, total, bytearray]
        self.transfer_acks: dict[tuple[int, int], list] = {}  # (peer, index) -> [offset, Event]

    def _replayed_records(self):
        for seq, payload in self.wal.replay():
            record = cbor_decode(payload)
            if record is not CBOR_FALLBACK:
                yield record
                continue
            try:
                yield cbor2.loads(payload)
            except Exception as exc:
                raise WalCorruptError(f"WAL record {seq} passed its checksum but does not "
                                      f"decode: {exc}") from None

    # -- the loop around the core

    def kick(self) -> None:
        """New input reached the core: make the driver run."""
        self.wake.set()

    def start_or_kick(self) -> None:
        """A client request reached the core: start it now if it is alone, else batch.

        With other requests in flight, waking the driver lets every request that
        arrives meanwhile (from any connection) share one slot and one round.  A
        request alone has nothing to wait for: handling it here saves a task switch.
        """
        if len(self.pending_submits) + len(self.pending_reads) == 1:
            self.drive()
        else:
            self.kick()

    async def driver(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if self.fatal is not None:
                raise self.fatal
            self.drive()
            await trio.lowlevel.checkpoint()

    def flush(self) -> None:
        """Write every outbox that got frames since the last flush."""
        dirty = self.dirty
        if dirty:
            for outbox in dirty:
                outbox.flush()
            dirty.clear()

    def handle_ready(self, rd) -> None:
        wal = self.wal
        if rd.messages:
            # These never depend on our own disk (a leader's accepts, say): out first,
            # so the peers' work overlaps our WAL write and fsync.
            for to, msg in rd.messages:
                self.send_peer(to, msg)
            self.flush()
        if rd.records:
            payloads = [cbor_dumps(r) for r in rd.records]
            wal.append_many(payloads)
            self.wal_bytes_since_snapshot += sum(map(len, payloads))
            if not self.sync_inline():
                # Group commit: starts an fsync unless one is running (its end starts
                # the next, covering everything appended meanwhile).
                self.wal_sync.start_sync()
        for peer in rd.snapshot_to:
            if peer not in self.sending_snapshot and self.snapshot_index and self.nursery:
                self.sending_snapshot.add(peer)
                self.nursery.start_soon(self.send_snapshot, peer)
        if rd.records or rd.messages_after_persist:
            required = wal.last_seq
            if wal.durable_seq >= required and not self.after:
                for to, msg in rd.messages_after_persist:
                    self.send_peer(to, msg)
                self.mark_persisted(rd.persist_id)
            else:
                self.after.append((required, rd.persist_id, rd.messages_after_persist))
        if rd.results:
            pending = self.pending_submits
            for sid, first, packed in rd.results:
                waiter = pending.pop((sid, first), None)
                if waiter is not None:
                    self.reply(waiter[0], wire.ok(waiter[1], packed))
        for read_id in rd.reads:
            conn, request_id, queries = self.pending_reads.pop(read_id)
            self.answer_read(conn, request_id, queries)
        for read_id in rd.reads_failed:
            conn, request_id, _ = self.pending_reads.pop(read_id)
            self.reply(conn, wire.redirect(request_id, self.leader_address()))
        if rd.lost_leadership:
            leader = self.leader_address()
            for conn, request_id in self.pending_submits.values():
                self.reply(conn, wire.redirect(request_id, leader))
            self.pending_submits.clear()

    def mark_persisted(self, persist_id: int) -> None:
        """Tell the core its records up to `persist_id` are durable (callers then take
        its output: they are inside a ready() loop, or drive())."""
        if persist_id > self.persisted_id:
            self.persisted_id = persist_id
            self.core.persisted(persist_id)

    def on_sync(self, error) -> None:
        """An fsync ended (the WAL calls this in the event loop's thread).

        Releases the messages that waited for it (a follower's votes go out from here,
        without waiting for a task) and tells the core.  Must not raise: it runs as a
        Trio callback, so a failure is handed to the driver, which stops the replica.
        """
        try:
            if error is not None:
                raise error
            self.release_durable()
            wal = self.wal
            if wal.last_seq > wal.durable_seq and not self.sync_inline():
                self.wal_sync.start_sync()   # the next group, before the core's output is handled
            self.drive()
        except BaseException as exc:
            if self.fatal is None:
                self.fatal = exc
            self.kick()

    def release_durable(self) -> None:
        """After an fsync: send the messages that waited for it, tell the core."""
        wal = self.wal
        durable = wal.durable_seq
        self.stats["fsyncs"] = wal.fsync_count
        persist_id = 0
        after = self.after
        while after and after[0][0] <= durable:
            _, pid, msgs = after.popleft()
            for to, msg in msgs:
                self.send_peer(to, msg)
            persist_id = max(persist_id, pid)
        if persist_id:
            self.mark_persisted(persist_id)

    async def ticker(self) -> None:
        period = self.options.tick_ms / 1000
        deadline = trio.current_time()
        while True:
            deadline += period
            now = trio.current_time()
            if deadline < now - 10 * period:
                deadline = now  # we were stalled: do not fire a burst of catch-up ticks
            await trio.sleep_until(deadline)
            self.core.tick()
            # Handled here rather than by waking the driver: most ticks produce
            # nothing, and an idle replica should cost (almost) nothing.
            self.drive()
            if not self.snapshot_lock.locked() and (
                    self.wal_bytes_since_snapshot >= self.options.snapshot_bytes
                    or self.core.applied_index - self.snapshot_index >= self.options.snapshot_slots):
                self.nursery.start_soon(self.take_snapshot)

    # -- snapshots and compaction

    async def take_snapshot(self) -> int:
        """Snapshot the state at the applied index, write it durably, compact the log."""
        async with self.snapshot_lock:
            core = self.core
            if core.applied_index <= self.snapshot_index:
                return self.snapshot_index
            # The state is serialized here, on the loop (the only stall: a memory copy);
            # writing and fsyncing the file happen in a worker thread.
            snapshot = core.snapshot()
            cut, restate_end = self.flush_restatement()
            self.wal_bytes_since_snapshot = 0
            index = snapshot[0]
            parts = snapshots.encode_parts(self.cluster_id, snapshot)
            del snapshot
            await trio.to_thread.run_sync(self.snapshots.write, index, parts)
            self.stats["snapshots_taken"] += 1
            await self.compact(index, cut, restate_end)
            log.info("snapshot at slot %d written (%d bytes); log compacted", index,
                     sum(map(len, parts)))
            return index

    def flush_restatement(self) -> tuple[int, int]:
        """Write the Ready that restates the log; return (cut, restate_end) WAL seqs."""
        cut = self.wal.last_seq + 1
        while (rd := self.core.ready()) is not None:
            self.handle_ready(rd)
        return cut, self.wal.last_seq

    async def compact(self, index: int, cut: int, restate_end: int) -> None:
        """Once the restatement is durable, drop WAL segments and memory below `index`."""
        self.snapshot_index = max(self.snapshot_index, index)
        while self.wal.durable_seq < restate_end:
            await self.wal_sync.sync_async()
        self.wal.truncate_before(cut)
        self.core.compact(index - self.options.retain_slots)

    async def send_snapshot(self, peer: int) -> None:
        """Stream the latest snapshot file to a peer, one acknowledged chunk at a time."""
        try:
            index = self.snapshots.latest_index()
            data = await trio.to_thread.run_sync(self.snapshots.read, index)
            total = len(data)
            offset = 0
            misses = 0
            key = (peer, index)
            while offset < total and misses < SNAPSHOT_SEND_TRIES:
                ack = self.transfer_acks[key] = [offset, trio.Event()]
                self.send_peer(peer, (wire.SNAPSHOT_CHUNK, self.replica_id, index, offset, total,
                                      data[offset:offset + SNAPSHOT_CHUNK_BYTES]))
                with trio.move_on_after(SNAPSHOT_ACK_TIMEOUT_S):
                    await ack[1].wait()
                if ack[1].is_set():
                    offset = ack[0]  # may go back: the receiver restarted the transfer
                    misses = 0
                else:
                    misses += 1
            if offset >= total:
                self.stats["snapshots_sent"] += 1
                log.info("sent snapshot at slot %d (%d bytes) to replica %d", index, total, peer)
            else:
                log.info("gave up sending snapshot %d to replica %d at byte %d", index, peer, offset)
        except (OSError, snapshots.SnapshotCorruptError) as exc:
            log.warning("cannot send snapshot to replica %d: %s", peer, exc)
        finally:
            self.sending_snapshot.discard(peer)
            self.transfer_acks = {k: v for k, v in self.transfer_acks.items() if k[0] != peer}

    def on_snapshot_ack(self, peer: int, index: int, next_offset: int) -> None:
        ack = self.transfer_acks.get((peer, index))
        if ack is not None:
            ack[0] = next_offset
            ack[1].set()

    def on_snapshot_chunk(self, peer: int, index: int, offset: int, total: int, data: bytes) -> None:
        def acknowledge(next_offset):
            self.send_peer(peer, (wire.SNAPSHOT_ACK, self.replica_id, index, next_offset))

        if index <= self.core.commit_index:
            acknowledge(total)  # we no longer need it: the sender may stop
            return
        incoming = self.incoming.get(peer)
        if incoming is None or incoming[0] != index or incoming[1] != total:
            if offset != 0:
                acknowledge(0)  # start over: this is not the transfer we hold
                return
            incoming = self.incoming[peer] = [index, total, bytearray()]
        buffer = incoming[2]
        if offset == len(buffer):
            if len(buffer) + len(data) > total:
                raise wire.ProtocolError("snapshot chunk runs past the snapshot's size")
            buffer += data
        acknowledge(len(buffer))
        if len(buffer) == total:
            del self.incoming[peer]
            self.nursery.start_soon(self.install_snapshot, peer, index, bytes(buffer))

    async def install_snapshot(self, peer: int, index: int, data: bytes) -> None:
        """Verify a received snapshot, make it durable, then hand it to the core."""
        try:
            snapshot = snapshots.decode(data, self.cluster_id, f"snapshot from replica {peer}")
        except snapshots.SnapshotCorruptError as exc:
            log.warning("%s; discarded", exc)
            return
        async with self.snapshot_lock:
            if snapshot[0] != index or index <= self.core.commit_index:
                return
            await trio.to_thread.run_sync(self.snapshots.write, index, data)
            _, _, sessions, state = snapshot
            del snapshot, data
            if not self.core.install_snapshot(index, sessions, state):
                return
            cut, restate_end = self.flush_restatement()
            self.wal_bytes_since_snapshot = 0
            self.stats["snapshots_installed"] += 1
            await self.compact(index, cut, restate_end)
            log.info("installed snapshot at slot %d from replica %d", index, peer)

    # -- peers

    def send_peer(self, to: int, msg: tuple) -> None:
        """Queue a message for a peer; it leaves at the next flush (dropped if the
        link's queue is full: the core resends what matters)."""
        outbox = self.peer_links[to]
        # The core gives each peer its own tuple of one ACCEPT (sharing the values
        # list, so the comparison is cheap): encode it once for all of them.
        if msg == self.last_peer_msg:
            frame = self.last_peer_frame
        else:
            frame = wire.encode_frame(msg)
            self.last_peer_msg = msg
            self.last_peer_frame = frame
        if outbox.put(frame):
            self.dirty.add(outbox)
        else:
            self.stats["peer_drops"] += 1

    async def peer_link(self, peer_id: int) -> None:
        """Dial one peer forever (with backoff) and send it our messages."""
        host, port = split_address(self.cluster[peer_id])
        outbox = self.peer_links[peer_id]
        backoff = 0.02
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                # Keep retries well under the election timeout: a restarted peer that
                # hears no leader soon enough campaigns and deposes a healthy one.
                await trio.sleep(backoff)
                backoff = min(backoff * 2, PEER_BACKOFF_MAX_S)
                continue
            try:
                await stream.send_all(wire.encode_frame(wire.peer_hello(self.cluster_id, self.replica_id)))
                decoder = wire.FrameDecoder(self.options.frame_bytes_max)
                with trio.fail_after(HELLO_TIMEOUT_S):
                    async for frame in read_frames(stream, decoder):
                        cluster_id, replica_id = wire.parse_welcome(frame)
                        if cluster_id != self.cluster_id or replica_id != peer_id:
                            raise wire.ProtocolError(
                                f"{self.cluster[peer_id]} is cluster {cluster_id!r} replica "
                                f"{replica_id}, expected cluster {self.cluster_id!r} replica {peer_id}")
                        break
                    else:
                        raise wire.ProtocolError("closed before welcome")
                backoff = 0.02
                log.info("connected to replica %d at %s", peer_id, self.cluster[peer_id])
                await outbox.run_writer(stream)   # returns only by raising
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, wire.ProtocolError) as exc:
                log.info("link to replica %d lost: %s", peer_id, exc or type(exc).__name__)
            finally:
                # What is left may start mid-frame: it must never reach a new connection.
                outbox.frames = []
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await stream.aclose()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, PEER_BACKOFF_MAX_S)

    async def serve_peer(self, stream: trio.SocketStream, decoder: wire.FrameDecoder,
                         peer_id: int, name: str) -> None:
        core = self.core
        cluster_ids = self.member_ids
        me = self.replica_id
        while True:
            # Every frame at hand goes into the core, then the core's output is handled
            # right here: a peer's message is usually one round of the protocol (an
            # accept, a vote), and waking the driver for it would cost a task switch
            # on the critical path.  Clients' requests do wake the driver, so that
            # requests from many connections share slots.
            stepped = False
            while (frame := decoder.next_frame()) is not None:
                msg = wire.parse_peer_message(frame, cluster_ids, me, peer_id)
                if msg[0] == wire.SNAPSHOT_CHUNK:
                    self.on_snapshot_chunk(peer_id, *msg[2:])
                    continue
                if msg[0] == wire.SNAPSHOT_ACK:
                    self.on_snapshot_ack(peer_id, msg[2], msg[3])
                    continue
                try:
                    core.step(msg)
                except MessageError as exc:
                    raise wire.ProtocolError(str(exc)) from None
                stepped = True
            if stepped:
                self.drive()
            else:
                self.flush()
            if not await receive_into(stream, decoder):
                return

    def drive(self) -> None:
        """Handle everything the core has to say now (what the driver does, inline)."""
        core = self.core
        wal = self.wal
        while True:
            while (rd := core.ready()) is not None:
                self.handle_ready(rd)
            if not self.after or wal.sync_in_flight:
                break
            if not self.sync_inline():
                self.wal_sync.start_sync()   # records appended while we were syncing inline
                break
            # What needs no fsync leaves first; then the fsync, in this thread.
            self.flush()
            try:
                wal.sync()
            except BaseException as exc:
                if self.fatal is None:
                    self.fatal = exc
                self.kick()   # the driver raises it: the replica stops
                return
            self.release_durable()
        self.flush()

    def sync_inline(self) -> bool:
        """Whether to fsync in the event loop's thread, blocking it (see drive()).

        A follower does: it has nothing to do but wait for the fsync that its vote
        waits for, and handing the fsync to the fsync thread and back costs two
        thread wake-ups (about 150 us on a busy 2-core machine: more than half the
        fdatasync itself).  A leader does not: it keeps taking requests and sending
        accepts while its own fsync runs.  Never while an fsync is in flight.
        """
        return (self.options.follower_inline_fsync and not self.wal.sync_in_flight
                and self.core.role != "leader")

    # -- clients

    def reply(self, conn: Conn, obj) -> None:
        """Queue a reply to a client; it leaves at the next flush."""
        if conn.put(wire.encode_frame(obj)):
            self.dirty.add(conn)
        elif not conn.closed:
            # A client that does not read its replies is cut off rather than let us
            # buffer without bound.
            self.stats["client_drops"] += 1
            conn.close()

    def leader_address(self) -> str | None:
        leader = self.core.leader_id
        return self.cluster.get(leader) if leader else None

    def answer_read(self, conn: Conn, request_id: int, queries: list) -> None:
        try:
            query = self.state_machine.query
            results = [query(q) for q in queries]
        except Exception as exc:
            self.reply(conn, wire.error(request_id, "bad_request", f"query failed: {exc}"))
            return
        self.reply(conn, wire.ok(request_id, results))

    def status(self) -> dict:
        """This replica's status fields (DESIGN.md section 4) and counters."""
        core = self.core
        stats = core.statistics()
        status = {
            "id": self.replica_id,
            "address": self.address,
            "cluster_id": self.cluster_id,
            "role": core.role,
            "ballot": core.ballot,
            "leader_id": core.leader_id,
            "leader": self.leader_address(),
            "commit_index": core.commit_index,
            "applied_index": core.applied_index,
            "state_digest": self.state_machine.state_digest(),
            "snapshot_index": self.snapshot_index,
            "log_start": core.log_start,
            "wal_first_seq": self.wal.first_seq,
            "wal_last_seq": self.wal.last_seq,
            "wal_durable_seq": self.wal.durable_seq,
            "fsync": self.options.fsync,
        }
        status["statistics"] = {k: v for k, v in stats.items() if k not in status}
        status["statistics"].update(self.stats)
        return status

    def on_client_request(self, conn: Conn, request: tuple) -> None:
        op = request[0]
        request_id = request[1]
        if op == "submit":
            batch = request[2]
            try:
                code = self.core.propose(batch)
            except BatchError as exc:
                self.reply(conn, wire.error(request_id, "bad_request", str(exc)))
                return
            if code == PROPOSED:
                self.pending_submits[_SESSION_HEADER.unpack_from(batch)] = (conn, request_id)
                self.start_or_kick()
            elif code == NOT_LEADER:
                self.reply(conn, wire.redirect(request_id, self.leader_address()))
            else:
                self.reply(conn, wire.error(request_id, "busy", "the leader's queue is full"))
        elif op == "read":
            queries, stale = request[2], request[3]
            if stale:
                self.answer_read(conn, request_id, queries)
                return
            read_id = self.next_read_id
            self.next_read_id += 1
            if self.core.read(read_id):
                self.pending_reads[read_id] = (conn, request_id, queries)
                self.start_or_kick()
            else:
                self.reply(conn, wire.redirect(request_id, self.leader_address()))
        elif op == "status":
            self.reply(conn, wire.ok(request_id, self.status()))
        else:  # snapshot
            self.nursery.start_soon(self.snapshot_on_request, conn, request_id)

    async def snapshot_on_request(self, conn: Conn, request_id: int) -> None:
        index = await self.take_snapshot()
        self.reply(conn, wire.ok(request_id, index))

    async def serve_client(self, stream: trio.SocketStream, decoder: wire.FrameDecoder,
                           name: str) -> None:
        conn = Conn(name, CLIENT_QUEUE_MAX)
        conn.put(wire.encode_frame(wire.welcome(self.cluster_id, self.replica_id)))
        failure = None

        async def write_replies():
            try:
                await conn.run_writer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                conn.closed = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_replies)
            try:
                async for frame in read_frames(stream, decoder):
                    if conn.closed:
                        break
                    self.on_client_request(conn, wire.parse_client_request(frame))
                    self.flush()   # replies given at once (redirects, stale reads, ...)
            except (wire.ProtocolError, OSError, trio.BrokenResourceError) as exc:
                # Raised after the nursery, so it is not wrapped in an exception group.
                failure = exc
            finally:
                # Replies already queued still go out (the client may only have
                # half-closed), for at most a second.
                conn.close()
                nursery.cancel_scope.deadline = trio.current_time() + 1
        if failure is not None:
            raise failure

    # -- accepting connections

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            name = f"{peer[0]}:{peer[1]}"
        except OSError:
            name = "?"
        decoder = wire.FrameDecoder(self.options.frame_bytes_max)
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                frames = read_frames(stream, decoder)
                hello = None
                async for frame in frames:
                    hello = wire.parse_hello(frame)
                    break
                await frames.aclose()
            if hello is None:
                return
            if hello[0] == "peer":
                _, cluster_id, peer_id = hello
                if cluster_id != self.cluster_id:
                    raise wire.ProtocolError(f"peer of another cluster {cluster_id!r}")
                if peer_id not in self.peer_links:
                    raise wire.ProtocolError(f"peer claims replica id {peer_id}, not another member")
                await stream.send_all(wire.encode_frame(wire.welcome(self.cluster_id, self.replica_id)))
                await self.serve_peer(stream, decoder, peer_id, name)
            else:
                await self.serve_client(stream, decoder, name)
        except wire.ProtocolError as exc:
            self.stats["bad_frames"] += 1
            log.warning("dropped connection from %s: %s", name, exc)
        except trio.TooSlowError:
            log.warning("dropped connection from %s: no hello within %.0f s", name, HELLO_TIMEOUT_S)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            # One connection must never take the replica down.
            log.exception("dropped connection from %s after an unexpected error", name)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then finish the fsync in flight and close the WAL."""
        bind = self.options.listen or self.address
        host, port = split_address(bind)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.driver)
                nursery.start_soon(self.ticker)
                for peer_id in self.peer_links:
                    nursery.start_soon(self.peer_link, peer_id)
                await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
                log.info("cypaxos replica %d serving on %s (cluster %s, data dir %s, fsync %s, "
                         "recovered commit index %d)", self.replica_id, self.address, self.cluster_id,
                         self.options.data_dir, "always" if self.options.fsync else "off",
                         self.core.commit_index)
                task_status.started(self)
        finally:
            self.close()

    def close(self) -> None:
        """Flush and sync the WAL, release the data dir."""
        if self.wal is not None:
            try:
                self.wal_sync.close()
            except Exception as exc:  # the process is ending; say so, don't mask the cause
                log.error("closing the WAL failed: %s", exc)
            self.wal = None
            self.data_dir.close()


async def serve(options: ServerOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one replica until cancelled, or until SIGTERM/SIGINT (then return normally)."""
    server = ReplicaServer(options)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                async for signum in signals:
                    log.info("replica %d stopping on %s", options.replica_id,
                             signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop_on_signal)
            await nursery.start(server.run)
            task_status.started(server)


def run_server(options: ServerOptions) -> int:
    """Run a replica in this process until SIGTERM/SIGINT; returns the exit code (0).

    Expected failures (bad options, a foreign data dir, a corrupt WAL, a port in use)
    raise `cypaxos.errors.Error` with a one-line message.
    """
    if not logging.getLogger().handlers:
        logs.configure()  # CYPAXOS_LOG_LEVEL / CYPAXOS_LOG_FORMAT (a ConfigError if bad)
    try:
        trio.run(serve, options)
    except BaseExceptionGroup as group:
        # Nurseries wrap a startup failure; callers want the one expected error.
        error = expected_error(group, Error)
        if error is not group:
            raise error from None
        raise
    except KeyboardInterrupt:
        pass
    return 0
