"""One replica process: the Trio wiring of a `ReplicaNode` to sockets and files.

Everything the replica decides around its core is the node's
(`cypaxos.replica.node`: the after-persist queue, group commit and who fsyncs,
snapshots, restatement and compaction, snapshot transfer, client work, status).
This module gives it what it runs on and owns nothing else:

* storage: the data dir's WAL and snapshot files (`disk.DiskStorage`: the fsync
  thread, worker threads for snapshot files);
* transport: per-connection send queues written with one non-blocking `os.write`
  per flush (`outbox.SocketTransport`);
* time: the ticker turns `tick_ms` of real time into one `node.tick()`;
* the driver task, which the node wakes to handle batched client requests and
  which stops the replica when storage failed (`node.fatal`);
* listeners (one port serves peers and clients: `handle_connection` reads the hello
  and hands the connection to `peers.serve_peer` or `clients.serve_client`) and the
  links we dial (`peers.peer_link`).

A peer or client that sends a malformed or oversized frame is disconnected with one
log line.
"""
from __future__ import annotations

import logging
import os
import signal

import trio

from .. import logs, wire
from ..addresses import split_address
from ..core import Replica
from ..errors import ConfigError, Error, WalCorruptError
from ..groups import BaseExceptionGroup, expected_error
from ..storage import snapshots
from ..storage.datadir import open_data_dir
from .clients import serve_client
from .disk import DiskStorage, replayed_records
from .framing import HELLO_TIMEOUT_S, read_frames, receive_into
from .node import NodeOptions, ReplicaNode
from .options import ServerOptions, default_cluster_id, load_state_machine
from .outbox import Outbox, SocketTransport
from .peers import peer_link, serve_peer

__all__ = ["ReplicaServer", "serve", "run_server", "read_frames", "receive_into",
           "SNAPSHOT_CHUNK_BYTES"]

log = logging.getLogger("cypaxos.server")  # the name in log lines, kept across moves

PEER_QUEUE_MAX = 4096  # messages waiting for one peer link before we drop
SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_ACK_TIMEOUT_S = 2.0
SNAPSHOT_SEND_TRIES = 10  # unanswered chunks in a row before a transfer is abandoned


class ReplicaServer:
    """A running replica: its node over the data dir and the network."""

    def __init__(self, options: ServerOptions) -> None:
        if options.replica_id not in options.cluster:
            raise ConfigError(f"--id {options.replica_id} is not in --cluster "
                              f"({', '.join(str(i) for i in sorted(options.cluster))})")
        config = options.core_config()   # ConfigError for a lease that does not fit
        self.options = options
        self.replica_id = options.replica_id
        self.cluster = dict(options.cluster)
        self.address = self.cluster[self.replica_id]
        self.cluster_id = options.cluster_id or default_cluster_id(self.cluster)
        self.member_ids = frozenset(self.cluster)
        self.state_machine = load_state_machine(options.state_machine)
        self.data_dir = open_data_dir(options.data_dir, self.cluster_id, self.replica_id)
        wal = None
        try:
            store = snapshots.SnapshotStore(options.data_dir)
            snapshot = store.load_latest(self.cluster_id)
            wal = self.data_dir.open_wal(fsync=options.fsync,
                                         segment_bytes_max=options.wal_segment_bytes)
            core = Replica(self.replica_id, sorted(self.cluster), self.state_machine,
                           config, seed=int.from_bytes(os.urandom(8), "little"))
            self.peer_links = {p: Outbox(PEER_QUEUE_MAX) for p in self.cluster
                               if p != self.replica_id}
            self.storage = DiskStorage(wal, store)
            self.transport = SocketTransport(self.peer_links, {})
            ticks_per_s = 1000 / options.tick_ms
            self.node = ReplicaNode(
                NodeOptions(
                    replica_id=self.replica_id, cluster=self.cluster,
                    cluster_id=self.cluster_id, snapshot_bytes=options.snapshot_bytes,
                    snapshot_slots=options.snapshot_slots, retain_slots=options.retain_slots,
                    follower_inline_sync=options.follower_inline_fsync,
                    chunk_bytes=SNAPSHOT_CHUNK_BYTES,
                    chunk_ack_ticks=max(1, round(SNAPSHOT_ACK_TIMEOUT_S * ticks_per_s)),
                    chunk_tries=SNAPSHOT_SEND_TRIES,
                    incoming_bytes_max=options.snapshot_receive_bytes_max,
                    status={"fsync": options.fsync,
                            "read_lease_ms": config.lease_ticks * options.tick_ms}),
                core, self.storage, self.transport, self.kick,
                validate_state=self.validate_state)
            self.transport.stats = self.node.stats
            self.storage.attach(self.node)
            try:
                self.node.recover(replayed_records(wal), snapshot)
            except (ValueError, WalCorruptError) as exc:  # e.g. a snapshot file was deleted
                raise WalCorruptError(f"cannot recover {options.data_dir}: {exc}") from None
            del snapshot
        except BaseException:
            if wal is not None:
                wal.close()
            self.data_dir.close()
            raise
        self.core = core
        self.wake = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.closed = False

    def validate_state(self, state: bytes) -> None:
        """Raise if a received snapshot's state does not restore (into a scratch
        state machine of the same kind)."""
        load_state_machine(self.options.state_machine).restore(state)

    def kick(self) -> None:
        """The node has work for the driver (batched requests), or failed."""
        self.wake.set()

    async def driver(self) -> None:
        node = self.node
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if node.fatal is not None:
                raise node.fatal
            node.drive()
            await trio.lowlevel.checkpoint()

    async def ticker(self) -> None:
        node = self.node
        period = self.options.tick_ms / 1000
        deadline = trio.current_time()
        while True:
            deadline += period
            now = trio.current_time()
            if deadline < now - 10 * period:
                deadline = now  # we were stalled: do not fire a burst of catch-up ticks
            await trio.sleep_until(deadline)
            node.tick()
            # Handled here rather than by waking the driver: most ticks produce
            # nothing, and an idle replica should cost (almost) nothing.
            node.drive()

    def status(self) -> dict:
        """This replica's status fields (DESIGN.md section 4) and counters."""
        return self.node.status()

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
                await serve_peer(self, stream, decoder, peer_id)
            else:
                await serve_client(self, stream, decoder, name)
        except wire.ProtocolError as exc:
            self.node.stats["bad_frames"] += 1
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
                self.storage.nursery = nursery
                nursery.start_soon(self.driver)
                nursery.start_soon(self.ticker)
                for peer_id in self.peer_links:
                    nursery.start_soon(peer_link, self, peer_id)
                await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
                log.info("cypaxos replica %d serving on %s (cluster %s, data dir %s, fsync %s, "
                         "recovered commit index %d)", self.replica_id, self.address, self.cluster_id,
                         self.options.data_dir, "always" if self.options.fsync else "off",
                         self.node.core.commit_index)
                task_status.started(self)
        finally:
            self.close()

    def close(self) -> None:
        """Flush and sync the WAL, release the data dir.  Idempotent."""
        if not self.closed:
            self.closed = True
            try:
                self.storage.close()
            except Exception as exc:  # the process is ending; say so, don't mask the cause
                log.error("closing the WAL failed: %s", exc)
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
