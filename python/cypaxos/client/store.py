"""The ordered, revisioned store's calls: revisioned get, range and transactions.

The public types (`KeyValue`, `TxnResult`, `Compare`, `Op`) and `StoreCalls`, the
part of `ClientCalls` that builds the store's queries and commands
(`cypaxos.commands`), sends them through the ordinary query and submit paths and
turns the answers into results or errors.  docs/coordination.md says what the calls
mean; docs/internals.md ("Key-value commands") has the byte formats.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

from .. import commands as _cmd
from ..commands import KeyValue
from ..errors import ClientError, CompactedError, RequestError, TimeoutError

__all__ = ["KeyValue", "TxnResult", "Compare", "Op", "StoreCalls", "TxnOpResult"]

Bytes = Union[bytes, bytearray, memoryview, str]

_U64_MAX = 2**64 - 1


class TxnResult(NamedTuple):
    """What a transaction did.

    `succeeded`: every compare held (the success operations ran, else the failure
    ones).  `results`: one per operation of the branch that ran, in order: None for a
    put, a bool for a delete (the key existed), a `KeyValue` or None (absent) for a
    get.  `revision`: the store's revision after the transaction (the one it made if it
    changed anything).
    """

    succeeded: bool
    results: list["TxnOpResult"]
    revision: int


TxnOpResult = Union[None, bool, KeyValue]
"""One operation's entry in `TxnResult.results`."""


def _as_bytes(value: Bytes, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def _check_int(value: Any, what: str, low: int, high: int = _U64_MAX) -> int:
    if type(value) is not int:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], not {value}")
    return value


def _check_op(op: Any) -> str:
    if op not in _cmd.COMPARE_OPS:
        raise ValueError(f"compare operator must be one of "
                         f"{', '.join(repr(o) for o in _cmd.COMPARE_OPS)}, not {op!r}")
    return str(op)


class Compare:
    """A condition of a transaction; make one with `Compare.value`,
    `Compare.revision` or `Compare.absent` (arguments are checked at once)."""

    __slots__ = ("_spec",)
    _spec: tuple[Any, ...]

    def __init__(self, spec: tuple[Any, ...]) -> None:
        """Internal: use the class methods."""
        object.__setattr__(self, "_spec", spec)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def value(cls, key: Bytes, op: str, value: Bytes) -> "Compare":
        """The key's value `op` `value` (bytewise; false if the key is absent)."""
        return cls(("value", _as_bytes(key, "key"), _check_op(op), _as_bytes(value, "value")))

    @classmethod
    def revision(cls, key: Bytes, op: str, revision: int) -> "Compare":
        """The key's revision (its last change; 0 if absent) `op` `revision`."""
        return cls(("mod_revision", _as_bytes(key, "key"), _check_op(op),
                    _check_int(revision, "revision", 0)))

    @classmethod
    def absent(cls, key: Bytes) -> "Compare":
        """The key does not exist."""
        return cls(("absent", _as_bytes(key, "key")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compare) and other._spec == self._spec

    def __hash__(self) -> int:
        return hash(self._spec)

    def __repr__(self) -> str:
        kind, key, *rest = self._spec
        name = {"mod_revision": "revision"}.get(kind, kind)
        return f"Compare.{name}({', '.join(repr(x) for x in (key, *rest))})"


class Op:
    """An operation of a transaction; make one with `Op.put`, `Op.delete` or `Op.get`
    (arguments are checked at once)."""

    __slots__ = ("_spec",)
    _spec: tuple[Any, ...]

    def __init__(self, spec: tuple[Any, ...]) -> None:
        """Internal: use the class methods."""
        object.__setattr__(self, "_spec", spec)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def put(cls, key: Bytes, value: Bytes, lease: Optional[int] = None) -> "Op":
        """Set `key` to `value`, attached to the lease of id `lease` (None: no lease;
        a lease that does not exist refuses the whole transaction)."""
        lease_id = 0 if lease is None else _check_int(lease, "lease", 1)
        return cls(("put", _as_bytes(key, "key"), _as_bytes(value, "value"), lease_id))

    @classmethod
    def delete(cls, key: Bytes) -> "Op":
        """Remove `key` (its result: True if it existed)."""
        return cls(("delete", _as_bytes(key, "key")))

    @classmethod
    def get(cls, key: Bytes) -> "Op":
        """Read `key` (its result: a `KeyValue`, or None if absent), seeing the
        transaction's earlier operations."""
        return cls(("get", _as_bytes(key, "key")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and other._spec == self._spec

    def __hash__(self) -> int:
        return hash(self._spec)

    def __repr__(self) -> str:
        kind, *rest = self._spec
        if kind == "put" and rest[2] == 0:
            rest = rest[:2]
        return f"Op.{kind}({', '.join(repr(x) for x in rest)})"


def _specs(items: Optional[Iterable[Any]], kind: type[Union[Compare, Op]],
           what: str) -> list[tuple[Any, ...]]:
    if items is None:
        return []
    if isinstance(items, (Compare, Op, str, bytes)):
        raise TypeError(f"{what} must be a list of {kind.__name__}")
    specs = []
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{what} must hold {kind.__name__} objects "
                            f"(cypaxos.{kind.__name__}...), not {type(item).__name__}")
        specs.append(item._spec)
    return specs


def items_list(items: Optional[Iterable[Any]], what: str) -> Optional[list[Any]]:
    """`items` (a transaction's compares or operations) as a list, or None; a single
    Compare or Op (a missing pair of brackets) is a TypeError."""
    if items is None:
        return None
    if isinstance(items, (Compare, Op, str, bytes)):
        kind = "Compare" if what == "compare" else "Op"
        raise TypeError(f"{what} must be a list of {kind}, not one {type(items).__name__}")
    return list(items)


def _malformed(exc: ValueError) -> ClientError:
    return ClientError(f"malformed result from the cluster: {exc}", maybe_applied=True)


def encode_txn(compare: Optional[Iterable[Compare]], success: Optional[Iterable[Op]],
               failure: Optional[Iterable[Op]]) -> bytes:
    """The transaction command of `kv.txn` (TypeError for items of the wrong type)."""
    command: bytes = _cmd.encode_txn(_specs(compare, Compare, "compare"),
                                     _specs(success, Op, "success"),
                                     _specs(failure, Op, "failure"))
    return command


def decode_txn(result: bytes, success_keys: Sequence[bytes],
               failure_keys: Sequence[bytes]) -> TxnResult:
    """`kv.txn`'s result from the command's result bytes, given the keys of each
    branch's operations (a get's `KeyValue` names its key)."""
    try:
        raw = _cmd.decode_txn(result)
    except ValueError as exc:
        raise _malformed(exc) from None
    if raw.lease_missing:
        raise RequestError(f"transaction refused: lease {raw.lease_missing} does not "
                           f"exist (nothing was changed)")
    keys = success_keys if raw.succeeded else failure_keys
    if len(keys) != len(raw.results):
        raise _malformed(ValueError("transaction result of the wrong length"))
    results: list[TxnOpResult] = []
    for key, item in zip(keys, raw.results):
        if isinstance(item, _cmd.KeyMeta):
            results.append(KeyValue(key, item.value, item.mod_revision))
        else:
            results.append(item)
    return TxnResult(raw.succeeded, results, raw.revision)


_RANGE_REPLY = struct.Struct("<BQQBI")   # status, revision, compact_revision, more, count
_RANGE_ITEM = struct.Struct("<IIQ")      # klen, vlen, mod_revision
_new_tuple = tuple.__new__


def decode_range_page(result: bytes) -> tuple[int, int, int, bool, list[KeyValue]]:
    """(status, revision, compact_revision, more, items) of a range reply: what
    `commands.decode_range` returns, in about half its time (a scan's keys are decoded
    here, one by one, and this loop is most of the client's cost per key).
    ValueError if malformed."""
    try:
        status, revision, compact, more, count = _RANGE_REPLY.unpack_from(result, 0)
        if status > _cmd.QUERY_FUTURE_REVISION or more > 1:
            raise ValueError("range result has a bad header")
        if count * _RANGE_ITEM.size > len(result) - _RANGE_REPLY.size:
            raise ValueError("range result count does not fit the result")
        pos = _RANGE_REPLY.size
        unpack = _RANGE_ITEM.unpack_from
        items: list[KeyValue] = [None] * count   # type: ignore[list-item]
        for i in range(count):
            klen, vlen, mod = unpack(result, pos)
            start = pos + 16
            kend = start + klen
            pos = kend + vlen
            items[i] = _new_tuple(KeyValue, (result[start:kend], result[kend:pos], mod))
    except struct.error:
        raise ValueError("range result is truncated") from None
    if pos != len(result):
        raise ValueError("range result is truncated" if pos > len(result)
                         else "range result has trailing bytes")
    return status, revision, compact, bool(more), items


def range_bounds(start: Optional[Bytes], end: Optional[Bytes],
                 prefix: Optional[Bytes]) -> tuple[bytes, Optional[bytes]]:
    """`[start, end)` of a range call (end None: no upper bound); ValueError if a
    prefix is given with a start or end."""
    if prefix is not None:
        if start is not None or end is not None:
            raise ValueError("give a prefix or a start and end, not both")
        p = _as_bytes(prefix, "prefix")
        return p, _cmd.prefix_end(p)
    return (b"" if start is None else _as_bytes(start, "start"),
            None if end is None else _as_bytes(end, "end"))


def check_range_args(limit: Optional[int], revision: Optional[int]) -> tuple[int, int]:
    """(limit, revision) as the wire takes them (0: none); TypeError or ValueError."""
    return (0 if limit is None else _check_int(limit, "limit", 1, 2**32 - 1),
            0 if revision is None else _check_int(revision, "revision", 1))


class StoreCalls:
    """The store's calls of `ClientCalls` (see the module doc)."""

    async def _call(self, payload: bytes, write: bool, stale: bool,
                    timeout: Optional[float]) -> bytes:
        raise NotImplementedError   # ClientCalls'

    def _now(self) -> float:
        raise NotImplementedError   # the wiring's

    _timeout: float

    async def _get_with_revision(self, key: bytes, stale: bool,
                                 timeout: Optional[float]) -> tuple[Optional[bytes], int]:
        result = await self._call(_cmd.encode_get_rev(key), False, stale, timeout)
        try:
            answer = _cmd.decode_get_rev(result)
        except ValueError as exc:
            raise _malformed(exc) from None
        if answer.kv is None:
            return None, 0
        return answer.kv.value, answer.kv.mod_revision

    async def range(self, start: Optional[Bytes] = None, end: Optional[Bytes] = None, *,
                    prefix: Optional[Bytes] = None, limit: Optional[int] = None,
                    revision: Optional[int] = None,
                    timeout: Optional[float] = None) -> list[KeyValue]:
        """The keys in `[start, end)` (or starting with `prefix`), in key order.

        `start` None is the first key, `end` None has no upper bound; at most `limit`
        keys.  Each is a `KeyValue(key, value, revision)`, `revision` being its last
        change.  Linearizable, and one consistent view however long: the store's reply
        is bounded in bytes, and a cut one is continued from its last key at the
        revision of the first.  `revision` reads the store as it was at that past
        revision; one older than the history the store retains raises
        `CompactedError`, one in the future `RequestError`.  `timeout` bounds the whole
        scan.
        """
        items, _ = await self._scan(start, end, prefix, limit, revision, timeout)
        return items

    async def _scan(self, start: Optional[Bytes], end: Optional[Bytes],
                    prefix: Optional[Bytes], limit: Optional[int],
                    revision: Optional[int], timeout: Optional[float],
                    reply_bytes_max: int = 0) -> tuple[list[KeyValue], int]:
        """`range`, and the revision it read at (what the command line reports)."""
        lo, hi = range_bounds(start, end, prefix)
        want, at = check_range_args(limit, revision)
        if timeout is None:
            timeout = self._timeout
        elif not timeout > 0:
            raise ValueError("timeout must be positive")
        deadline = self._now() + timeout
        items: list[KeyValue] = []
        while True:
            left = deadline - self._now()
            if left <= 0:
                raise TimeoutError(f"range did not complete within {timeout:g} s "
                                   f"({len(items)} keys read)")
            query = _cmd.encode_range(lo, hi, limit=want - len(items) if want else 0,
                                      revision=at, reply_bytes_max=reply_bytes_max)
            result = await self._call(query, False, False, left)
            try:
                status, revision_read, compact, more, page = decode_range_page(result)
            except ValueError as exc:
                raise _malformed(exc) from None
            if status == _cmd.QUERY_COMPACTED:
                raise CompactedError(at, compact)
            if status == _cmd.QUERY_FUTURE_REVISION:
                raise RequestError(f"revision {at} is in the future: the store is at "
                                   f"revision {revision_read}")
            items.extend(page)
            # Every page after the first reads at the first one's revision, so the
            # pages join into one view of the store.
            at = revision_read
            if not more or not page or (want and len(items) >= want):
                return items, at
            lo = page[-1].key + b"\x00"

    async def txn(self, compare: Optional[Iterable[Compare]] = None,
                  success: Optional[Iterable[Op]] = None,
                  failure: Optional[Iterable[Op]] = None, *,
                  timeout: Optional[float] = None) -> TxnResult:
        """If every `compare` holds, run the `success` operations, else the `failure`
        ones: atomically, at one revision, replicated exactly once.

        `compare`: `Compare.value(key, op, value)`, `Compare.revision(key, op,
        revision)`, `Compare.absent(key)` (`op` one of "==", "!=", "<", ">"); none
        holds vacuously.  Operations: `Op.put(key, value, lease=None)`,
        `Op.delete(key)`, `Op.get(key)`, run in order (a get sees the earlier ones).
        Returns a `TxnResult`; a put naming a lease that does not exist refuses the
        whole transaction with `RequestError` (nothing changed).
        """
        success_list = items_list(success, "success") or []
        failure_list = items_list(failure, "failure") or []
        command = encode_txn(compare, success_list, failure_list)
        result = await self._call(command, True, False, timeout)
        return decode_txn(result, [op._spec[1] for op in success_list],
                          [op._spec[1] for op in failure_list])
