"""The `cypaxos` commands of the ordered, revisioned store: `range` and `txn`.

`add_parsers(client_parser)` adds their subcommands to the command line (cli.py);
each handler takes the parsed arguments and returns the exit status, or raises as
the other client commands do (`cypaxos.errors.Error`, mapped by `cli.main`).  The
formats are in docs/cli.md: keys and values in JSON are UTF-8 strings or
``{"hex": "..."}``; in text, UTF-8 with backslash escapes.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from ..client.store import Compare, KeyValue, Op
from ..errors import ConfigError
from .client_commands import _client, arg_bytes
from .exits import EXIT_NO, EXIT_OK

__all__ = ["add_parsers", "cmd_range", "cmd_txn", "parse_txn", "json_bytes", "text_bytes"]

TXN_FILE_HELP = """\
FILE is JSON (or - for stdin):
{"compare": [{"key": K, "value": V, "op": "=="}, {"key": K, "revision": N, "op": "<"},
{"key": K, "absent": true}], "success": [{"put": K, "value": V}, {"put": K, "value": V,
"lease": ID}, {"delete": K}, {"get": K}], "failure": [...]}, every part optional; op is
one of == != < >; keys and values are UTF-8 strings or {"hex": "..."}."""


def add_parsers(client_parser: Any) -> None:
    """Add `range` and `txn` with `client_parser(name, help, description)` (cli.py's,
    which gives them --cluster and --timeout)."""
    p = client_parser(
        "range", "list keys in order, with their values and revisions",
        "Linearizable, and one consistent view however many keys: a long scan is "
        "read in pages at one revision.  Prints KEY<TAB>VALUE lines (UTF-8, with "
        "backslash escapes for other bytes, tabs and newlines), or JSON with --json.  "
        "An empty range prints nothing and exits 0.  A --revision older than the "
        "history the store retains exits 4.")
    p.add_argument("start", metavar="START", nargs="?",
                   help="the first key (default: the first there is)")
    p.add_argument("end", metavar="END", nargs="?",
                   help="the key to stop before (default: no end)")
    p.add_argument("--prefix", metavar="P", help="the keys starting with P (instead of "
                   "START and END)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="at most N keys")
    p.add_argument("--revision", type=_positive_int, metavar="R",
                   help="the store as it was at revision R (a past one it still retains)")
    p.add_argument("--json", action="store_true",
                   help='print {"revision": R, "kvs": [{"key", "value", "revision"}, ...]}')
    p.set_defaults(handler=cmd_range)

    p = client_parser(
        "txn", "run a transaction from a JSON file, atomically",
        "If every compare holds, the success operations run, else the failure ones, "
        "all at one revision.  Prints succeeded or failed, the revision, and a line "
        "per operation (or JSON with --json); exits 0 if it succeeded, 1 if the "
        "failure branch ran.  " + TXN_FILE_HELP)
    p.add_argument("file", metavar="FILE.json", help="the transaction (- for stdin)")
    p.add_argument("--json", action="store_true",
                   help='print {"succeeded", "revision", "results": [...]} as JSON')
    p.set_defaults(handler=cmd_txn)


def _positive_int(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


# ------------------------------------------------------------- bytes shown

def json_bytes(data: bytes) -> Any:
    """`data` for JSON: a str if it is UTF-8, else {"hex": "..."}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": data.hex()}


_ESCAPES = {ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def text_bytes(data: bytes) -> str:
    """`data` on one line: UTF-8, other bytes as \\xNN, control characters,
    backslashes, tabs and newlines escaped."""
    # surrogateescape keeps each undecodable byte apart (as U+DC80 + byte), so that
    # it, and only it, is shown as \xNN.
    text = data.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7f:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _kv_json(item: KeyValue) -> dict[str, Any]:
    return {"key": json_bytes(item.key), "value": json_bytes(item.value),
            "revision": item.revision}


# ------------------------------------------------------------- range

def cmd_range(args: Any) -> int:
    """`cypaxos range [--prefix P | START [END]] [--limit N] [--revision R] [--json]`."""
    if args.prefix is not None and (args.start is not None or args.end is not None):
        raise ConfigError("range takes --prefix or START [END], not both")
    prefix = None if args.prefix is None else arg_bytes(args.prefix)
    start = None if args.start is None else arg_bytes(args.start)
    end = None if args.end is None else arg_bytes(args.end)
    with _client(args) as kv:
        items, revision = kv._call(kv._client._scan, start, end, prefix, args.limit,
                                   args.revision, None)
    out = sys.stdout
    if args.json:
        json.dump({"revision": revision, "kvs": [_kv_json(x) for x in items]}, out,
                  indent=2)
        out.write("\n")
    else:
        out.writelines(f"{text_bytes(x.key)}\t{text_bytes(x.value)}\n" for x in items)
    out.flush()
    return EXIT_OK


# ------------------------------------------------------------- txn

def _file_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"hex"} and isinstance(value["hex"], str):
        try:
            return bytes.fromhex(value["hex"])
        except ValueError:
            raise ConfigError(f"{where}: {value['hex']!r} is not hex digits") from None
    raise ConfigError(f"{where} must be a string or {{\"hex\": \"...\"}}, not {value!r}")


def _fields(item: Any, where: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object, not {item!r}")
    missing = required - set(item)
    extra = set(item) - required - optional
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(sorted(missing))}")
    if extra:
        raise ConfigError(f"{where} has unknown field {', '.join(sorted(extra))}")


def _parse_compare(item: Any, where: str) -> Compare:
    if isinstance(item, dict) and "absent" in item:
        _fields(item, where, {"key", "absent"}, set())
        if item["absent"] is not True:
            raise ConfigError(f"{where}: absent must be true")
        return Compare.absent(_file_bytes(item["key"], f"{where} key"))
    if isinstance(item, dict) and "revision" in item:
        _fields(item, where, {"key", "revision", "op"}, set())
        revision = item["revision"]
        if type(revision) is not int or revision < 0:
            raise ConfigError(f"{where}: revision must be an integer >= 0")
        make = lambda key, op: Compare.revision(key, op, revision)  # noqa: E731
    else:
        _fields(item, where, {"key", "value", "op"}, set())
        value = _file_bytes(item["value"], f"{where} value")
        make = lambda key, op: Compare.value(key, op, value)  # noqa: E731
    try:
        return make(_file_bytes(item["key"], f"{where} key"), item["op"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _parse_op(item: Any, where: str) -> Op:
    if isinstance(item, dict) and "put" in item:
        _fields(item, where, {"put", "value"}, {"lease"})
        lease = item.get("lease")
        if lease is not None and (type(lease) is not int or not 1 <= lease < 2**64):
            raise ConfigError(f"{where}: lease must be a lease id (an integer >= 1)")
        return Op.put(_file_bytes(item["put"], f"{where} key"),
                      _file_bytes(item["value"], f"{where} value"), lease)
    for kind, make in (("delete", Op.delete), ("get", Op.get)):
        if isinstance(item, dict) and kind in item:
            _fields(item, where, {kind}, set())
            return make(_file_bytes(item[kind], f"{where} key"))
    raise ConfigError(f"{where} must be {{\"put\": K, \"value\": V}}, {{\"delete\": K}} "
                      f"or {{\"get\": K}}, not {item!r}")


def parse_txn(text: str, name: str) -> tuple[list[Compare], list[Op], list[Op]]:
    """The (compare, success, failure) of a txn file's JSON text; ConfigError."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON: {exc}") from None
    _fields(doc, name, set(), {"compare", "success", "failure"})
    parts: list[list[Any]] = []
    for part, parse in (("compare", _parse_compare), ("success", _parse_op),
                        ("failure", _parse_op)):
        items = doc.get(part, [])
        if not isinstance(items, list):
            raise ConfigError(f"{name}: {part} must be a list")
        parts.append([parse(item, f"{name} {part}[{i}]") for i, item in enumerate(items)])
    return parts[0], parts[1], parts[2]


def _read_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read txn file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"txn file {path} is not UTF-8") from None


def _op_line(op: Op, result: Any) -> str:
    kind, key = op._spec[0], text_bytes(op._spec[1])
    if kind == "put":
        return f"put\t{key}"
    if kind == "delete":
        return f"delete\t{key}\t{'deleted' if result else '(not found)'}"
    if result is None:
        return f"get\t{key}\t(not found)"
    return f"get\t{key}\t{text_bytes(result.value)}\t{result.revision}"


def cmd_txn(args: Any) -> int:
    """`cypaxos txn FILE.json [--json]`: 0 if it succeeded, 1 if the failure branch ran."""
    name = "stdin" if args.file == "-" else args.file
    compare, success, failure = parse_txn(_read_file(args.file), name)
    with _client(args) as kv:
        result = kv.txn(compare, success, failure)
    out = sys.stdout
    if args.json:
        json.dump({"succeeded": result.succeeded, "revision": result.revision,
                   "results": [_kv_json(r) if isinstance(r, KeyValue) else r
                               for r in result.results]}, out, indent=2)
        out.write("\n")
    else:
        out.write(f"{'succeeded' if result.succeeded else 'failed'} at revision "
                  f"{result.revision}\n")
        ops = success if result.succeeded else failure
        out.writelines(_op_line(op, r) + "\n" for op, r in zip(ops, result.results))
    out.flush()
    return EXIT_OK if result.succeeded else EXIT_NO
