"""The `cypaxos` command line (also `python -m cypaxos`): its parser and `main`.

The handlers live beside it: `server_commands` (serve, local, demo),
`client_commands` (put, get, delete, cas, submit, query, status, snapshot), `bench`
and `cypaxos.security.certs`.  `exits` has the exit statuses; `main` maps every
expected failure to one of them and one line on stderr, never a traceback.  `config`
reads ``serve --config FILE`` off the serve parser built here.

Help texts stand alone: a user who installed a wheel has no repository to look in.
"""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__, logs
from ..ballots import REPLICA_ID_MAX
from ..errors import ClientError, CommandError, ConfigError, Error, RequestError
from ..groups import expected_error
from ..security import certs
from . import bench, config
from . import client_commands as client
from . import server_commands as server
from . import store_commands
from .argtypes import PORT_MAX, int_in, name_in, positive_float
from .client_commands import CLUSTER_ENV, DEFAULT_CLUSTER
from .exits import (EXIT_INTERRUPTED, EXIT_NO, EXIT_REFUSED, EXIT_STATUS_SUMMARY,
                    EXIT_UNAVAILABLE, EXIT_USAGE, PROG, Negative, error, say)

__all__ = ["main", "build_parser", "DEFAULT_CLUSTER", "CLUSTER_ENV"]

DEFAULT_TIMEOUT = 5.0
DEFAULT_PORT = 7001


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (plus a hint), never the whole usage."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _add_log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", type=name_in(logs.LEVELS), default=None, metavar="LEVEL",
                   help=f"{', '.join(logs.LEVELS)}, in any case (default: "
                        f"${logs.LEVEL_ENV}, else info)")
    p.add_argument("--log-format", type=name_in(logs.FORMATS), default=None,
                   metavar="FORMAT",
                   help="text, or json: one JSON object per line with time, level, "
                        f"logger, message and the event's own fields (default: "
                        f"${logs.FORMAT_ENV}, else text)")


def _add_client_limit_options(p: argparse.ArgumentParser) -> None:
    """serve: what one client may cost the replica (cypaxos.replica.limits)."""
    from ..replica import limits

    p.add_argument("--client-idle-timeout-s", type=positive_float,
                   default=limits.IDLE_TIMEOUT_S, metavar="S",
                   help="close a client connection with no request in flight on which "
                        "nothing arrived and no reply went out for this long; the client "
                        f"reconnects at its next call (default: {limits.IDLE_TIMEOUT_S:g})")
    p.add_argument("--frame-timeout-s", type=positive_float,
                   default=limits.FRAME_TIMEOUT_S, metavar="S",
                   help="close a client connection whose request frame, once begun, is "
                        f"not complete within this (default: {limits.FRAME_TIMEOUT_S:g})")
    p.add_argument("--reply-bytes-max", type=int_in(1, limits.REPLY_BYTES_LIMIT),
                   default=limits.REPLY_BYTES_MAX, metavar="B",
                   help="refuse (too_large) a read whose results add up to more than "
                        "this; the client asks again in halves (default: 16 MiB)")
    p.add_argument("--queries-per-read-max", type=int_in(1, 1 << 24),
                   default=limits.QUERIES_PER_READ_MAX, metavar="N",
                   help="refuse (too_large) a read request of more queries than this "
                        f"(default: {limits.QUERIES_PER_READ_MAX})")
    p.add_argument("--client-buffer-bytes-max", type=int_in(1 << 16, 1 << 40),
                   default=limits.CLIENT_BUFFER_BYTES_MAX, metavar="B",
                   help="reply bytes queued for one client and not yet sent: past this "
                        "its reads are answered busy, and past it by more than one "
                        "reply it is cut off (default: 32 MiB)")
    p.add_argument("--snapshot-requests-per-minute", type=int_in(1, 1 << 20),
                   default=limits.SNAPSHOT_REQUESTS_PER_MINUTE, metavar="N",
                   help="snapshot requests this replica accepts per minute, from all "
                        "clients; more are answered busy "
                        f"(default: {limits.SNAPSHOT_REQUESTS_PER_MINUTE})")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the whole command line."""
    parser = _Parser(prog=PROG,
                     description="cypaxos: a Multi-Paxos replicated state machine engine.",
                     epilog=EXIT_STATUS_SUMMARY)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # serve
    serve = p = sub.add_parser(
        "serve", help="run one replica in the foreground",
        description="Run one replica until SIGTERM or Ctrl-C.  An existing --data-dir is "
                    "recovered from.  Every option can also come from a --config file.",
        epilog=EXIT_STATUS_SUMMARY)
    p.add_argument("--id", type=int_in(1, REPLICA_ID_MAX), required=True, metavar="N",
                   help="this replica's id (a key of --cluster)")
    p.add_argument("--cluster", required=True, metavar="ID=HOST:PORT,...",
                   help="every replica of the cluster, this one included; the same on "
                        "every replica")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="this replica's write-ahead log, snapshots and identity")
    p.add_argument("--cluster-id", metavar="NAME",
                   help="name of the cluster (default: derived from --cluster)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="the address to bind, e.g. 0.0.0.0:7001 (default: this replica's "
                        "address in --cluster)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address peers and redirected clients use to reach this "
                        "replica (default: its address in --cluster)")
    p.add_argument("--fsync", choices=("always", "off"), default="always",
                   help="always: nothing is acknowledged before it is on disk; off: "
                        "faster, but a machine crash may lose acknowledged writes "
                        "(default: always)")
    p.add_argument("--state-machine", metavar="PKG.MOD:CLASS",
                   help="an importable class with apply, query, snapshot and restore "
                        "(default: the built-in key-value store)")
    p.add_argument("--tick-ms", type=int_in(1, 10_000), default=10, metavar="MS",
                   help="milliseconds per logical tick; heartbeats and election timeouts "
                        "scale with it (default: 10)")
    p.add_argument("--snapshot-bytes", type=int_in(1, 1 << 40), default=16 << 20, metavar="B",
                   help="snapshot after this many bytes of log (default: 16 MiB)")
    p.add_argument("--snapshot-slots", type=int_in(1, 1 << 40), default=100_000, metavar="N",
                   help="... or after this many applied slots (default: 100000)")
    p.add_argument("--retain-slots", type=int_in(0, 1 << 30), default=64, metavar="N",
                   help="slots kept in memory after a snapshot for lagging peers (default: 64)")
    p.add_argument("--wal-segment-bytes", type=int_in(1 << 12, 1 << 32), default=8 << 20,
                   metavar="B", help="size of one log segment file, zero-filled when "
                                     "created (default: 8 MiB)")
    p.add_argument("--snapshot-receive-bytes-max", type=int_in(1 << 10, 1 << 50),
                   default=1 << 34, metavar="B",
                   help="refuse a snapshot transfer from a peer larger than this "
                        "(default: 16 GiB)")
    p.add_argument("--read-lease", action="store_true",
                   help="serve linearizable reads at the leader under a lease, without a "
                        "quorum round; the lease is the election timeout less "
                        "--clock-drift-ms and one tick, and trusts that bound")
    p.add_argument("--clock-drift-ms", type=int_in(0, 1 << 20), metavar="MS",
                   help="with --read-lease: how far any replica's clock may run ahead of "
                        "or behind the leader's over one election timeout (250 ms)")
    p.add_argument("--max-sessions", type=int_in(1, 1 << 31), default=100_000, metavar="N",
                   help="client sessions the replicated session table keeps; past it a "
                        "new client's registration evicts the least recently used one "
                        "(default: 100000; must be the same on every replica)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics and a health "
                        "check at /healthz; plain HTTP without authentication, so bind "
                        "loopback or a private interface (default: off)")
    trust = p.add_argument_group(
        "who may connect", "Peers must authenticate by TLS or a cluster secret (or both); "
        "without either, serve refuses to start unless --insecure.")
    trust.add_argument("--tls-ca", metavar="FILE",
                       help="mutual TLS 1.3 for every connection: the CA that signed every "
                            "replica's and client's certificate (cypaxos certs writes it)")
    trust.add_argument("--tls-cert", metavar="FILE",
                       help="with --tls-ca: this replica's certificate (it must name --id)")
    trust.add_argument("--tls-key", metavar="FILE",
                       help="with --tls-ca: this replica's private key (mode 0600)")
    trust.add_argument("--cluster-secret-file", metavar="FILE",
                       help="peers prove they know the secret in FILE (the same file on every "
                            "replica; the first line is used, every line is accepted)")
    trust.add_argument("--token-file", metavar="FILE",
                       help="clients may authenticate with any token in FILE")
    trust.add_argument("--allow-anonymous-clients", action="store_true",
                       help="accept clients that present no certificate and no token")
    trust.add_argument("--insecure", action="store_true",
                       help="run with neither TLS nor a cluster secret: any process that "
                            "reaches the port can act as a peer (a test network only)")
    trust.add_argument("--connections-max", type=int_in(1, 1 << 20), metavar="N",
                       help="client connections plus connections still in their handshake "
                            "(default: 1024, lowered to fit ulimit -n)")
    _add_client_limit_options(p)
    _add_log_options(p)
    p.set_defaults(handler=server.cmd_serve)

    # local
    p = sub.add_parser(
        "local", help="run a whole cluster on this host, in the foreground",
        description="Start REPLICAS replicas on 127.0.0.1, ports PORT, PORT+1, ...; stop "
                    "them all on Ctrl-C or SIGTERM.  Replica N keeps its data in "
                    "DIR/replicaN and its log in DIR/replicaN.log.",
        epilog=EXIT_STATUS_SUMMARY)
    p.add_argument("--replicas", type=int_in(1, server.REPLICAS_MAX), default=3, metavar="N",
                   help="number of replicas (default: 3)")
    p.add_argument("--port", type=int_in(1, PORT_MAX), default=DEFAULT_PORT,
                   help=f"port of replica 1; replica N gets PORT+N-1 (default: {DEFAULT_PORT})")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep data and logs here, recover from it next time "
                        "(default: a temporary dir, removed on exit)")
    p.add_argument("--fsync", choices=("always", "off"), default="always",
                   help="passed to every replica (default: always)")
    p.add_argument("--state-machine", metavar="PKG.MOD:CLASS",
                   help="run this state machine class in every replica (importable here "
                        "and by the replicas, e.g. on PYTHONPATH; default: the built-in "
                        "key-value store)")
    p.add_argument("--tls", action="store_true",
                   help="run the replicas under mutual TLS: a new CA and certificates go "
                        "to DIR/tls (kept with --data-dir), and clients need ca.pem, "
                        "client.pem and client.key from there (printed as the "
                        "CYPAXOS_TLS_* variables to set)")
    _add_log_options(p)
    p.set_defaults(handler=server.cmd_local)

    # demo
    p = sub.add_parser(
        "demo", help="a 3-replica cluster under load, a leader crash, a check",
        description="Start a local 3-replica cluster on 127.0.0.1, run a write/read "
                    "workload, SIGKILL the leader a third of the way in, restart it, "
                    "and check every read and that every replica ends with the same "
                    "state.  Exit 0 only if every check passed.")
    p.add_argument("--duration", type=positive_float, default=15.0, metavar="S",
                   help="seconds of workload (default: 15)")
    p.add_argument("--port", type=int_in(1, PORT_MAX), default=None,
                   help="replica N listens on 127.0.0.1 port PORT+N-1 (default: free ports)")
    p.add_argument("--tls", action="store_true",
                   help="run the cluster under mutual TLS (certificates made for the "
                        "run), with the workload's client and the status probes on TLS")
    p.set_defaults(handler=server.cmd_demo)

    # client commands
    def client_parser(name, help_text, description=""):
        q = sub.add_parser(name, help=help_text,
                           description=help_text[0].upper() + help_text[1:] + "."
                           + (" " + description if description else ""),
                           epilog=EXIT_STATUS_SUMMARY)
        q.add_argument("--cluster", metavar="ADDRS",
                       default=os.environ.get(CLUSTER_ENV) or DEFAULT_CLUSTER,
                       help=f"comma-separated HOST:PORT of any replicas (default: "
                            f"${CLUSTER_ENV}, else {DEFAULT_CLUSTER})")
        q.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                       metavar="S", help=f"give up after S seconds (default: {DEFAULT_TIMEOUT:g})")
        client.add_security_arguments(q)
        return q

    p = client_parser("put", "set KEY to VALUE")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p.set_defaults(handler=client.cmd_put)

    p = client_parser("get", "print KEY's value (linearizable unless --stale)",
                      "The value's raw bytes go to stdout (a newline is added only on "
                      "a terminal); a missing key prints (not found) and exits 1.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--stale", action="store_true",
                   help="read from any one replica, maybe behind (no quorum round)")
    p.set_defaults(handler=client.cmd_get)

    p = client_parser("delete", "remove KEY")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(handler=client.cmd_delete)

    p = client_parser("cas", "set KEY to NEW only if its value is EXPECTED (atomically)")
    p.add_argument("--absent", action="store_true",
                   help="expect KEY to be absent instead of giving EXPECTED: cas --absent KEY NEW")
    p.add_argument("key", metavar="KEY")
    p.add_argument("expected", metavar="EXPECTED", nargs="?")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(handler=client.cmd_cas)

    raw_input_help = ("hex digits (spaces allowed), @FILE for a file's bytes, or @- for "
                      "stdin")
    p = client_parser("submit", "replicate a raw command for a custom state machine",
                      "Prints the state machine's result in hex (or raw with --raw).  If "
                      "the state machine raised, its message is printed and the exit "
                      "status is 4: the command was applied as a failed command.")
    p.add_argument("command_bytes", metavar="HEX|@FILE", help="the command: " + raw_input_help)
    p.add_argument("--raw", action="store_true",
                   help="write the result's raw bytes instead of hex")
    p.set_defaults(handler=client.cmd_submit)

    p = client_parser("query", "ask a custom state machine a read-only query "
                               "(linearizable unless --stale)",
                      "Prints the answer in hex (or raw with --raw); exit status 4 if "
                      "the state machine raised.")
    p.add_argument("query_bytes", metavar="HEX|@FILE", help="the query: " + raw_input_help)
    p.add_argument("--stale", action="store_true",
                   help="answer from any one replica, maybe behind (no quorum round)")
    p.add_argument("--raw", action="store_true",
                   help="write the answer's raw bytes instead of hex")
    p.set_defaults(handler=client.cmd_query)

    p = client_parser("status", "show every replica's role and progress",
                      "Each replica is asked on its own connection, so it works without "
                      "a leader.  Exit 0 if any replica answered, else 3.")
    p.add_argument("--json", action="store_true",
                   help='print {"replicas": [...]} as JSON instead of a table')
    p.add_argument("--wide", action="store_true",
                   help="every field each replica reports, at full length (the default "
                        "table fits 80 columns); with --json, every field too")
    p.set_defaults(handler=client.cmd_status)

    p = client_parser("snapshot", "ask every replica to take a snapshot now")
    p.set_defaults(handler=client.cmd_snapshot)

    p = client_parser("backup", "write a consistent copy of the cluster's state to FILE",
                      "The leader snapshots its state at a linearizable point (every "
                      "write acknowledged before the backup started is in it) and "
                      "streams the snapshot file; it is checked (CRC32C) as it arrives "
                      "and written to a temporary file, synced and renamed to FILE "
                      "(replacing it).  --timeout bounds each step, not the whole "
                      "transfer.  Restore it with cypaxos restore.")
    p.add_argument("file", metavar="FILE", help="where to write the backup")
    p.set_defaults(handler=client.cmd_backup)

    store_commands.add_parsers(client_parser)   # range, txn

    p = sub.add_parser(
        "restore", help="seed a new replica's data dir from a backup file",
        description="Check FILE (written by cypaxos backup) and seed the empty data dir "
                    "of replica ID of a new cluster from it.  Restore every replica of "
                    "the new cluster from the same file, then start them with cypaxos "
                    "serve and the same --id, --cluster and --data-dir.  A corrupt file "
                    "or a data dir that is not empty is refused, and nothing is written.",
        epilog=EXIT_STATUS_SUMMARY)
    p.add_argument("file", metavar="FILE", help="the backup file")
    p.add_argument("--id", type=int_in(1, REPLICA_ID_MAX), required=True, metavar="N",
                   help="the id of the replica this data dir is for (a key of --cluster)")
    p.add_argument("--cluster", required=True, metavar="ID=HOST:PORT,...",
                   help="every replica of the new cluster, as serve will be given it")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="the data dir to seed: missing or empty")
    p.add_argument("--cluster-id", metavar="NAME",
                   help="the new cluster's name, as serve will be given it (default: "
                        "derived from --cluster)")
    p.add_argument("--state-machine", metavar="PKG.MOD:CLASS",
                   help="the state machine the cluster runs, to check that the backup "
                        "restores into it (default: the built-in key-value store)")
    p.set_defaults(handler=server.cmd_restore)

    p = sub.add_parser("bench", help="measure throughput and latency (a local cluster by default)",
                       description="Load a cluster from client worker processes, closed "
                                   "loop (or open loop with --rate), and report "
                                   "throughput and latency percentiles of writes and "
                                   "linearizable reads.  Without --cluster it starts its "
                                   "own 3-replica cluster on 127.0.0.1 (fsync always) and "
                                   "removes it afterwards.",
                       epilog=EXIT_STATUS_SUMMARY)
    bench.add_arguments(p)
    p.set_defaults(handler=bench.run)

    p = sub.add_parser("certs", help="write a CA and TLS certificates for a cluster")
    certs.add_arguments(p)
    p.set_defaults(handler=certs.main)

    # Last: every serve option (whoever added it) is then a key of its config file.
    config.enable(serve)
    return parser


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    try:
        args = config.resolve(parser, args, argv)  # serve --config; exits 2 if required missing
        return args.handler(args)
    except BaseException as raised:
        return _exit_status(expected_error(raised, (Error, KeyboardInterrupt)), args)


def _exit_status(exc: BaseException, args) -> int:
    """The exit status of an exception that left a handler (re-raised if unexpected)."""
    if isinstance(exc, Negative):
        say(str(exc))
        return EXIT_NO
    if isinstance(exc, ConfigError):
        error(exc)
        return EXIT_USAGE
    if isinstance(exc, CommandError):
        error(f"the state machine refused the command: {exc}")
        return EXIT_REFUSED
    if isinstance(exc, RequestError):
        error(exc)
        return EXIT_REFUSED
    if isinstance(exc, ClientError):
        message = str(exc) or type(exc).__name__
        if exc.maybe_applied and "applied" not in message and args.command in (
                "put", "delete", "cas", "submit", "txn"):
            message += " (the command may have been applied)"
        error(message)
        return EXIT_UNAVAILABLE
    if isinstance(exc, Error):
        error(exc)
        return EXIT_NO
    if isinstance(exc, KeyboardInterrupt):
        say(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        # `cypaxos get ... | head -c1`: the reader left; not worth a message.  Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_NO
    raise exc  # a bug: the traceback is what a report needs


if __name__ == "__main__":  # pragma: no cover - `python -m cypaxos` uses __main__.py
    sys.exit(main())
