"""The `cypaxos` commands that talk to a running cluster through the client.

put, get, delete and cas drive the built-in key-value store; submit and query send
raw bytes to a custom state machine; status and snapshot ask every replica.  Each
handler takes the parsed arguments and returns the exit status, or raises: a
`cypaxos.errors.Error` (mapped to an exit status by `cli.main`) or `exits.Negative`.
"""
from __future__ import annotations

import json
import os
import sys

from .. import errors
from ..addresses import parse_addresses
from ..errors import ConfigError
from . import status as status_output
from .exits import EXIT_NO, EXIT_OK, EXIT_UNAVAILABLE, Negative, error

__all__ = ["CLUSTER_ENV", "DEFAULT_CLUSTER", "TLS_CA_ENV", "TLS_CERT_ENV", "TLS_KEY_ENV",
           "TOKEN_FILE_ENV", "add_security_arguments", "client_security", "security_given",
           "security_from_env", "cluster_addresses",
           "arg_bytes", "command_bytes", "cmd_put", "cmd_get", "cmd_delete", "cmd_cas",
           "cmd_submit", "cmd_query", "cmd_status", "cmd_snapshot", "cmd_backup"]

CLUSTER_ENV = "CYPAXOS_CLUSTER"
"""Environment variable giving the default ``--cluster`` of client commands."""
DEFAULT_CLUSTER = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
"""The default ``--cluster`` when CYPAXOS_CLUSTER is unset: `cypaxos local`'s."""
TLS_CA_ENV = "CYPAXOS_TLS_CA"
TLS_CERT_ENV = "CYPAXOS_TLS_CERT"
TLS_KEY_ENV = "CYPAXOS_TLS_KEY"
TOKEN_FILE_ENV = "CYPAXOS_TOKEN_FILE"
"""Environment variables giving the defaults of ``--tls-ca``, ``--tls-cert``,
``--tls-key`` and ``--token-file`` of every command that talks to a cluster."""


def _env(name: str):
    return os.environ.get(name) or None   # set but empty: unset


def add_security_arguments(parser, *, env_defaults: bool = True) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` and ``--token-file``, defaults from
    the environment (unless not `env_defaults`: then `security_from_env` fills them
    in when the caller decides they apply): what every command that talks to a
    cluster takes."""
    def default(name):
        return _env(name) if env_defaults else None

    where = "" if env_defaults else "with --cluster only; "

    parser.add_argument("--tls-ca", metavar="FILE", default=default(TLS_CA_ENV),
                        help=f"dial with TLS, trusting the CA certificate(s) in FILE (PEM); "
                             f"the replicas' certificates must name the hosts of --cluster "
                             f"({where}default: ${TLS_CA_ENV}; without it, no TLS)")
    parser.add_argument("--tls-cert", metavar="FILE", default=default(TLS_CERT_ENV),
                        help=f"with --tls-ca: the client's certificate, e.g. the client.pem "
                             f"of cypaxos certs ({where}default: ${TLS_CERT_ENV})")
    parser.add_argument("--tls-key", metavar="FILE", default=default(TLS_KEY_ENV),
                        help=f"the key of --tls-cert, e.g. client.key ({where}default: "
                             f"${TLS_KEY_ENV})")
    parser.add_argument("--token-file", metavar="FILE", default=default(TOKEN_FILE_ENV),
                        help=f"prove the first token in FILE (one per line) to the replicas, "
                             f"which must list it in their --token-file "
                             f"({where}default: ${TOKEN_FILE_ENV})")


def security_given(args) -> bool:
    """Whether any of the security arguments was given."""
    return any(getattr(args, name) is not None
               for name in ("tls_ca", "tls_cert", "tls_key", "token_file"))


def security_from_env(args) -> None:
    """Fill the security arguments not given from their environment variables."""
    for name, env in (("tls_ca", TLS_CA_ENV), ("tls_cert", TLS_CERT_ENV),
                      ("tls_key", TLS_KEY_ENV), ("token_file", TOKEN_FILE_ENV)):
        if getattr(args, name) is None:
            setattr(args, name, _env(env))


def client_security(args):
    """(tls, token) of the parsed security arguments, checked and the files read:
    `tls` a `cypaxos.TLS` or None, `token` bytes or None; ConfigError naming the flag
    or the file (exit 2)."""
    from ..security.secrets import load_keys
    from ..security.tls import TLS

    tls = None
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            given, missing = (("--tls-cert", "--tls-key") if args.tls_key is None
                              else ("--tls-key", "--tls-cert"))
            raise ConfigError(f"{given} needs {missing} too (or neither)")
        if args.tls_ca is None:
            raise ConfigError(f"--tls-cert and --tls-key need --tls-ca (or ${TLS_CA_ENV}): "
                              f"the CA that signed the replicas' certificates")
    if args.tls_ca is not None:
        tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    token = None
    if args.token_file is not None:
        token = load_keys(args.token_file, "token file")[0]
    return tls, token


def cluster_addresses(args) -> list[str]:
    """The client commands' ``--cluster`` (``ID=`` prefixes allowed); ConfigError."""
    return parse_addresses(args.cluster, source="--cluster")


def arg_bytes(text: str) -> bytes:
    """A command-line argument as the bytes the user typed."""
    # os.fsencode undoes the surrogateescape decoding of argv, so any bytes given on
    # the command line reach the cluster unchanged (UTF-8 text stays UTF-8).
    return os.fsencode(text)


def command_bytes(text: str, what: str) -> bytes:
    """`submit`/`query`'s argument: hex digits, ``@FILE`` (its bytes) or ``@-`` (stdin).

    Whitespace between hex digits is allowed; ConfigError (exit 2) otherwise.
    """
    if text.startswith("@"):
        path = text[1:]
        if path == "-":
            return sys.stdin.buffer.read()
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        return bytes.fromhex(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ConfigError(f"{what} {shown!r} is neither hex digits nor @FILE") from None


def _client(args):
    addresses = cluster_addresses(args)  # a bad --cluster is bad usage, exit 2
    from ..client import connect

    tls, token = client_security(args)  # a bad file is bad configuration, exit 2
    return connect(addresses, timeout=args.timeout, tls=tls, token=token)


def _write_raw(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")  # keep the shell prompt on its own line; pipes get raw bytes
    out.flush()


def cmd_put(args) -> int:
    """`cypaxos put KEY VALUE`."""
    with _client(args) as kv:
        kv.put(arg_bytes(args.key), arg_bytes(args.value))
    print("ok", flush=True)
    return EXIT_OK


def cmd_get(args) -> int:
    """`cypaxos get KEY [--stale]`: the raw value on stdout."""
    with _client(args) as kv:
        value = kv.get(arg_bytes(args.key), stale=args.stale)
    if value is None:
        raise Negative("(not found)")
    _write_raw(value)
    return EXIT_OK


def cmd_delete(args) -> int:
    """`cypaxos delete KEY`."""
    with _client(args) as kv:
        existed = kv.delete(arg_bytes(args.key))
    if existed is False:
        raise Negative("(not found)")
    print("deleted", flush=True)
    return EXIT_OK


def cmd_cas(args) -> int:
    """`cypaxos cas KEY EXPECTED NEW` / `cas --absent KEY NEW`."""
    if args.absent:
        if args.expected is not None:
            raise ConfigError("cas --absent takes KEY NEW, not an EXPECTED value too")
        expected = None
    else:
        if args.expected is None:
            raise ConfigError("cas needs KEY EXPECTED NEW (or --absent KEY NEW)")
        expected = arg_bytes(args.expected)
    with _client(args) as kv:
        swapped = kv.cas(arg_bytes(args.key), expected, arg_bytes(args.new))
    if not swapped:
        print("failed", flush=True)
        return EXIT_NO
    print("ok", flush=True)
    return EXIT_OK


def _print_result(result: bytes, raw: bool) -> None:
    if raw:
        _write_raw(result)
    else:
        print(result.hex(), flush=True)


def cmd_submit(args) -> int:
    """`cypaxos submit HEX|@FILE [--raw]`: the state machine's result, hex or raw."""
    command = command_bytes(args.command_bytes, "COMMAND")
    with _client(args) as kv:
        result = kv.submit(command)
    _print_result(result, args.raw)
    return EXIT_OK


def cmd_query(args) -> int:
    """`cypaxos query HEX|@FILE [--stale] [--raw]`."""
    query = command_bytes(args.query_bytes, "QUERY")
    with _client(args) as kv:
        result = kv.query(query, stale=args.stale)
    _print_result(result, args.raw)
    return EXIT_OK


def cmd_status(args) -> int:
    """`cypaxos status [--json] [--wide]`: exit 0 if any replica answered, else 3."""
    addresses = cluster_addresses(args)
    try:
        with _client(args) as kv:
            answers = kv.status()
    except errors.UnavailableError:
        # Nobody answered even the connection: still report every address.
        answers = [{"address": a, "reachable": False, "error": "unreachable"}
                   for a in addresses]
    if args.json:
        rows = status_output.json_rows(answers, wide=args.wide)
        print(json.dumps({"replicas": rows}, indent=2), flush=True)
    else:
        status_output.print_table(answers, wide=args.wide)
    if not any(answer.get("reachable") for answer in answers):
        error("no replica answered (" + ", ".join(a["address"] for a in answers) + ")")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def cmd_snapshot(args) -> int:
    """`cypaxos snapshot`: one line per replica; 0 all took one, 3 none answered, else 1."""
    addresses = cluster_addresses(args)
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
        error("no replica answered")
        return EXIT_UNAVAILABLE
    return EXIT_NO


def cmd_backup(args) -> int:
    """`cypaxos backup FILE`: a consistent, checked copy of the state, written atomically."""
    with _client(args) as kv:
        done = kv.backup(args.file)
    print(f"backup of cluster {done.cluster_id} at slot {done.index:,} ({done.size_bytes:,} "
          f"bytes, from replica {done.replica_id}) written to {done.path}", flush=True)
    return EXIT_OK
