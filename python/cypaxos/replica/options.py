"""How to run one replica: `ServerOptions`, the core's settings, the state machine.

Pure configuration: nothing here opens a socket or a file.
"""
from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass, field

from ..core import Config
from ..errors import ConfigError
from ..statemachine import KVStore, PyStateMachine
from ..wire import FRAME_BYTES_MAX
from . import limits

__all__ = ["ServerOptions", "default_cluster_id", "load_state_machine"]


def default_cluster_id(cluster: dict[int, str]) -> str:
    """A cluster id derived from the membership, so every replica computes the same one."""
    text = ",".join(f"{i}={cluster[i]}" for i in sorted(cluster))
    return "c-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def load_state_machine(spec: str | None):
    """`package.module:Class` -> a core state machine (the key-value store when None)."""
    if not spec:
        return KVStore()
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"--state-machine {spec!r} is not package.module:Class")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load state machine {spec!r}: {exc}") from None
    try:
        return PyStateMachine(cls())
    except TypeError as exc:
        raise ConfigError(f"state machine {spec!r}: {exc}") from None


@dataclass
class ServerOptions:
    """How to run one replica (the `cypaxos serve` flags)."""

    replica_id: int
    cluster: dict[int, str]
    data_dir: str
    cluster_id: str | None = None
    fsync: bool = True
    state_machine: str | None = None
    tick_ms: int = 10
    # `serve --listen` / `--advertise`, HOST:PORT: what to bind, and what peers and
    # redirected clients use to reach this replica.  None: its address in `cluster`.
    listen: str | None = None
    advertise: str | None = None
    # `serve --metrics-address HOST:PORT`: Prometheus /metrics and /healthz over
    # plain, unauthenticated HTTP (None: off).
    metrics_address: str | None = None
    follower_inline_fsync: bool = True  # see ReplicaNode.sync_inline
    frame_bytes_max: int = FRAME_BYTES_MAX
    # Disk stays near 3 x wal_segment_bytes (segments are preallocated, the next one
    # ahead) + snapshot_bytes + two snapshot files.
    snapshot_bytes: int = 16 << 20  # snapshot once this much WAL was written since the last
    snapshot_slots: int = 100_000  # ... or once this many slots were applied since
    retain_slots: int = 64  # slots kept in memory after a snapshot for lagging peers
    wal_segment_bytes: int = 8 << 20
    snapshot_receive_bytes_max: int = 1 << 34  # a snapshot transfer larger than this is refused
    # Leader leases (docs/cli.md, "Leases"): reads served by a leader without a quorum
    # round, trusting that no replica's clock runs more than clock_drift_ms faster or
    # slower than the leader's over one election timeout.
    read_lease: bool = False
    clock_drift_ms: int | None = None
    # Who may connect (docs/security.md).  TLS: all three paths.  Without TLS and
    # without a cluster secret the replica refuses to start unless `insecure`.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    cluster_secret_file: str | None = None
    token_file: str | None = None
    allow_anonymous_clients: bool = False
    insecure: bool = False
    # Client connections and connections still in their handshake, at most (peers
    # that authenticated are not counted).  None: CONNECTIONS_MAX, lowered to fit the
    # descriptor limit less what the WAL, snapshots and peers need.
    connections_max: int | None = None
    core: dict = field(default_factory=dict)  # overrides of cypaxos.core.Config
    # What one client may cost the replica (replica.limits has why each default is
    # what it is; docs/security.md "Limits").  `serve --client-idle-timeout-s` etc.
    client_idle_timeout_s: float = limits.IDLE_TIMEOUT_S
    frame_timeout_s: float = limits.FRAME_TIMEOUT_S
    reply_bytes_max: int = limits.REPLY_BYTES_MAX
    queries_per_read_max: int = limits.QUERIES_PER_READ_MAX
    client_buffer_bytes_max: int = limits.CLIENT_BUFFER_BYTES_MAX
    snapshot_requests_per_minute: int = limits.SNAPSHOT_REQUESTS_PER_MINUTE

    def client_limits(self) -> dict:
        """The node's share of the client bounds, as `NodeOptions` fields (ConfigError,
        one line, for a value that cannot work)."""
        if not 0 < self.reply_bytes_max <= limits.REPLY_BYTES_LIMIT:
            raise ConfigError(f"--reply-bytes-max {self.reply_bytes_max} is not in "
                              f"1..{limits.REPLY_BYTES_LIMIT} (a client could not read "
                              "larger replies)")
        for name in ("queries_per_read_max", "client_buffer_bytes_max",
                     "snapshot_requests_per_minute"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        for name in ("client_idle_timeout_s", "frame_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive "
                                  "number of seconds")
        return dict(queries_per_read_max=self.queries_per_read_max,
                    reply_bytes_max=self.reply_bytes_max,
                    backlog_bytes_max=self.client_buffer_bytes_max,
                    snapshot_requests_max=self.snapshot_requests_per_minute,
                    snapshot_window_ticks=max(1, round(60_000 / self.tick_ms)))

    def core_config(self) -> Config:
        """The core's settings: ~30 ms heartbeats and 250-500 ms election timeouts;
        with `read_lease`, a lease of the election timeout less the drift bound and
        one tick.

        Raises ConfigError (one line) for a lease whose drift bound leaves no lease.
        """
        ticks_per_s = 1000 / self.tick_ms
        settings = dict(heartbeat_ticks=max(1, math.ceil(0.03 * ticks_per_s)),
                        election_ticks=max(3, math.ceil(0.25 * ticks_per_s)),
                        resend_ticks=max(1, math.ceil(0.1 * ticks_per_s)),
                        window_slots=64, batch_bytes_max=1 << 20, pre_vote=True)
        settings.update(self.core)
        if self.read_lease:
            election_ticks = settings["election_ticks"]
            if self.clock_drift_ms is None:
                raise ConfigError("--read-lease needs an explicit --clock-drift-ms bound")
            drift_ticks = math.ceil(self.clock_drift_ms / self.tick_ms)
            # One tick less again: a follower counts the election timeout from the
            # tick it heard the leader in, which may have begun up to a tick earlier.
            lease_ticks = election_ticks - drift_ticks - 1
            if self.clock_drift_ms < 0 or lease_ticks < 1:
                raise ConfigError(
                    f"--clock-drift-ms {self.clock_drift_ms} leaves no lease: a lease plus "
                    f"the drift bound must fit the election timeout "
                    f"({election_ticks * self.tick_ms} ms)")
            settings.update(lease_ticks=lease_ticks, clock_drift_ticks=drift_ticks)
        try:
            return Config(**settings)
        except ValueError as exc:
            raise ConfigError(f"core settings: {exc}") from None
