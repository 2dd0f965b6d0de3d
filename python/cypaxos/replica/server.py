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
* listeners (one port serves peers and clients: `handle_connection` runs TLS and the
  handshake (`trust.accept`) and hands the authenticated connection to
  `peers.serve_peer` or `clients.serve_client`) and the links we dial
  (`peers.peer_link`, through `trust.dial_peer`);
* the connection cap (`connections_max`): client connections and handshakes in
  progress beyond it are closed at once, so descriptors stay for the WAL, snapshots
  and peers;
* with `metrics_address`, the metrics and health endpoint (`metrics.serve_metrics`),
  which reads the counters here at scrape time (`health()` is /healthz's answer).

Startup order: `serve` binds the replica's port (and the metrics address) *before*
`ReplicaServer` opens the data dir, so a serve that cannot bind (the address is not
this host's, the port is taken) leaves the data dir exactly as it was.

A peer or client that sends a malformed or oversized frame is disconnected with one
log line; a warning that can repeat goes through `limited_log` (once, then once a
minute per source and kind, with a count), flushed from the ticker.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import time
from typing import Optional

import trio

from .. import logs, wire
from ..addresses import split_address
from ..core import Replica
from ..errors import (ConfigError, DataDirError, Error, IdentityMismatchError, StorageError,
                      WalCorruptError)
from ..groups import BaseExceptionGroup, expected_error
from ..security.identity import CLIENT
from ..storage import snapshots
from ..storage.datadir import open_data_dir
from ..storage.wal import describe_error
from .clients import serve_client
from .disk import DiskStorage, replayed_records
from .framing import HELLO_TIMEOUT_S, read_frames, receive_into
from .node import NodeOptions, ReplicaNode
from .options import ServerOptions, default_cluster_id, load_state_machine
from .outbox import Outbox, SocketTransport
from .peers import peer_link, serve_peer
from .trust import (INSECURE_WARNING, HandshakeAbandoned, HandshakeRefused, accept, linger,
                    load_trust)

__all__ = ["ReplicaServer", "serve", "run_server", "open_listeners", "open_metrics_listeners",
           "bind", "read_frames",
           "receive_into", "identity_advice", "SNAPSHOT_CHUNK_BYTES", "LOG_REPEAT_INTERVAL_S",
           "FSYNC_STALL_S", "CONNECTIONS_MAX", "DESCRIPTORS_RESERVED", "connection_cap"]

log = logging.getLogger("cypaxos.server")  # the name in log lines, kept across moves

PEER_QUEUE_MAX = 4096  # messages waiting for one peer link before we drop
SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_ACK_TIMEOUT_S = 2.0
SNAPSHOT_SEND_TRIES = 10  # unanswered chunks in a row before a transfer is abandoned
LOG_REPEAT_INTERVAL_S = 60.0
"""A warning that can repeat is logged at most once per this, per source and kind."""
LOG_FLUSH_INTERVAL_S = 1.0   # how often the ticker logs the counts of quiet keys
FSYNC_STALL_S = 5.0
"""/healthz fails while a WAL fsync has been running longer than this."""
CONNECTIONS_MAX = 1024
"""Default cap on client connections plus connections still in their handshake."""
DESCRIPTORS_RESERVED = 64
"""Descriptors the cap leaves for the WAL's segments, snapshot files, peer links,
backups, metrics and the listeners (on top of two per peer)."""


def connection_cap(requested: int | None, peers: int) -> int:
    """The connection cap: `requested` (or CONNECTIONS_MAX), lowered so that the
    descriptor limit (raised to its hard limit first) keeps DESCRIPTORS_RESERVED plus
    two per peer free.  ConfigError for a requested cap below 1."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--connections-max {requested}: must be at least 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
    room = soft - DESCRIPTORS_RESERVED - 2 * peers
    cap = CONNECTIONS_MAX if requested is None else requested
    if room < cap:
        if requested is not None:
            log.warning("--connections-max %d lowered to %d: the descriptor limit is %d "
                        "(ulimit -n)", requested, max(1, room), soft)
        cap = max(1, room)
    return cap


def identity_advice(exc: IdentityMismatchError, options: ServerOptions) -> str:
    """The one line for a data dir whose identity is not the command line's: what
    differs, and the way out."""
    path = exc.path
    parts = []
    if exc.found_cluster_id != exc.cluster_id:
        source = ("--cluster-id" if options.cluster_id
                  else "derived from --cluster, which is not the one it was created with")
        parts.append(f"cluster {exc.found_cluster_id!r}, not {exc.cluster_id!r} ({source})")
    if exc.found_replica_id != exc.replica_id:
        parts.append(f"replica {exc.found_replica_id}, not replica {exc.replica_id} (--id)")
    ways = []
    if exc.found_replica_id != exc.replica_id:
        ways.append(f"start replica {exc.found_replica_id} with it (--id "
                    f"{exc.found_replica_id}) or give replica {exc.replica_id} its own "
                    "--data-dir")
    if exc.found_cluster_id != exc.cluster_id:
        ways.append(f"if it is the same cluster at new addresses, pass --cluster-id "
                    f"{exc.found_cluster_id} to every replica")
    ways.append("to start a new cluster, move this data dir away and give --data-dir an "
                "empty directory (only while no replica of the old cluster runs: a replica "
                "that lost its data must be replaced under a new id, never restarted empty)")
    return f"data dir {path} belongs to {' and '.join(parts)}; " + "; ".join(ways)


async def bind(address: str, what: str = "", *,
               not_local_hint: str = "") -> list[trio.SocketListener]:
    """Listeners on `address` (HOST:PORT); ConfigError, one line saying why (`what`
    names the flag), if it cannot be bound.  Touches no file."""
    host, port = split_address(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRNOTAVAIL:
            reason += f" (not an address of this host{not_local_hint})"
        elif exc.errno == errno.EADDRINUSE:
            reason += " (another process holds the port: another replica?)"
        raise ConfigError(f"cannot listen on {what}{address}: {reason}") from None


async def open_listeners(options: ServerOptions) -> list[trio.SocketListener]:
    """Bind the replica's port (`--listen`, else its address in `--cluster`);
    ConfigError (one line) if it cannot be.  Touches no file."""
    return await bind(options.listen or options.cluster[options.replica_id],
                      not_local_hint=": --listen 0.0.0.0:PORT binds every interface")


async def open_metrics_listeners(options: ServerOptions) -> list[trio.SocketListener]:
    """Bind `--metrics-address` (no listener without one); ConfigError if it cannot
    be.  Touches no file."""
    if not options.metrics_address:
        return []
    return await bind(options.metrics_address, "--metrics-address ")


class ReplicaServer:
    """A running replica: its node over the data dir and the network."""

    def __init__(self, options: ServerOptions) -> None:
        if options.replica_id not in options.cluster:
            raise ConfigError(f"--id {options.replica_id} is not in --cluster "
                              f"({', '.join(str(i) for i in sorted(options.cluster))})")
        config = options.core_config()   # ConfigError for a lease that does not fit
        client_limits = options.client_limits()   # ... or a client bound that cannot work
        self.options = options
        self.replica_id = options.replica_id
        self.cluster = dict(options.cluster)
        self.address = self.cluster[self.replica_id]
        self.cluster_id = options.cluster_id or default_cluster_id(self.cluster)
        self.member_ids = frozenset(self.cluster)
        self.state_machine = load_state_machine(options.state_machine)
        # Before the data dir: bad credentials leave it untouched.
        self.trust = load_trust(options, self.cluster_id)
        self.connections_max = connection_cap(options.connections_max, len(self.cluster) - 1)
        try:
            self.data_dir = open_data_dir(options.data_dir, self.cluster_id, self.replica_id)
        except IdentityMismatchError as exc:
            raise DataDirError(identity_advice(exc, options)) from None
        self.election_ticks = config.election_ticks
        self.max_sessions = config.max_sessions
        self.limited_log = logs.RateLimitedLog(log, LOG_REPEAT_INTERVAL_S)
        # Counted here, where connections are handled (the metrics read them).
        self.client_connections = 0
        self.peer_connected: dict[int, bool] = {}
        self.peer_links_lost: dict[int, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.backup_files_open = 0   # snapshot files held open by backups (replica.backup)
        # Client connections and unauthenticated ones: at most connections_max.
        self.connections_open = 0
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
                    log_interval_ticks=max(1, round(LOG_REPEAT_INTERVAL_S * ticks_per_s)),
                    status={"fsync": options.fsync,
                            "read_lease_ms": config.lease_ticks * options.tick_ms},
                    **client_limits),
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
        """Drive the node when it asks; stop the replica once its storage failed."""
        node = self.node
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if node.fatal is not None:
                # An Error, so that `cypaxos serve` says it in one line (no traceback).
                raise StorageError(
                    f"replica {self.replica_id} stopped: storage failed: "
                    f"{describe_error(node.fatal)} (a replica never runs on storage it "
                    "cannot write; once it can, restart it: it recovers from its data "
                    "dir)") from node.fatal
            node.drive()
            await trio.lowlevel.checkpoint()

    async def ticker(self) -> None:
        node = self.node
        period = self.options.tick_ms / 1000
        flush_every = max(1, round(LOG_FLUSH_INTERVAL_S / period))
        ticks = 0
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
            ticks += 1
            if ticks >= flush_every:
                ticks = 0
                self.limited_log.flush()
                node.limited_log.flush()

    def status(self) -> dict:
        """This replica's status fields (DESIGN.md section 4) and counters."""
        return self.node.status()

    def health(self) -> tuple[bool, str]:
        """(healthy, one line): what /healthz answers.  Healthy: a member of the
        configuration that knows a leader it heard from within an election timeout
        (or leads) and whose WAL can be written."""
        node = self.node
        if node.fatal is not None:
            return False, f"stopping: storage failed: {_brief(node.fatal)}"
        wal = self.storage.wal
        if wal.failure is not None or wal.closed:
            return False, "the WAL cannot be written" + (
                f": {_brief(wal.failure)}" if wal.failure is not None else " (closed)")
        started = self.storage.wal_sync.started_at
        if started and time.monotonic() - started > FSYNC_STALL_S:
            return False, (f"a WAL fsync has been running for "
                           f"{time.monotonic() - started:.1f} s")
        if self.replica_id not in node.cluster:
            return False, f"replica {self.replica_id} is not a member of the configuration"
        heard = node.leader_heard_ticks()
        tick_s = self.options.tick_ms / 1000
        if heard is None:
            return False, "no leader known"
        if heard >= self.election_ticks:
            return False, (f"no leader: last heard from replica {node.core.leader_id} "
                           f"{heard * tick_s:.1f} s ago")
        if node.core.leader_id == self.replica_id:
            return True, f"leader (ballot {node.core.ballot})"
        return True, f"follower of replica {node.core.leader_id}"

    def auth_failed(self, source: str, reason: str, *, kind: str = "client",
                    name: Optional[str] = None, shown_kind: Optional[str] = None) -> None:
        """Count and log a connection that failed authentication (`kind` ``peer`` or
        ``client``): counted always (`cypaxos_auth_failures_total`), logged once per
        source per minute with the number of others.  `source` is the remote host (the
        key), `name` what the line shows (host:port; default `source`), `shown_kind`
        what it calls the connection (default `kind`; "" for a caller that never said)."""
        shown_kind = kind if shown_kind is None else shown_kind
        self.auth_failures[kind] = self.auth_failures.get(kind, 0) + 1
        self.node.stats["auth_failures"] += 1
        self.limited_log.warning(("auth", source), "refused a %sconnection from %s: %s",
                                 f"{shown_kind} " if shown_kind else "", name or source, reason)

    # -- accepting connections

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            host, name = peer[0], f"{peer[0]}:{peer[1]}"
        except OSError:
            host = name = "?"
        if self.connections_open >= self.connections_max:
            # Closed before anything is read: descriptors stay for the WAL and peers.
            self.node.stats["connections_refused"] += 1
            self.limited_log.warning(("connections_max", host),
                                     "refused a connection from %s: %d connections are open "
                                     "(--connections-max)", name, self.connections_open)
            await trio.aclose_forcefully(stream)
            return
        self.connections_open += 1
        counted = True
        try:
            try:
                with trio.fail_after(HELLO_TIMEOUT_S):
                    stream, who, trailing = await accept(self.trust, stream, self.member_ids)
            except HandshakeAbandoned as exc:
                if exc.received:   # a half-sent hello: as any frame cut off
                    self.node.stats["bad_frames"] += 1
                    self.limited_log.warning(("bad_frame", host), "dropped connection from "
                                             "%s: closed in the middle of its hello", name)
                return
            except HandshakeRefused as exc:
                # A caller that never said it is a peer counts as a client.
                self.auth_failed(host, exc.reason, kind="peer" if exc.kind == "peer" else "client",
                                 name=name, shown_kind=exc.kind)
                if exc.stream is not None:
                    await linger(exc.stream)
                return
            decoder = wire.FrameDecoder(self.options.frame_bytes_max)
            if trailing:
                decoder.feed(trailing)
            if who.peer != CLIENT:
                # An authenticated peer is one of a few: never counted against the cap.
                self.connections_open -= 1
                counted = False
                await serve_peer(self, stream, decoder, who.peer)
            else:
                self.client_connections += 1
                try:
                    await serve_client(self, stream, decoder, name)
                finally:
                    self.client_connections -= 1
        except wire.ProtocolError as exc:
            # Keyed by host, not host:port: a source that keeps reconnecting gets a
            # new port every time (a replica of another cluster dials 20 times a second).
            self.node.stats["bad_frames"] += 1
            self.limited_log.warning(("bad_frame", host), "dropped connection from %s: %s",
                                     name, exc)
        except trio.TooSlowError:
            self.node.stats["hello_timeouts"] += 1
            self.limited_log.warning(("no_hello", host),
                                     "dropped connection from %s: no hello within %.0f s",
                                     name, HELLO_TIMEOUT_S)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            # One connection must never take the replica down.
            self.node.stats["connection_errors"] += 1
            self.limited_log.log(logging.ERROR, ("unexpected", host),
                                 "dropped connection from %s after an unexpected error",
                                 name, exc_info=True)
        finally:
            if counted:
                self.connections_open -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def run(self, listeners: Optional[list] = None,
                  metrics_listeners: Optional[list] = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then finish the fsync in flight and close the WAL.

        `listeners` are the replica's bound port (`open_listeners`; bound here if
        None) and `metrics_listeners` the metrics endpoint's (bound here from
        `options.metrics_address` if None and it is set).
        """
        try:
            if listeners is None:
                listeners = await open_listeners(self.options)
            if metrics_listeners is None:
                metrics_listeners = await open_metrics_listeners(self.options)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.storage.nursery = nursery
                nursery.start_soon(self.driver)
                nursery.start_soon(self.ticker)
                for peer_id in self.peer_links:
                    nursery.start_soon(peer_link, self, peer_id)
                await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
                if metrics_listeners:
                    from .metrics import serve_metrics
                    await nursery.start(serve_metrics, self, metrics_listeners)
                    log.info("metrics on http://%s/metrics and /healthz",
                             self.options.metrics_address)
                log.info("cypaxos replica %d serving on %s (cluster %s, data dir %s, fsync %s, "
                         "peers by %s, recovered commit index %d)", self.replica_id,
                         self.address, self.cluster_id, self.options.data_dir,
                         "always" if self.options.fsync else "off", self.trust.mode,
                         self.node.core.commit_index)
                if self.trust.mode == "insecure":
                    log.warning(INSECURE_WARNING)
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
                # After a storage failure this is its echo: the stop's line says why.
                level = logging.DEBUG if self.node.fatal is not None else logging.ERROR
                log.log(level, "closing the WAL failed: %s", exc)
            self.data_dir.close()


async def serve(options: ServerOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one replica until cancelled, or until SIGTERM/SIGINT (then return normally).

    Binds first, then opens the data dir: a serve that cannot bind writes nothing.
    """
    listeners = await open_listeners(options)
    metrics_listeners: list = []
    try:
        metrics_listeners = await open_metrics_listeners(options)
        server = ReplicaServer(options)
    except BaseException:
        for listener in listeners + metrics_listeners:
            listener.socket.close()
        raise
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                async for signum in signals:
                    log.info("replica %d stopping on %s", options.replica_id,
                             signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop_on_signal)
            await nursery.start(server.run, listeners, metrics_listeners)
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


def _brief(exc: BaseException) -> str:
    """An exception as the few words of a health line."""
    return " ".join(str(exc).split()) or type(exc).__name__
