"""The `cypaxos` command line (also `python -m cypaxos`); see docs/cli.md.

Exit codes, shared by every subcommand:

* 0 - done;
* 1 - the command ran but the answer is "no" (get/delete: no such key; cas: the
  value was not the expected one; snapshot: not every replica took one) or it failed
  (serve: a foreign data dir, a corrupt WAL, a port in use; local: a replica did not
  start; demo: a check failed);
* 2 - bad command line (argparse errors, a bad --cluster, other bad values);
* 3 - the cluster could not answer (unreachable, no leader, timed out, refused);
* 130 - interrupted (Ctrl-C), except `local` and `serve`, whose normal way to end
  is a signal (they exit 0).

Expected failures print one line, ``cypaxos: error: ...``, on stderr; never a
traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .. import __version__, errors
from ..addresses import parse_addresses, parse_cluster
from ..ballots import REPLICA_ID_MAX, format_ballot
from ..errors import ClientError, ConfigError, Error
from ..groups import expected_error
from . import bench
from .argtypes import int_in, positive_float
from ..security import certs

__all__ = ["main", "build_parser", "DEFAULT_CLUSTER", "CLUSTER_ENV"]

PROG = "cypaxos"
CLUSTER_ENV = "CYPAXOS_CLUSTER"
"""Environment variable giving the default ``--cluster`` of client commands."""
DEFAULT_CLUSTER = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
"""The default ``--cluster`` when CYPAXOS_CLUSTER is unset: `cypaxos local`'s."""
DEFAULT_TIMEOUT = 5.0

EXIT_OK = 0
EXIT_NO = 1  # a negative answer, or a failure of serve/local/demo
EXIT_USAGE = 2  # what argparse uses too
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class _Negative(Exception):
    """A command's answer is "no": print `message` on stderr, exit 1."""


# ---------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (plus a hint), never the whole usage."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _cluster_addresses(args) -> list[str]:
    """The client commands' ``--cluster`` (``ID=`` prefixes allowed); ConfigError."""
    return parse_addresses(args.cluster, source="--cluster")


def _arg_bytes(text: str) -> bytes:
    # os.fsencode undoes the surrogateescape decoding of argv, so any bytes given on
    # the command line reach the cluster unchanged (UTF-8 text stays UTF-8).
    return os.fsencode(text)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the whole command line."""
    parser = _Parser(
        prog=PROG,
        description="cypaxos: a Multi-Paxos replicated state machine engine.",
        epilog="Exit codes: 0 ok, 1 negative answer or failure, 2 bad usage, "
               "3 cluster unavailable.  See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # serve
    p = sub.add_parser("serve", help="run one replica in the foreground",
                       description="Run one replica until SIGTERM or Ctrl-C.  An existing "
                                   "--data-dir is recovered from.")
    p.add_argument("--id", type=int_in(1, REPLICA_ID_MAX), required=True,
                   help="this replica's id (a key of --cluster)")
    p.add_argument("--cluster", required=True, metavar="ID=HOST:PORT,...",
                   help="every replica of the cluster, this one included")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="this replica's write-ahead log, snapshots and identity")
    p.add_argument("--cluster-id", metavar="NAME",
                   help="name of the cluster (default: derived from --cluster)")
    p.add_argument("--fsync", choices=("always", "off"), default="always",
                   help="fsync the log before acknowledging (default: always)")
    p.add_argument("--state-machine", metavar="PKG.MOD:CLASS",
                   help="a custom state machine class (default: the built-in key-value store)")
    p.add_argument("--tick-ms", type=int_in(1, 10_000), default=10, metavar="MS",
                   help="milliseconds per logical tick (default: 10)")
    p.add_argument("--snapshot-bytes", type=int_in(1, 1 << 40), default=16 << 20, metavar="B",
                   help="snapshot after this many bytes of log (default: 16 MiB)")
    p.add_argument("--snapshot-slots", type=int_in(1, 1 << 40), default=100_000, metavar="N",
                   help="... or after this many applied slots (default: 100000)")
    p.add_argument("--retain-slots", type=int_in(0, 1 << 30), default=64, metavar="N",
                   help="slots kept in memory after a snapshot for lagging peers (default: 64)")
    p.add_argument("--wal-segment-bytes", type=int_in(1 << 12, 1 << 32), default=8 << 20,
                   metavar="B", help="size of one log segment file, zero-filled when "
                                     "created (default: 8 MiB)")
    p.set_defaults(handler=_cmd_serve)

    # local
    p = sub.add_parser("local", help="run a whole cluster on this host, in the foreground",
                       description="Start REPLICAS replicas on 127.0.0.1, ports PORT, "
                                   "PORT+1, ...; stop them all on Ctrl-C or SIGTERM.")
    p.add_argument("--replicas", type=int_in(1, 99), default=3, metavar="N",
                   help="number of replicas (default: 3)")
    p.add_argument("--port", type=int_in(1, 65535), default=7001,
                   help="port of replica 1; replica N gets PORT+N-1 (default: 7001)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep data and logs here, recover from it next time "
                        "(default: a temporary dir, removed on exit)")
    p.add_argument("--fsync", choices=("always", "off"), default="always",
                   help="passed to every replica (default: always)")
    p.set_defaults(handler=_cmd_local)

    # demo
    p = sub.add_parser("demo", help="a 3-replica cluster under load, a leader crash, a check",
                       description="Start a local 3-replica cluster, run a write/read "
                                   "workload, SIGKILL the leader a third of the way in, "
                                   "restart it, and check that every replica ends with the "
                                   "same state.  Exit 0 only if every check passed.")
    p.add_argument("--duration", type=positive_float, default=15.0, metavar="S",
                   help="seconds of workload (default: 15)")
    p.set_defaults(handler=_cmd_demo)

    # client commands
    def client_parser(name, help_text):
        q = sub.add_parser(name, help=help_text, description=help_text + ".")
        q.add_argument("--cluster", metavar="ADDRS",
                       default=os.environ.get(CLUSTER_ENV) or DEFAULT_CLUSTER,
                       help=f"comma-separated HOST:PORT of any replicas (default: "
                            f"${CLUSTER_ENV}, else {DEFAULT_CLUSTER})")
        q.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                       metavar="S", help=f"give up after S seconds (default: {DEFAULT_TIMEOUT:g})")
        return q

    p = client_parser("put", "set KEY to VALUE")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p.set_defaults(handler=_cmd_put)

    p = client_parser("get", "print KEY's value (linearizable unless --stale)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--stale", action="store_true",
                   help="read from any one replica, maybe behind (no quorum round)")
    p.set_defaults(handler=_cmd_get)

    p = client_parser("delete", "remove KEY")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(handler=_cmd_delete)

    p = client_parser("cas", "set KEY to NEW only if its value is EXPECTED (atomically)")
    p.add_argument("--absent", action="store_true",
                   help="expect KEY to be absent instead of giving EXPECTED: cas --absent KEY NEW")
    p.add_argument("key", metavar="KEY")
    p.add_argument("expected", metavar="EXPECTED", nargs="?")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(handler=_cmd_cas)

    p = client_parser("status", "show every replica's role and progress")
    p.add_argument("--json", action="store_true",
                   help='print {"replicas": [...]} as JSON instead of a table')
    p.set_defaults(handler=_cmd_status)

    p = client_parser("snapshot", "ask every replica to take a snapshot now")
    p.set_defaults(handler=_cmd_snapshot)

    p = sub.add_parser("bench", help="measure throughput and latency (a local cluster by default)",
                       description="Closed-loop (or --rate open-loop) load with a latency "
                                   "histogram; see docs/performance.md.")
    bench.add_arguments(p)
    p.set_defaults(handler=bench.run)

    p = sub.add_parser("certs", help="write a CA and TLS certificates for a cluster")
    certs.add_arguments(p)
    p.set_defaults(handler=certs.main)
    return parser


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    try:
        return args.handler(args)
    except BaseException as raised:
        exc = _unwrap_group(raised)
        if isinstance(exc, _Negative):
            _say(str(exc))
            return EXIT_NO
        if isinstance(exc, ConfigError):
            _error(exc)
            return EXIT_USAGE
        if isinstance(exc, ClientError):
            message = str(exc) or type(exc).__name__
            if exc.maybe_applied and "applied" not in message and args.command in (
                    "put", "delete", "cas"):
                message += " (the command may have been applied)"
            _error(message)
            return EXIT_UNAVAILABLE
        if isinstance(exc, Error):
            _error(exc)
            return EXIT_NO
        if isinstance(exc, KeyboardInterrupt):
            _say(f"{PROG}: interrupted")
            return EXIT_INTERRUPTED
        if isinstance(exc, BrokenPipeError):
            # `cypaxos get ... | head -c1`: the reader left; not worth a message.  Point
            # stdout at /dev/null so the interpreter's final flush does not complain.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_NO
        raise  # a bug: the traceback is what a report needs


def _unwrap_group(exc: BaseException) -> BaseException:
    """The expected error inside an exception group, else `exc` itself.

    Trio reports an exception that left a nursery inside an ExceptionGroup; when every
    exception in it is an expected one (say, "cannot listen on ...: address in use"),
    the user should see that one line, not a group traceback.
    """
    return expected_error(exc, (Error, KeyboardInterrupt))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _error(message) -> None:
    # One line, whatever the exception text holds.
    text = " ".join(str(message).split()) or "unknown error"
    _say(f"{PROG}: error: {text}")


# ---------------------------------------------------------------------- serve


def _cmd_serve(args) -> int:
    from ..replica.options import ServerOptions
    from ..replica.server import run_server

    cluster = parse_cluster(args.cluster)  # ConfigError -> exit 2
    if args.id not in cluster:
        raise ConfigError(f"--id {args.id} is not in --cluster "
                          f"(which has {', '.join(map(str, sorted(cluster)))})")
    if args.state_machine is not None:
        module, sep, cls = args.state_machine.partition(":")
        if not sep or not module or not cls:
            raise ConfigError(f"--state-machine {args.state_machine!r} is not PKG.MOD:CLASS")
    if args.cluster_id is not None and not args.cluster_id.strip():
        raise ConfigError("--cluster-id is empty")
    if not _die_with_parent():
        return EXIT_NO
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
    )
    try:
        return run_server(options)
    except BaseException as raised:
        exc = _unwrap_group(raised)
        if isinstance(exc, Error):
            # Past argument checking, even a ConfigError (say, "cannot listen on ...:
            # address in use") is a failure to run, not bad usage.
            _error(exc)
            return EXIT_NO
        if isinstance(exc, KeyboardInterrupt):  # before the server's own handler was in place
            return EXIT_OK
        if isinstance(exc, OSError) and exc is raised:
            # e.g. a data dir on a read-only or full filesystem
            _error(f"replica {args.id}: {exc}")
            return EXIT_NO
        raise


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


def _cmd_local(args) -> int:
    from .local import LocalCluster, LocalClusterError

    cluster = LocalCluster(replicas=args.replicas, base_port=args.port,
                           data_dir=args.data_dir, fsync=args.fsync == "always")
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
            leader = cluster.wait_ready(timeout=30.0)
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
                    _say(f"{PROG} local: replica {replica_id} exited with status {code}"
                         + (f": {tail}" if tail else "")
                         + f" (log: {cluster.log_path(replica_id)})")
                if len(exited) == len(cluster.ids):
                    _say(f"{PROG} local: every replica has exited")
                    return EXIT_NO
        except _Stop as stop:
            signum = stop.args[0]
            _say(f"{PROG} local: {signal.Signals(signum).name}, stopping {len(cluster.ids)} "
                 "replicas")
            return EXIT_OK
        except LocalClusterError as exc:
            _error(exc)
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
            _say(f"{PROG} local: replica {replica_id} did not stop in time and was killed")


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
    lines.append("Press Ctrl-C to stop every replica.")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------- demo


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(duration=args.duration)


# ---------------------------------------------------------- key-value commands


def _client(args):
    addresses = _cluster_addresses(args)  # a bad --cluster is bad usage, exit 2
    from ..client import connect

    return connect(addresses, timeout=args.timeout)


def _cmd_put(args) -> int:
    with _client(args) as kv:
        kv.put(_arg_bytes(args.key), _arg_bytes(args.value))
    print("ok", flush=True)
    return EXIT_OK


def _cmd_get(args) -> int:
    with _client(args) as kv:
        value = kv.get(_arg_bytes(args.key), stale=args.stale)
    if value is None:
        raise _Negative("(not found)")
    out = sys.stdout.buffer
    out.write(value)
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        out.write(b"\n")  # keep the shell prompt on its own line; pipes get raw bytes
    out.flush()
    return EXIT_OK


def _cmd_delete(args) -> int:
    with _client(args) as kv:
        existed = kv.delete(_arg_bytes(args.key))
    if existed is False:
        raise _Negative("(not found)")
    print("deleted", flush=True)
    return EXIT_OK


def _cmd_cas(args) -> int:
    if args.absent:
        if args.expected is not None:
            raise ConfigError("cas --absent takes KEY NEW, not an EXPECTED value too")
        expected = None
    else:
        if args.expected is None:
            raise ConfigError("cas needs KEY EXPECTED NEW (or --absent KEY NEW)")
        expected = _arg_bytes(args.expected)
    with _client(args) as kv:
        swapped = kv.cas(_arg_bytes(args.key), expected, _arg_bytes(args.new))
    if not swapped:
        print("failed", flush=True)
        return EXIT_NO
    print("ok", flush=True)
    return EXIT_OK


# --------------------------------------------------------------------- status

STATUS_FIELDS = ("id", "address", "reachable", "role", "ballot", "commit_index",
                 "applied_index", "state_digest", "leader", "error")
"""The keys of every entry of ``status --json`` (None when unknown; `error` is None
unless the replica could not be asked)."""


def _json_safe(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def _collect_status(args) -> list[dict]:
    addresses = _cluster_addresses(args)
    try:
        with _client(args) as kv:
            answers = kv.status()
    except errors.UnavailableError:
        # Nobody answered even the connection: still report every address.
        answers = [{"address": a, "reachable": False, "error": "unreachable"}
                   for a in addresses]
    return answers


def _status_row(answer: dict) -> dict:
    row = {name: _json_safe(answer.get(name)) for name in STATUS_FIELDS}
    row["reachable"] = bool(answer.get("reachable"))
    row["address"] = answer.get("address")
    return row


def _cmd_status(args) -> int:
    answers = _collect_status(args)
    rows = [_status_row(answer) for answer in answers]
    if args.json:
        print(json.dumps({"replicas": rows}, indent=2), flush=True)
    else:
        _print_status_table(rows, [answer.get("leader_id") for answer in answers])
    if not any(row["reachable"] for row in rows):
        _error("no replica answered (" + ", ".join(r["address"] for r in rows) + ")")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _print_status_table(rows: list[dict], leader_ids: list) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Off a terminal rich would assume 80 columns and squeeze the table; it never
    # grows past what it needs anyway.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("id", "right"), ("address", "left"), ("role", "left"),
                          ("leader", "right"), ("ballot", "right"), ("commit", "right"),
                          ("applied", "right"), ("digest", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for row, leader_id in zip(rows, leader_ids):
        if not row["reachable"]:
            reason = f" [dim]({escape(str(row['error']))})[/]" if row["error"] else ""
            table.add_row("-", escape(row["address"]), f"[red]unreachable[/]{reason}",
                          "", "", "", "", "")
            continue
        if row["role"] is None:
            table.add_row(str(row["id"] or "?"), escape(row["address"]),
                          f"[red]error: {escape(str(row['error'] or 'no status'))}[/]",
                          "", "", "", "", "")
            continue
        role = row["role"]
        style = {"leader": "bold green", "candidate": "yellow"}.get(role, "")
        digest = row["state_digest"]
        table.add_row(
            str(row["id"]) if row["id"] is not None else "?",
            escape(row["address"]),
            f"[{style}]{role}[/]" if style else role,
            str(leader_id) if leader_id else "-",
            format_ballot(row["ballot"]) if row["ballot"] else "-",
            _count(row["commit_index"]),
            _count(row["applied_index"]),
            str(digest)[:16] if digest is not None else "-",
        )
    console.print(table)


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


# ------------------------------------------------------------------- snapshot


def _cmd_snapshot(args) -> int:
    addresses = _cluster_addresses(args)
    try:
        with _client(args) as kv:
            answers = kv.snapshot()
    except errors.UnavailableError as exc:
        answers = [{"address": a, "reachable": False, "error": str(exc)} for a in addresses]
    width = max(len(a.get("address") or "") for a in answers)
    outcomes = set()
    for answer in answers:
        address = answer.get("address") or "?"
        who = f"replica {answer['id']}: " if answer.get("id") is not None else ""
        if not answer.get("reachable"):
            outcomes.add("unreachable")
            text = f"unreachable: {answer.get('error') or 'no answer'}"
        elif answer.get("error") is None and answer.get("applied_index") is not None:
            outcomes.add("ok")
            text = f"{who}snapshot taken at applied index {answer['applied_index']:,}"
        else:
            outcomes.add("refused")
            text = f"{who}refused: {answer.get('error') or 'no answer'}"
        print(f"{address:<{width}}  {text}", flush=True)
    if outcomes == {"ok"}:
        return EXIT_OK
    if outcomes == {"unreachable"}:
        _error("no replica answered")
        return EXIT_UNAVAILABLE
    return EXIT_NO


if __name__ == "__main__":  # pragma: no cover - `python -m cypaxos` uses __main__.py
    sys.exit(main())
