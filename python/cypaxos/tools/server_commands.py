"""The `cypaxos` commands that run replicas: serve (one), local (a cluster on this
host) and demo.

Each handler takes the parsed arguments and returns the exit status; bad values
raise `cypaxos.errors.ConfigError` (exit 2, from `cli.main`).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time

from .. import logs
from ..addresses import normalize_address, parse_cluster
from ..errors import ConfigError, Error
from ..groups import expected_error
from .argtypes import check_port_range
from .client_commands import CLUSTER_ENV
from .exits import EXIT_NO, EXIT_OK, PROG, error, one_line, say

__all__ = ["REPLICAS_MAX", "serve_options", "cmd_serve", "cmd_local", "cmd_demo", "cmd_restore",
           "log_arguments"]

LOCAL_READY_TIMEOUT_S = 30.0
REPLICAS_MAX = 63
"""The most replicas a cluster may have (the core's ballot layout refuses more)."""


def _check_state_machine(spec: str | None) -> None:
    if spec is not None:
        module, sep, cls = spec.partition(":")
        if not sep or not module or not cls:
            raise ConfigError(f"--state-machine {spec!r} is not PKG.MOD:CLASS")


def _replica_cluster(args) -> dict[int, str]:
    """`--cluster` of serve and restore, checked with `--id`, `--state-machine` and
    `--cluster-id`; ConfigError."""
    cluster = parse_cluster(args.cluster)
    if len(cluster) > REPLICAS_MAX:
        raise ConfigError(f"--cluster names {len(cluster)} replicas; a cluster has at most "
                          f"{REPLICAS_MAX}")
    if args.id not in cluster:
        raise ConfigError(f"--id {args.id} is not in --cluster "
                          f"(which has {', '.join(map(str, sorted(cluster)))})")
    _check_state_machine(args.state_machine)
    if args.cluster_id is not None and not args.cluster_id.strip():
        raise ConfigError("--cluster-id is empty")
    return cluster


def serve_options(args):
    """The `ServerOptions` of a parsed ``cypaxos serve`` command line; ConfigError."""
    from ..replica.options import ServerOptions
    from ..replica.trust import check_flags

    cluster = _replica_cluster(args)
    if args.clock_drift_ms is not None and not args.read_lease:
        raise ConfigError("--clock-drift-ms is only for --read-lease")
    options = ServerOptions(
        replica_id=args.id,
        cluster=cluster,
        data_dir=args.data_dir,
        cluster_id=args.cluster_id,
        fsync=args.fsync == "always",
        state_machine=args.state_machine,
        tick_ms=args.tick_ms,
        snapshot_bytes=args.snapshot_bytes,
        snapshot_slots=args.snapshot_slots,
        retain_slots=args.retain_slots,
        wal_segment_bytes=args.wal_segment_bytes,
        core={"max_sessions": args.max_sessions},
        listen=_address(args.listen, "--listen"),
        advertise=_address(args.advertise, "--advertise"),
        snapshot_receive_bytes_max=args.snapshot_receive_bytes_max,
        metrics_address=_address(args.metrics_address, "--metrics-address"),
        read_lease=args.read_lease,
        clock_drift_ms=args.clock_drift_ms,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cluster_secret_file=args.cluster_secret_file,
        token_file=args.token_file,
        allow_anonymous_clients=args.allow_anonymous_clients,
        insecure=args.insecure,
        connections_max=args.connections_max,
        **client_limit_options(args),
    )
    options.core_config()   # a lease that does not fit the election timeout: ConfigError
    options.client_limits()
    check_flags(options)    # no way to authenticate peers: ConfigError
    return options


def client_limit_options(args) -> dict:
    """The `ServerOptions` fields of serve's client bounds (--client-idle-timeout-s...)."""
    return dict(client_idle_timeout_s=args.client_idle_timeout_s,
                frame_timeout_s=args.frame_timeout_s,
                reply_bytes_max=args.reply_bytes_max,
                queries_per_read_max=args.queries_per_read_max,
                client_buffer_bytes_max=args.client_buffer_bytes_max,
                snapshot_requests_per_minute=args.snapshot_requests_per_minute)


def _address(value: str | None, flag: str) -> str | None:
    return None if value is None else normalize_address(value, source=flag)


def log_arguments(args) -> list[str]:
    """``--log-level``/``--log-format`` as given, to pass on to replicas."""
    out = []
    if args.log_level is not None:
        out += ["--log-level", args.log_level]
    if args.log_format is not None:
        out += ["--log-format", args.log_format]
    return out


# ---------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    """`cypaxos serve`: run one replica until SIGTERM or Ctrl-C."""
    from ..replica.server import run_server

    options = serve_options(args)  # ConfigError -> exit 2
    logs.configure(args.log_level, args.log_format)  # a bad CYPAXOS_LOG_* -> exit 2
    if not _die_with_parent():
        return EXIT_NO
    try:
        return run_server(options)
    except BaseException as raised:
        exc = expected_error(raised, (Error, KeyboardInterrupt))
        if isinstance(exc, Error):
            # Past argument checking, even a ConfigError (say, "cannot listen on ...:
            # address in use") is a failure to run, not bad usage.
            _serve_failed(exc)
            return EXIT_NO
        if isinstance(exc, KeyboardInterrupt):  # before the server's own handler was in place
            return EXIT_OK
        if isinstance(exc, OSError) and exc is raised:
            # e.g. a data dir on a read-only or full filesystem
            _serve_failed(f"replica {args.id}: {exc}")
            return EXIT_NO
        raise


def _serve_failed(message) -> None:
    """The one line a failed replica leaves: a log record when the log is JSON (so
    every line of its stderr is one), else ``cypaxos: error: ...``."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers):
        logging.getLogger("cypaxos.cli").critical(one_line(message),
                                                  extra={"exit_status": EXIT_NO})
    else:
        error(message)


def _die_with_parent() -> bool:
    """When started by LocalCluster, ask the kernel to SIGTERM us when it dies.

    Returns False if that parent is already gone (then we must not start at all).
    Linux only; elsewhere LocalCluster's close() and atexit hook are the safety net.
    """
    from .local import PARENT_PID_ENV

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return True
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError, ValueError):
        return True
    # The parent may have died before prctl: then we were re-parented already.
    return str(os.getppid()) == parent


# ---------------------------------------------------------------------- local


class _Stop(BaseException):
    """Raised by `local`'s signal handler to leave the foreground wait."""


def cmd_local(args) -> int:
    """`cypaxos local`: a whole cluster on this host, in the foreground."""
    from .local import LocalCluster, LocalClusterError

    check_port_range(args.port, args.replicas)
    extra = log_arguments(args)
    if args.state_machine is not None:
        _check_state_machine(args.state_machine)
        # Loaded here first, so a typo is one line now rather than every replica's
        # exit later.
        from ..replica.options import load_state_machine
        load_state_machine(args.state_machine)
        extra += ["--state-machine", args.state_machine]
    logs.configure(args.log_level, args.log_format)  # checks CYPAXOS_LOG_* too
    cluster = LocalCluster(replicas=args.replicas, base_port=args.port,
                           data_dir=args.data_dir, fsync=args.fsync == "always",
                           extra_args=extra, tls=args.tls)
    state = {"interruptible": False, "signalled": None}

    def on_signal(signum, frame):
        state["signalled"] = signum
        if state["interruptible"]:
            raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            # Not interruptible while processes are being spawned: a _Stop between
            # fork and bookkeeping would orphan a replica.  A signal is acted on
            # right after.
            cluster.start_all()
            if state["signalled"] is not None:
                raise _Stop(state["signalled"])
            state["interruptible"] = True
            leader = cluster.wait_ready(timeout=LOCAL_READY_TIMEOUT_S)
            _print_local_banner(cluster, leader, args.data_dir is None)
            reported: set[int] = set()
            while True:
                time.sleep(0.5)
                exited = cluster.unexpected_exits()
                for replica_id, code in sorted(exited.items()):
                    if replica_id in reported:
                        continue
                    reported.add(replica_id)
                    tail = cluster.log_tail(replica_id, 1)
                    say(f"{PROG} local: replica {replica_id} exited with status {code}"
                        + (f": {tail}" if tail else "")
                        + f" (log: {cluster.log_path(replica_id)})")
                if len(exited) == len(cluster.ids):
                    say(f"{PROG} local: every replica has exited")
                    return EXIT_NO
        except _Stop as stop:
            signum = stop.args[0]
            say(f"{PROG} local: {signal.Signals(signum).name}, stopping {len(cluster.ids)} "
                "replicas")
            return EXIT_OK
        except LocalClusterError as exc:
            error(exc)
            return EXIT_NO
    finally:
        # Let the shutdown finish: further Ctrl-Cs are ignored while replicas stop
        # (each has a bounded wait, then SIGKILL).
        state["interruptible"] = False
        _close_cluster_quietly(cluster)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _close_cluster_quietly(cluster) -> None:
    codes_before = cluster.unexpected_exits()
    cluster.close()
    unclean = {i: c for i, c in cluster.exit_codes().items()
               if c != 0 and i not in codes_before}
    for replica_id, code in sorted(unclean.items()):
        if code == -signal.SIGKILL:
            say(f"{PROG} local: replica {replica_id} did not stop in time and was killed")


def _print_local_banner(cluster, leader: int, temporary: bool) -> None:
    lines = [f"cypaxos local: {len(cluster.ids)} replicas running, "
             f"replica {leader} leads"]
    for replica_id in cluster.ids:
        lines.append(f"  replica {replica_id}  {cluster.address(replica_id):<21}  "
                     f"log {cluster.log_path(replica_id)}")
    lines.append(f"data dir: {cluster.data_dir}"
                 + ("  (temporary: removed on exit)" if temporary else ""))
    lines.append(f"cluster:  --cluster {cluster.cluster_arg}")
    lines.append(f"          export {CLUSTER_ENV}={cluster.cluster_arg}")
    if cluster.tls:
        env = cluster.client_env()
        tls_env = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items()
                           if name != CLUSTER_ENV)
        lines.append(f"tls:      mutual TLS; certificates in {cluster.tls_dir}, clients "
                     f"use ca.pem, client.pem and client.key:")
        lines.append(f"          export {tls_env}")
        lines.append(f"          e.g. {tls_env} {PROG} put --cluster {cluster.cluster_arg} "
                     f"greeting hello")
    lines.append("Press Ctrl-C to stop every replica.")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    """`cypaxos demo`."""
    from .demo import REPLICAS, run_demo

    if args.port is not None:
        check_port_range(args.port, REPLICAS)
    return run_demo(duration=args.duration, port=args.port, tls=args.tls)


# -------------------------------------------------------------------- restore


def cmd_restore(args) -> int:
    """`cypaxos restore FILE --id N --cluster SPEC --data-dir DIR`."""
    from ..replica.options import default_cluster_id, load_state_machine
    from ..storage.restore import restore_backup

    cluster = _replica_cluster(args)
    cluster_id = args.cluster_id or default_cluster_id(cluster)
    state_machine = load_state_machine(args.state_machine)   # a bad class: exit 2 first

    def validate(state: bytes) -> None:
        try:
            state_machine.restore(state)
        except Exception as exc:
            if args.state_machine is None:
                raise ValueError(f"{exc} (the built-in key-value store's; for a custom "
                                 "state machine, pass --state-machine)") from None
            raise
    restored = restore_backup(args.file, args.data_dir, cluster_id=cluster_id,
                              replica_id=args.id, validate_state=validate)
    print(f"restored replica {args.id} of cluster {cluster_id} into {restored.data_dir} "
          f"from {args.file}: the state at slot {restored.index:,} of cluster "
          f"{restored.source_cluster_id} ({restored.state_bytes:,} bytes of state)", flush=True)
    print(f"restore every replica of --cluster from this file, then start each with: "
          f"{PROG} serve --id N --cluster {args.cluster} --data-dir DIR"
          + (f" --cluster-id {args.cluster_id}" if args.cluster_id else ""), flush=True)
    return EXIT_OK
