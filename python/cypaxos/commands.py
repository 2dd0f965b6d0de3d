"""Byte formats of client batches, packed results and key-value commands.

See docs/internals.md, "Slot values and client batches" and "Key-value commands".
All integers are little-endian.  These are helpers for clients, tests and tools (the
ones on the client's hot path are compiled, in clientops.pyx); the core parses
batches itself.  Malformed input raises ValueError.
"""
import struct
from typing import NamedTuple

# The client's hot path, compiled: built there, exported from here.
from .clientops import (BATCH_HEADER_BYTES, SEQ_LIMIT, decode_gets, encode_gets,
                        encode_puts, pack_client_batch)

__all__ = [
    "RESULT_OK", "RESULT_ERROR", "RESULT_SESSION_EXPIRED", "RESULT_RETRY",
    "BATCH_HEADER_BYTES", "SEQ_LIMIT", "ClientBatch", "pack_client_batch",
    "unpack_client_batch", "unpack_client_batches", "pack_results", "unpack_results",
    "all_ok_empty", "encode_puts", "encode_gets", "decode_gets",
    "encode_put", "encode_delete", "encode_cas", "encode_get", "decode_command",
    "decode_get", "decode_bool",
    # The ordered, revisioned store.
    "SNAPSHOT_MAGIC", "QUERY_OK", "QUERY_COMPACTED", "QUERY_FUTURE_REVISION",
    "CHANGE_PUT", "CHANGE_DELETE", "COMPARE_OPS", "COMPARE_TARGETS", "TXN_OPS",
    "KeyValue", "KeyMeta", "GetResult", "WriteResult", "RangeResult", "Change",
    "HistoryResult", "TxnResult", "LeaseInfo", "LeaseKeys", "StoreStatus", "KVSnapshot",
    "prefix_end", "encode_put_rev", "encode_delete_rev", "encode_cas_rev", "encode_txn",
    "encode_lease_grant", "encode_lease_revoke", "encode_get_rev", "encode_range",
    "encode_history", "encode_lease_list", "encode_lease_keys", "encode_store_status",
    "decode_write", "decode_lease_grant", "decode_get_rev",
    "decode_range", "decode_history", "decode_txn", "decode_lease_list",
    "decode_lease_keys", "decode_store_status", "decode_kv_snapshot",
]

RESULT_OK = 0
"""Result status: the command was applied; the bytes are its result."""
RESULT_ERROR = 1
"""Result status: the state machine raised; the bytes are the error text (UTF-8)."""
RESULT_SESSION_EXPIRED = 2
"""Result status: the client's session is gone; its commands were not applied."""
RESULT_RETRY = 3
"""Result status used by the core (statemachine.pxd), not yet in docs/internals.md."""

_BATCH_HEADER = struct.Struct("<QQQII")  # session_id, first_seq, acked_seq, count, payload_len
_U32 = struct.Struct("<I")
_RESULT_HEADER = struct.Struct("<BI")    # status, len
_CAS_EXPECTED = struct.Struct("<BI")     # has_expected, elen

assert BATCH_HEADER_BYTES == _BATCH_HEADER.size
_U32_MAX = 0xFFFFFFFF
_OK_EMPTY = _RESULT_HEADER.pack(RESULT_OK, 0)


class ClientBatch(NamedTuple):
    """One client batch: its commands carry seq first_seq .. first_seq + len(commands) - 1."""

    session_id: int
    first_seq: int
    acked_seq: int
    commands: list


def unpack_client_batch(data, offset=0):
    """Parse the client batch at data[offset:]; return (ClientBatch, offset after it)."""
    if len(data) - offset < BATCH_HEADER_BYTES:
        raise ValueError("client batch shorter than its header")
    session_id, first_seq, acked_seq, count, payload_len = \
        _BATCH_HEADER.unpack_from(data, offset)
    pos = offset + BATCH_HEADER_BYTES
    end = pos + payload_len
    if end > len(data):
        raise ValueError("client batch payload is truncated")
    # Each command needs 4 length bytes: refuse a huge count before looping on it.
    if 4 * count > payload_len:
        raise ValueError("client batch count does not fit its payload")
    commands = []
    for _ in range(count):
        if pos + 4 > end:
            raise ValueError("client batch command length is truncated")
        length = _U32.unpack_from(data, pos)[0]
        pos += 4
        if pos + length > end:
            raise ValueError("client batch command overruns the payload")
        commands.append(bytes(data[pos:pos + length]))
        pos += length
    if pos != end:
        raise ValueError("client batch payload has trailing bytes")
    return ClientBatch(session_id, first_seq, acked_seq, commands), end


def unpack_client_batches(value):
    """Parse a slot value (b"" or concatenated client batches) into a list of ClientBatch."""
    batches = []
    offset = 0
    while offset < len(value):
        batch, offset = unpack_client_batch(value, offset)
        batches.append(batch)
    return batches


def pack_results(results):
    """Return packed results for an iterable of (status, bytes), as the core does."""
    parts = []
    header = _RESULT_HEADER.pack
    for status, data in results:
        parts.append(header(status, len(data)))
        parts.append(data)
    return b"".join(parts)


def all_ok_empty(packed, count):
    """True if `packed` is exactly `count` results of status OK and no bytes (what a
    batch of puts gets back): then the caller need not unpack them one by one."""
    return len(packed) == _RESULT_HEADER.size * count and packed == _OK_EMPTY * count


def unpack_results(packed):
    """Parse packed results into a list of (status, bytes), one per command in order.

    Unknown statuses are passed through: a newer core may add some.
    """
    results = []
    pos = 0
    end = len(packed)
    header_size = _RESULT_HEADER.size
    while pos < end:
        if pos + header_size > end:
            raise ValueError("packed results: truncated header")
        status, length = _RESULT_HEADER.unpack_from(packed, pos)
        pos += header_size
        if pos + length > end:
            raise ValueError("packed results: result overruns the buffer")
        results.append((status, bytes(packed[pos:pos + length])))
        pos += length
    return results


# ---------------------------------------------------------------------------
# Key-value commands (cypaxos.statemachine.KVStore)

def _check_key(key):
    if type(key) is not bytes:
        raise TypeError("keys must be bytes")
    if len(key) > _U32_MAX:
        raise ValueError("key longer than 2**32 - 1 bytes")


def encode_put(key, value):
    """Command setting key to value; its result is b""."""
    _check_key(key)
    return b"".join((b"P", _U32.pack(len(key)), key, value))


def encode_delete(key):
    """Command removing key; decode its result with decode_bool (True: it existed)."""
    _check_key(key)
    return b"D" + key


def encode_cas(key, expected, new):
    """Command setting key to new only if its value is expected (None: only if absent).

    Decode its result with decode_bool (True: swapped).
    """
    _check_key(key)
    if expected is None:
        guard = _CAS_EXPECTED.pack(0, 0)
        expected = b""
    else:
        guard = _CAS_EXPECTED.pack(1, len(expected))
    return b"".join((b"C", _U32.pack(len(key)), key, guard, expected, new))


def encode_get(key):
    """Query reading key; decode its result with decode_get."""
    _check_key(key)
    return b"G" + key


def decode_command(command):
    """Parse a key-value command or query into a tuple naming it: ("put", key, value),
    ("delete", key), ("cas", key, expected_or_None, new), ("get", key), and for the
    revisioned ones ("put_rev", key, value, lease), ("delete_rev", key),
    ("cas_rev", key, expected_or_None, new), ("get_rev", key), ("txn", compares,
    success, failure) (as encode_txn takes them), ("lease_grant", ttl_ms),
    ("lease_revoke", lease_id).
    """
    op = command[:1]
    if op == b"D" or op == b"d":
        return ("delete" if op == b"D" else "delete_rev", command[1:])
    if op == b"G" or op == b"g":
        return ("get" if op == b"G" else "get_rev", command[1:])
    if op == b"p":
        if len(command) < _PUT_REV_HEAD.size:
            raise ValueError("put command is truncated")
        _, lease, klen = _PUT_REV_HEAD.unpack_from(command)
        key_end = _PUT_REV_HEAD.size + klen
        if key_end > len(command):
            raise ValueError("command key overruns the command")
        return ("put_rev", command[_PUT_REV_HEAD.size:key_end], command[key_end:], lease)
    if op in (b"L", b"V"):
        if len(command) != 9:
            raise ValueError("lease command of a bad size")
        return ("lease_grant" if op == b"L" else "lease_revoke", _U64.unpack_from(command, 1)[0])
    if op == b"T":
        return ("txn",) + _decode_txn_command(command)
    if op == b"P" or op == b"C" or op == b"c":
        if len(command) < 5:
            raise ValueError("command shorter than its key length")
        key_end = 5 + _U32.unpack_from(command, 1)[0]
        if key_end > len(command):
            raise ValueError("command key overruns the command")
        key = command[5:key_end]
        if op == b"P":
            return ("put", key, command[key_end:])
        if key_end + 5 > len(command):
            raise ValueError("cas command is truncated")
        has_expected, expected_len = _CAS_EXPECTED.unpack_from(command, key_end)
        new_start = key_end + 5 + expected_len
        if has_expected > 1 or (has_expected == 0 and expected_len) or new_start > len(command):
            raise ValueError("cas command has a bad expected value")
        expected = command[key_end + 5:new_start] if has_expected else None
        return ("cas" if op == b"C" else "cas_rev", key, expected, command[new_start:])
    raise ValueError("unknown key-value command")


def _decode_txn_command(command):
    r = _Reader(command, 1)
    compares = []
    for _ in range(r.u32()):
        target, op = r.u8(), r.u8()
        key = r.take(r.u32())
        if target not in _COMPARE_TARGET_NAMES or op not in _COMPARE_OP_NAMES:
            raise ValueError("txn compare of an unknown kind")
        name = _COMPARE_TARGET_NAMES[target]
        if name == "absent":
            if op:
                raise ValueError("txn absent compare with an operator")
            compares.append(("absent", key))
        elif name == "value":
            compares.append((name, key, _COMPARE_OP_NAMES[op], r.take(r.u32())))
        else:
            compares.append((name, key, _COMPARE_OP_NAMES[op], r.u64()))
    branches = []
    for _ in range(2):
        ops = []
        for _ in range(r.u32()):
            kind = r.u8()
            key = r.take(r.u32())
            if kind == TXN_OPS["put"]:
                lease = r.u64()
                ops.append(("put", key, r.take(r.u32()), lease))
            elif kind in _TXN_OP_NAMES:
                ops.append((_TXN_OP_NAMES[kind], key))
            else:
                raise ValueError("txn operation of an unknown kind")
        branches.append(ops)
    r.end()
    return compares, branches[0], branches[1]


def decode_get(result):
    """The value a get query returned, or None if the key was absent."""
    if result[:1] == b"\x01":
        return result[1:]
    if result == b"\x00":
        return None
    raise ValueError("malformed get result")


def decode_bool(result):
    """The answer of a delete (key existed) or cas (swapped) command."""
    if result == b"\x01":
        return True
    if result == b"\x00":
        return False
    raise ValueError("malformed boolean result")


# ---------------------------------------------------------------------------
# The ordered, revisioned store: revisioned writes, ranges, history, transactions,
# leases (docs/internals.md, "Key-value commands").  Revisions and lease ids are
# u64; `lease` 0 means "no lease" on the wire.

_U64 = struct.Struct("<Q")
_U64_MAX = 2**64 - 1
_WRITE_RESULT = struct.Struct("<BQ")          # done, revision
_PUT_REV_HEAD = struct.Struct("<BQI")         # b"p", lease, klen
_RANGE_HEAD = struct.Struct("<BQIIBI")        # b"R", revision, limit, reply_bytes_max, has_end, slen
_RANGE_REPLY = struct.Struct("<BQQBI")        # status, revision, compact_revision, more, count
_RANGE_ITEM = struct.Struct("<IIQ")           # klen, vlen, mod_revision
_HISTORY_HEAD = struct.Struct("<BQIIIBI")     # b"H", start_revision, skip, limit, bytes, flags, slen
_HISTORY_REPLY = struct.Struct("<BQQBQII")    # status, revision, compact, more, next_rev, next_skip, count
_CHANGE_ITEM = struct.Struct("<QBQIII")       # revision, kind, prev_mod_revision, klen, vlen, pvlen
_GET_META = struct.Struct("<QQQQ")            # mod_revision, create_revision, version, lease
_STATUS = struct.Struct("<QQQQQQQ")
_LEASE_ITEM = struct.Struct("<QQQ")           # id, ttl_ms, key_count
_SNAPSHOT_KEY = struct.Struct("<IIQQQQ")      # klen, vlen, create, mod, version, lease

# The first bytes of a versioned KVStore snapshot (a version 0 one has none).
from .statemachine import SNAPSHOT_MAGIC  # noqa: E402

QUERY_OK = 0
"""Range or history query status: answered."""
QUERY_COMPACTED = 1
"""Range or history query status: the revision asked for is older than the history
window (the client raises cypaxos.CompactedError)."""
QUERY_FUTURE_REVISION = 2
"""Range query status: the revision asked for has not happened yet."""

CHANGE_PUT = 0
"""Change kind: the key was set."""
CHANGE_DELETE = 1
"""Change kind: the key was deleted."""

COMPARE_OPS = {"==": 0, "!=": 1, "<": 2, ">": 3}
"""Compare operators of a transaction and their codes."""
COMPARE_TARGETS = {"value": 0, "mod_revision": 1, "absent": 2, "create_revision": 3,
                   "version": 4}
"""What a transaction compare looks at, and its code."""
TXN_OPS = {"put": 0, "delete": 1, "get": 2}
"""Operations of a transaction and their codes."""
_COMPARE_OP_NAMES = {v: k for k, v in COMPARE_OPS.items()}
_COMPARE_TARGET_NAMES = {v: k for k, v in COMPARE_TARGETS.items()}
_TXN_OP_NAMES = {v: k for k, v in TXN_OPS.items()}


class KeyValue(NamedTuple):
    """One key of a range: its value and the revision of its last change."""

    key: bytes
    value: bytes
    revision: int


class KeyMeta(NamedTuple):
    """A key's value and revisions, as a revisioned get returns them."""

    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int        # 0: none


class GetResult(NamedTuple):
    """A revisioned get: the store's revision and the key (None if absent)."""

    revision: int
    kv: "KeyMeta | None"


class WriteResult(NamedTuple):
    """What a revisioned write did: `done` (put: the lease existed; delete and lease
    revoke: it existed; cas: swapped) and the store's revision after it (the one it
    made if it changed anything)."""

    done: bool
    revision: int


class RangeResult(NamedTuple):
    """A range query's answer.  `status` is QUERY_OK, QUERY_COMPACTED or
    QUERY_FUTURE_REVISION (then `items` is empty and `revision` is the current one);
    `more`: items past the last were left out (limit or size bound)."""

    status: int
    revision: int
    compact_revision: int
    more: bool
    items: list


class Change(NamedTuple):
    """One change of the history: `kind` CHANGE_PUT or CHANGE_DELETE; `value` None for
    a delete; `prev_value` None if the key was absent before (then `prev_revision` is
    0), or if the query did not ask for previous values."""

    revision: int
    kind: int
    key: bytes
    value: "bytes | None"
    prev_value: "bytes | None"
    prev_revision: int


class HistoryResult(NamedTuple):
    """A history query's answer: ask next with `next_revision` and `next_skip`
    (`status` QUERY_COMPACTED: the start is older than the window)."""

    status: int
    revision: int
    compact_revision: int
    more: bool
    next_revision: int
    next_skip: int
    changes: list


class TxnResult(NamedTuple):
    """A transaction's answer (the fields of cypaxos.TxnResult, then one more).  `lease_missing` is the id of a lease that a put of the
    chosen branch names and that does not exist (then nothing was done and `results`
    is empty), else 0.  One result per operation: None for a put, a bool for a delete
    (the key existed), a KeyMeta or None for a get."""

    succeeded: bool
    results: list
    revision: int
    lease_missing: int = 0


class LeaseInfo(NamedTuple):
    """A lease: its id, its TTL (milliseconds, as granted) and how many keys it holds."""

    id: int
    ttl_ms: int
    key_count: int


class LeaseKeys(NamedTuple):
    """A lease keys query's answer (`found` False: no such lease)."""

    found: bool
    ttl_ms: int
    more: bool
    keys: list


class StoreStatus(NamedTuple):
    """The store's counters."""

    revision: int
    compact_revision: int
    key_count: int
    lease_count: int
    next_lease_id: int
    history_changes: int
    history_bytes: int


class KVSnapshot(NamedTuple):
    """A decoded KVStore snapshot: keys as (key, KeyMeta) in key order, leases as
    (id, ttl_ms), the history window as Change tuples (previous values included)."""

    revision: int
    compact_revision: int
    next_lease_id: int
    keys: list
    leases: list
    changes: list


def _check_u64(value, what):
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must be an int in [0, 2**64)")


def _check_u32(value, what):
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise ValueError(f"{what} must be an int in [0, 2**32)")


def _check_value(value):
    if type(value) is not bytes:
        raise TypeError("values must be bytes")


def prefix_end(prefix):
    """The smallest key greater than every key starting with `prefix` (None: no
    such key, when the prefix is empty or all 0xff bytes)."""
    _check_key(prefix)
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes((stripped[-1] + 1,))


def _key_range(start, end, prefix, key=None):
    if key is not None:
        if start or end is not None or prefix is not None:
            raise ValueError("give a key, a prefix or a range, not several")
        _check_key(key)
        return key, key + b"\x00"
    if prefix is not None:
        if start or end is not None:
            raise ValueError("give a prefix or a range, not both")
        return prefix, prefix_end(prefix)
    _check_key(start)
    if end is not None:
        _check_key(end)
    return start, end


def encode_put_rev(key, value, lease=0):
    """Command setting key to value, attached to `lease` (0: none; a put without a
    lease detaches the key from its lease).  decode_write: done False if the lease
    does not exist (nothing changed)."""
    _check_key(key)
    _check_value(value)
    _check_u64(lease, "lease")
    return b"".join((_PUT_REV_HEAD.pack(0x70, lease, len(key)), key, value))


def encode_delete_rev(key):
    """Command removing key; decode_write: done True if it existed."""
    _check_key(key)
    return b"d" + key


def encode_cas_rev(key, expected, new):
    """encode_cas, answered with the revision too; decode_write: done True if swapped."""
    return b"c" + encode_cas(key, expected, new)[1:]


def encode_lease_grant(ttl_ms):
    """Command creating a lease (the store picks its id); decode_lease_grant."""
    _check_u64(ttl_ms, "ttl_ms")
    return b"L" + _U64.pack(ttl_ms)


def encode_lease_revoke(lease_id):
    """Command deleting a lease and every key attached to it, at one revision;
    decode_write: done True if the lease existed."""
    _check_u64(lease_id, "lease_id")
    return b"V" + _U64.pack(lease_id)


def _encode_compare(compare):
    target = compare[0]
    if target == "absent":
        if len(compare) != 2:
            raise ValueError("an absent compare is ('absent', key)")
        _check_key(compare[1])
        return b"".join((bytes((2, 0)), _U32.pack(len(compare[1])), compare[1]))
    if len(compare) != 4 or target not in COMPARE_TARGETS or compare[2] not in COMPARE_OPS:
        raise ValueError(f"bad compare {compare!r}")
    _, key, op, operand = compare
    _check_key(key)
    head = bytes((COMPARE_TARGETS[target], COMPARE_OPS[op])) + _U32.pack(len(key)) + key
    if target == "value":
        _check_value(operand)
        return b"".join((head, _U32.pack(len(operand)), operand))
    _check_u64(operand, target)
    return head + _U64.pack(operand)


def _encode_txn_op(op):
    kind = op[0]
    if kind == "put":
        if len(op) not in (3, 4):
            raise ValueError("a put is ('put', key, value[, lease])")
        key, value = op[1], op[2]
        lease = op[3] if len(op) == 4 else 0
        _check_key(key)
        _check_value(value)
        _check_u64(lease, "lease")
        return b"".join((b"\x00", _U32.pack(len(key)), key, _U64.pack(lease),
                         _U32.pack(len(value)), value))
    if kind in ("delete", "get") and len(op) == 2:
        _check_key(op[1])
        return b"".join((bytes((TXN_OPS[kind],)), _U32.pack(len(op[1])), op[1]))
    raise ValueError(f"bad transaction operation {op!r}")


def encode_txn(compares, success, failure=()):
    """Command running `success` if every compare holds, else `failure`, atomically
    and at one revision.  Compares: ("value", key, op, bytes), ("mod_revision" |
    "create_revision" | "version", key, op, int), ("absent", key), with op one of
    "==", "!=", "<", ">" (an absent key's revisions and version are 0, and a value
    compare on it is false).  Operations: ("put", key, value[, lease]),
    ("delete", key), ("get", key).  decode_txn reads the result."""
    parts = [b"T"]
    for items, encode in ((compares, _encode_compare), (success, _encode_txn_op),
                          (failure, _encode_txn_op)):
        items = list(items)
        parts.append(_U32.pack(len(items)))
        parts.extend(encode(item) for item in items)
    return b"".join(parts)


def encode_get_rev(key):
    """Query reading key with its revisions; decode_get_rev."""
    _check_key(key)
    return b"g" + key


def encode_range(start=b"", end=None, *, prefix=None, limit=0, revision=0,
                 reply_bytes_max=0):
    """Query listing keys in [start, end) (end None: no upper bound) or with a prefix,
    in key order, at most `limit` (0: any number) and about `reply_bytes_max` bytes
    (0: the store's default), as of `revision` (0: now); decode_range.  To page,
    ask again from the last key + b"\\x00" at the revision of the first answer."""
    start, end = _key_range(start, end, prefix)
    _check_u64(revision, "revision")
    _check_u32(limit, "limit")
    _check_u32(reply_bytes_max, "reply_bytes_max")
    head = _RANGE_HEAD.pack(0x52, revision, limit, reply_bytes_max, end is not None,
                            len(start))
    return b"".join((head, start, end or b""))


def encode_history(start_revision, *, key=None, start=b"", end=None, prefix=None,
                   skip=0, limit=0, reply_bytes_max=0, with_prev=False):
    """Query listing the changes from `start_revision` on (skipping the first `skip`
    that match at start_revision) to one key, a prefix or [start, end), oldest
    first; decode_history, then ask again with its next_revision and next_skip."""
    start, end = _key_range(start, end, prefix, key)
    _check_u64(start_revision, "start_revision")
    _check_u32(skip, "skip")
    _check_u32(limit, "limit")
    _check_u32(reply_bytes_max, "reply_bytes_max")
    flags = (end is not None) | (2 if with_prev else 0)
    head = _HISTORY_HEAD.pack(0x48, start_revision, skip, limit, reply_bytes_max, flags,
                              len(start))
    return b"".join((head, start, end or b""))


def encode_lease_list(start_id=0, reply_bytes_max=0):
    """Query listing leases with ids >= start_id in id order; decode_lease_list."""
    _check_u64(start_id, "start_id")
    _check_u32(reply_bytes_max, "reply_bytes_max")
    return b"E" + _U64.pack(start_id) + _U32.pack(reply_bytes_max)


def encode_lease_keys(lease_id, start=b"", reply_bytes_max=0):
    """Query listing a lease's keys >= start in key order; decode_lease_keys."""
    _check_u64(lease_id, "lease_id")
    _check_u32(reply_bytes_max, "reply_bytes_max")
    _check_key(start)
    return b"K" + _U64.pack(lease_id) + _U32.pack(reply_bytes_max) + start


def encode_store_status():
    """Query of the store's counters; decode_store_status."""
    return b"S"


class _Reader:
    """Reads a result's fields in order; a short or long result raises ValueError."""

    __slots__ = ("data", "pos")

    def __init__(self, data, pos=0):
        self.data = bytes(data)
        self.pos = pos

    def take(self, n):
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise ValueError("result is truncated")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt):
        values = fmt.unpack_from(self.data, self.pos) if self.pos + fmt.size <= len(self.data) \
            else None
        if values is None:
            raise ValueError("result is truncated")
        self.pos += fmt.size
        return values

    def u8(self):
        return self.take(1)[0]

    def u32(self):
        return self.unpack(_U32)[0]

    def u64(self):
        return self.unpack(_U64)[0]

    def flag(self):
        value = self.u8()
        if value > 1:
            raise ValueError("result has a bad flag byte")
        return bool(value)

    def end(self):
        if self.pos != len(self.data):
            raise ValueError("result has trailing bytes")


def decode_write(result):
    """The WriteResult of a revisioned put, delete or cas, or of a lease revoke."""
    r = _Reader(result)
    done = r.flag()
    revision = r.u64()
    r.end()
    return WriteResult(done, revision)


def decode_lease_grant(result):
    """The id of the lease a grant made."""
    r = _Reader(result)
    lease_id = r.u64()
    r.end()
    return lease_id


def _read_meta(r):
    if not r.flag():
        return None
    mod, create, version, lease = r.unpack(_GET_META)
    return mod, create, version, lease


def decode_get_rev(result):
    """The GetResult of a revisioned get."""
    r = _Reader(result)
    found = r.flag()
    revision = r.u64()
    if not found:
        r.end()
        return GetResult(revision, None)
    mod, create, version, lease = r.unpack(_GET_META)
    return GetResult(revision, KeyMeta(r.data[r.pos:], mod, create, version, lease))


def decode_range(result):
    """The RangeResult of a range query."""
    r = _Reader(result)
    status, revision, compact, more, count = r.unpack(_RANGE_REPLY)
    if status > QUERY_FUTURE_REVISION or more > 1:
        raise ValueError("range result has a bad header")
    items = []
    for _ in range(count):
        klen, vlen, mod = r.unpack(_RANGE_ITEM)
        key = r.take(klen)
        items.append(KeyValue(key, r.take(vlen), mod))
    r.end()
    return RangeResult(status, revision, compact, bool(more), items)


def decode_history(result):
    """The HistoryResult of a history query."""
    r = _Reader(result)
    status, revision, compact, more, next_rev, next_skip, count = r.unpack(_HISTORY_REPLY)
    if status > QUERY_COMPACTED or more > 1:
        raise ValueError("history result has a bad header")
    changes = []
    for _ in range(count):
        rev, kind, prev_rev, klen, vlen, pvlen = r.unpack(_CHANGE_ITEM)
        if kind > CHANGE_DELETE:
            raise ValueError("history result has a bad change kind")
        key = r.take(klen)
        value = r.take(vlen)
        # 0xffffffff: previous values were not asked for.
        prev = None if pvlen == _U32_MAX else r.take(pvlen)
        changes.append(Change(rev, kind, key, value if kind == CHANGE_PUT else None,
                              prev if prev_rev else None, prev_rev))
    r.end()
    return HistoryResult(status, revision, compact, bool(more), next_rev, next_skip, changes)


def decode_txn(result):
    """The TxnResult of a transaction."""
    r = _Reader(result)
    code = r.u8()
    if code == 1:
        lease, revision = r.unpack(struct.Struct("<QQ"))
        r.end()
        return TxnResult(False, [], revision, lease)
    if code != 0:
        raise ValueError("txn result has a bad code")
    succeeded = r.flag()
    revision = r.u64()
    results = []
    for _ in range(r.u32()):
        kind = r.u8()
        body = _Reader(r.take(r.u32()))
        if kind == TXN_OPS["put"]:
            results.append(None)
        elif kind == TXN_OPS["delete"]:
            results.append(body.flag())
        elif kind == TXN_OPS["get"]:
            meta = _read_meta(body)
            results.append(None if meta is None else KeyMeta(body.data[body.pos:], *meta))
            body.pos = len(body.data)
        else:
            raise ValueError("txn result has a bad operation kind")
        body.end()
    r.end()
    return TxnResult(succeeded, results, revision, 0)


def decode_lease_list(result):
    """(more, [LeaseInfo, ...]) of a lease list query."""
    r = _Reader(result)
    more = r.flag()
    leases = [LeaseInfo(*r.unpack(_LEASE_ITEM)) for _ in range(r.u32())]
    r.end()
    return more, leases


def decode_lease_keys(result):
    """The LeaseKeys of a lease keys query."""
    r = _Reader(result)
    found = r.flag()
    ttl_ms = r.u64()
    more = r.flag()
    keys = [r.take(r.u32()) for _ in range(r.u32())]
    r.end()
    return LeaseKeys(found, ttl_ms, more, keys)


def decode_store_status(result):
    """The StoreStatus of a status query."""
    r = _Reader(result)
    status = StoreStatus(*r.unpack(_STATUS))
    r.end()
    return status


def decode_kv_snapshot(data):
    """Decode a KVStore snapshot (of version 1, or 0: keys and values only, each as
    created at revision 1) into a KVSnapshot."""
    if not data.startswith(SNAPSHOT_MAGIC):
        r = _Reader(data)
        keys = []
        while r.pos < len(r.data):
            klen, vlen = r.unpack(struct.Struct("<II"))
            key = r.take(klen)
            keys.append((key, KeyMeta(r.take(vlen), 1, 1, 1, 0)))
        keys.sort()
        revision = 1 if keys else 0
        return KVSnapshot(revision, revision, 1, keys, [], [])
    r = _Reader(data, len(SNAPSHOT_MAGIC))
    if r.u32() != 1:
        raise ValueError("KVStore snapshot of an unknown version")
    revision, compact, next_lease = r.u64(), r.u64(), r.u64()
    keys = []
    for _ in range(r.u64()):
        klen, vlen, create, mod, version, lease = r.unpack(_SNAPSHOT_KEY)
        key = r.take(klen)
        keys.append((key, KeyMeta(r.take(vlen), mod, create, version, lease)))
    leases = [(r.u64(), r.u64()) for _ in range(r.u64())]
    changes = []
    for _ in range(r.u64()):
        rev, kind, prev_rev, klen, vlen, pvlen = r.unpack(_CHANGE_ITEM)
        key = r.take(klen)
        value = r.take(vlen)
        prev = r.take(pvlen)
        changes.append(Change(rev, kind, key, value if kind == CHANGE_PUT else None,
                              prev if prev_rev else None, prev_rev))
    r.end()
    return KVSnapshot(revision, compact, next_lease, keys, leases, changes)
