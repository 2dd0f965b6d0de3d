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
from .protocol import RESULT_ERROR, RESULT_OK, RESULT_RETRY, RESULT_SESSION_EXPIRED

__all__ = [
    "RESULT_OK", "RESULT_ERROR", "RESULT_SESSION_EXPIRED", "RESULT_RETRY",
    "BATCH_HEADER_BYTES", "SEQ_LIMIT", "ClientBatch", "pack_client_batch",
    "unpack_client_batch", "unpack_client_batches", "pack_results", "unpack_results",
    "all_ok_empty", "encode_puts", "encode_gets", "decode_gets",
    "encode_put", "encode_delete", "encode_cas", "encode_get", "decode_command",
    "decode_get", "decode_bool",
]

# Result statuses (cypaxos.protocol; docs/internals.md, "Slot values and client batches"):
# OK, the command was applied and the bytes are its result; ERROR, the state machine
# raised and the bytes are the error text (UTF-8); SESSION_EXPIRED, the session is gone
# and the command may have been applied; RETRY, earlier commands of the session are
# not applied yet: resend them first.

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
    """Parse a key-value command or query into ("put", key, value), ("delete", key),
    ("cas", key, expected_or_None, new) or ("get", key).
    """
    op = command[:1]
    if op == b"D":
        return ("delete", command[1:])
    if op == b"G":
        return ("get", command[1:])
    if op == b"P" or op == b"C":
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
        return ("cas", key, expected, command[new_start:])
    raise ValueError("unknown key-value command")


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
