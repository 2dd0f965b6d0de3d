"""The replica's metrics and health endpoint: `serve --metrics-address HOST:PORT`.

Two paths over plain HTTP/1.1, served from the replica's own Trio loop:

* ``GET /metrics``: Prometheus text (library: `prometheus-client`), every metric
  named ``cypaxos_*`` (the list, and what each means: docs/operations.md).
* ``GET /healthz``: ``200 ok: <role>`` when the replica is a member of the
  configuration, knows a leader it heard from within an election timeout (or is the
  leader) and can write its WAL; ``503 <reason>`` (one line) otherwise.

Nothing is measured on the hot path for this: the collector reads, at scrape time,
the counters the node, the core and the storage keep anyway (`ReplicaNode.stats`,
`Replica.statistics()`, the `counters.Histogram`s observed once per fsync, per
proposed slot and per snapshot file).  A scrape costs the loop one pass over those
(tens of microseconds) and the text's encoding.

The endpoint is unauthenticated (Prometheus scrapes plain HTTP): bind it to loopback
or a private interface.  It is bounded like everything else: a few connections at
once, a small request head, a few seconds per request.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Iterator

import trio

from .. import __version__
from .counters import Histogram

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .server import ReplicaServer

__all__ = ["ReplicaCollector", "serve_metrics", "answer",
           "HTTP_CONNECTIONS_MAX", "HTTP_REQUEST_BYTES_MAX", "HTTP_TIMEOUT_S"]

HTTP_CONNECTIONS_MAX = 8
"""Metrics connections served at once; more are closed at once (a scraper retries)."""
HTTP_REQUEST_BYTES_MAX = 8192
"""The most bytes of request line and headers read; past it: 431 and close."""
HTTP_TIMEOUT_S = 5.0
"""A request must arrive whole, and its answer leave, within this."""

_ROLES = ("leader", "follower", "candidate")


def _histogram(family, histogram: Histogram) -> None:
    from prometheus_client.utils import floatToGoString

    family.add_metric([], [(floatToGoString(bound), count)
                           for bound, count in histogram.cumulative()], histogram.sum)


def _dir_bytes(path: str) -> int:
    """Bytes the files directly in `path` take (0 if it cannot be listed)."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        return 0
    return total


class ReplicaCollector:
    """A `prometheus_client` collector over one `ReplicaServer`, read at scrape time."""

    def __init__(self, server: "ReplicaServer") -> None:
        self.server = server

    def collect(self) -> Iterator["Metric"]:
        """Every metric's current value (called by the registry for each scrape)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        server = self.server
        node = server.node
        core = node.core
        storage = server.storage
        stats = node.stats
        core_stats = core.statistics()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        info = GaugeMetricFamily("cypaxos_info", "This replica: 1, labelled with who it is",
                                 labels=["replica_id", "cluster_id", "version"])
        info.add_metric([str(server.replica_id), server.cluster_id, __version__], 1)
        yield info
        role = GaugeMetricFamily("cypaxos_role", "1 for the role this replica is in, "
                                 "0 for the others", labels=["role"])
        for name in _ROLES:
            role.add_metric([name], 1 if core.role == name else 0)
        yield role
        healthy, _ = server.health()
        yield gauge("cypaxos_healthy", "1 when /healthz answers 200", 1 if healthy else 0)
        yield gauge("cypaxos_ballot", "The highest ballot this replica promised "
                    "(round << 16 | replica id)", core.ballot)
        yield gauge("cypaxos_leader_id", "The replica this one believes leads (0: none)",
                    core.leader_id)
        yield gauge("cypaxos_commit_index", "The highest slot known chosen",
                    core.commit_index)
        yield gauge("cypaxos_applied_index", "The highest slot applied to the state "
                    "machine", core.applied_index)
        yield gauge("cypaxos_snapshot_index", "The slot of the newest durable snapshot",
                    node.snapshot_index)
        yield gauge("cypaxos_log_start", "The first slot still held in memory",
                    core.log_start)

        lag = GaugeMetricFamily("cypaxos_peer_lag_slots", "At the leader: how many slots "
                                "each peer's commit index is behind the leader's, as it "
                                "last reported", labels=["peer"])
        if core.role == "leader":
            commit = core.commit_index
            for peer in sorted(server.peer_links):
                lag.add_metric([str(peer)], max(0, commit - node.peer_commit.get(peer, 0)))
        yield lag
        connected = GaugeMetricFamily("cypaxos_peer_connected", "1 while this replica's "
                                      "link to the peer is up", labels=["peer"])
        links_lost = CounterMetricFamily("cypaxos_peer_links_lost", "Times the link to "
                                         "the peer was lost", labels=["peer"])
        for peer in sorted(server.peer_links):
            connected.add_metric([str(peer)], 1 if server.peer_connected.get(peer) else 0)
            links_lost.add_metric([str(peer)], server.peer_links_lost.get(peer, 0))
        yield connected
        yield links_lost

        yield counter("cypaxos_proposals", "Slots this replica proposed as leader",
                      core_stats["slots_proposed"])
        yield counter("cypaxos_slots_applied", "Slots applied to the state machine",
                      core_stats["slots_applied"])
        yield counter("cypaxos_elections", "Elections this replica started",
                      core_stats["elections"])
        yield counter("cypaxos_leader_changes", "Times this replica saw a new leader",
                      stats["leader_changes"])
        yield counter("cypaxos_reads", "Linearizable reads served", core_stats["reads_served"])
        yield counter("cypaxos_retransmits", "Slots the leader sent again to acceptors "
                      "that had not voted", core_stats["retransmits"])
        yield counter("cypaxos_catchup_requests", "Requests for chosen slots this replica "
                      "lacked", core_stats["catchup_requests"])
        yield counter("cypaxos_duplicate_commands", "Retried commands answered from the "
                      "session table, not applied again", core_stats["duplicates"])

        yield gauge("cypaxos_client_sessions", "Client sessions in the replicated session "
                    "table", core_stats["sessions"])
        yield gauge("cypaxos_client_sessions_max", "The session table's size "
                    "(--max-sessions): past it, registrations evict", server.max_sessions)
        sessions = CounterMetricFamily("cypaxos_session_events", "Session table events",
                                       labels=["event"])
        for event in ("registered", "evicted", "expired"):
            sessions.add_metric([event], core_stats[f"sessions_{event}"])
        yield sessions
        yield gauge("cypaxos_client_connections", "Client connections open",
                    server.client_connections)
        pending = GaugeMetricFamily("cypaxos_pending_requests", "Client requests waiting "
                                    "for the cluster", labels=["kind"])
        pending.add_metric(["submit"], len(node.pending_submits))
        pending.add_metric(["read"], len(node.pending_reads))
        yield pending

        fsync = HistogramMetricFamily("cypaxos_fsync_seconds", "How long each WAL fsync "
                                      "took")
        _histogram(fsync, storage.fsync_seconds)
        yield fsync
        started = storage.wal_sync.started_at
        yield gauge("cypaxos_fsync_in_flight_seconds", "How long the WAL fsync in flight "
                    "has been running (0: none)",
                    time.monotonic() - started if started else 0)
        batch = HistogramMetricFamily("cypaxos_batch_commands", "Client commands per slot "
                                      "this replica proposed as leader")
        _histogram(batch, node.batch_commands)
        yield batch
        wal = storage.wal
        yield gauge("cypaxos_wal_bytes", "Bytes of WAL segment files on disk "
                    "(preallocated)", _dir_bytes(wal.path))
        yield gauge("cypaxos_wal_bytes_since_snapshot", "WAL bytes written since the last "
                    "snapshot (one is taken at --snapshot-bytes)",
                    node.wal_bytes_since_snapshot)
        yield gauge("cypaxos_wal_unsynced_records", "WAL records written and not yet "
                    "durable", storage.last_seq - storage.durable_seq)
        yield counter("cypaxos_wal_prealloc_waits", "Segment rotations that waited for "
                      "the next segment's zero fill", wal.prealloc_waits)

        snapshot = HistogramMetricFamily("cypaxos_snapshot_seconds", "How long writing "
                                         "and syncing each snapshot file took")
        _histogram(snapshot, storage.snapshot_seconds)
        yield snapshot
        yield gauge("cypaxos_snapshot_bytes", "Size of the newest snapshot file written",
                    storage.snapshot_bytes)
        yield counter("cypaxos_snapshots_taken", "Snapshots of its own state this replica "
                      "took", stats["snapshots_taken"])
        transfers = CounterMetricFamily("cypaxos_snapshot_transfers", "Snapshot transfers "
                                        "that completed", labels=["direction"])
        transfers.add_metric(["sent"], stats["snapshots_sent"])
        transfers.add_metric(["installed"], stats["snapshots_installed"])
        yield transfers
        failed = CounterMetricFamily("cypaxos_snapshot_transfer_failures", "Snapshot "
                                     "transfers that failed", labels=["reason"])
        failed.add_metric(["send_failed"], stats["snapshot_sends_failed"])
        failed.add_metric(["refused_too_large"], stats["snapshots_refused"])
        failed.add_metric(["corrupt"], stats["snapshots_corrupt"])
        yield failed
        yield counter("cypaxos_snapshot_transfer_chunks", "Snapshot chunks sent",
                      stats["transfer_chunks"])

        dropped = CounterMetricFamily("cypaxos_dropped_connections", "Connections this "
                                      "replica closed on a peer or client", labels=["reason"])
        dropped.add_metric(["bad_frame"], stats["bad_frames"])
        dropped.add_metric(["no_hello"], stats["hello_timeouts"])
        dropped.add_metric(["slow_client"], stats["client_drops"])
        dropped.add_metric(["frame_timeout"], stats["client_frame_timeouts"])
        dropped.add_metric(["error"], stats["connection_errors"])
        dropped.add_metric(["connections_max"], stats["connections_refused"])
        yield dropped
        # Apart from the drops: closing idle connections is routine, not misbehaviour.
        yield counter("cypaxos_client_idle_closes", "Client connections closed after "
                      "--client-idle-timeout-s without a request", stats["client_idle_timeouts"])
        refused = CounterMetricFamily("cypaxos_client_requests_refused", "Client requests "
                                      "refused by a per-client bound", labels=["reason"])
        refused.add_metric(["read_too_large"], stats["reads_too_large"])
        refused.add_metric(["replies_unread"], stats["reads_busy"])
        refused.add_metric(["snapshot_rate"], stats["snapshot_requests_refused"])
        yield refused
        yield counter("cypaxos_peer_messages_dropped", "Messages to peers dropped because "
                      "the link's queue was full (the core resends what matters)",
                      stats["peer_drops"])
        auth = CounterMetricFamily("cypaxos_auth_failures", "Connections that failed "
                                   "authentication", labels=["kind"])
        for kind in ("peer", "client"):
            auth.add_metric([kind], server.auth_failures.get(kind, 0))
        yield auth


# ---------------------------------------------------------------------- HTTP


def _response(status: str, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\n\r\n").encode("ascii")
    return head if head_only else head + body


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """The request line and headers, or None if they exceed HTTP_REQUEST_BYTES_MAX."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > HTTP_REQUEST_BYTES_MAX:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


def answer(server: "ReplicaServer", registry, head: bytes | None) -> bytes:
    """The whole HTTP response to one request head (None: the head was too large)."""
    from prometheus_client import exposition

    if head is None:
        return _response("431 Request Header Fields Too Large", "text/plain",
                         b"request head too large\n", False)
    line = head.split(b"\n", 1)[0].decode("latin-1").strip().split()
    if len(line) != 3 or not line[2].startswith("HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request\n", False)
    method, target = line[0], line[1]
    path = target.split("?", 1)[0]
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET or HEAD only\n",
                         False)
    if path == "/metrics":
        return _response("200 OK", exposition.CONTENT_TYPE_LATEST,
                         exposition.generate_latest(registry), head_only)
    if path == "/healthz":
        healthy, reason = server.health()
        if healthy:
            return _response("200 OK", "text/plain", f"ok: {reason}\n".encode(), head_only)
        return _response("503 Service Unavailable", "text/plain", f"{reason}\n".encode(),
                         head_only)
    return _response("404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n",
                     head_only)


async def serve_metrics(server: "ReplicaServer", listeners: list[trio.SocketListener], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics and /healthz on `listeners` until cancelled."""
    from prometheus_client import CollectorRegistry

    # A registry of our own: no process-wide default metrics, and two servers in one
    # process (the tests) never share one.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaCollector(server))   # type: ignore[arg-type]
    limiter = trio.CapacityLimiter(HTTP_CONNECTIONS_MAX)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.move_on_after(HTTP_TIMEOUT_S):
                head = await _read_head(stream)
                await stream.send_all(answer(server, registry, head))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            limiter.release()
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
