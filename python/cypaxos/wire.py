"""Frames and message shapes on the wire (docs/internals.md, "Peer messages" and "Wire").

Sans-I/O: nothing here touches a socket.  The shell feeds received bytes to a
`FrameDecoder`, takes decoded CBOR bodies out with `next_frame()`, and checks each
one with `parse_hello`, `parse_peer_message`, `parse_client_request` or `parse_reply`
before acting on it.  Every violation raises `ProtocolError`, after which the
connection should be closed (with one log line).

A frame is `u32 big-endian body length | CBOR body`.  Bodies of plain arrays, ints
and strings (every message) are decoded by cypaxos.cbordec straight from the receive
buffer; anything else, malformed input included, by cbor2's compiled extension (Rust
in cbor2 >= 6, C before) with every CBOR tag refused: the
protocol uses none, and some built-in tag decoders (decimal, bigfloat, fraction) take
time quadratic in the body size, so an unauthenticated client could stall the event
loop with one frame.  Map keys must be strings or bytes (int keys with colliding hashes
would be another quadratic stall).
"""
import struct
import warnings

import cbor2

from .cbordec import FALLBACK as _FALLBACK
from .cbordec import decode as _decode_fast
from .cborenc import encode_frame as _encode_frame

__all__ = [
    "ProtocolError", "FRAME_BYTES_MAX", "INT_LIMIT", "CBOR_ACCELERATED",
    "FrameDecoder", "decode_body", "encode_frame", "encode_frames",
    "PREPARE", "PROMISE", "NACK", "ACCEPT", "ACCEPTED", "HEARTBEAT", "HEARTBEAT_ACK",
    "CATCHUP_REQ", "CHOSEN", "SNAPSHOT_CHUNK", "SNAPSHOT_ACK", "PREVOTE", "PREVOTE_ACK", "MESSAGE_NAMES", "parse_peer_message", "encode_peer_message",
    "peer_hello", "client_hello", "parse_hello", "welcome", "parse_welcome",
    "submit_request", "read_request", "status_request", "snapshot_request",
    "parse_client_request", "ERROR_CODES", "ok", "redirect", "error", "parse_reply",
]


class ProtocolError(ValueError):
    """The other side broke the wire protocol; close the connection."""


FRAME_BYTES_MAX = 16 * 1024 * 1024
"""Default limit on a frame's body length, in bytes."""

INT_LIMIT = 2**63
"""Every integer field on the wire is in [0, INT_LIMIT) (an int64 in the core)."""

REPLICA_ID_MAX = 0xFFFF
"""Replica ids are 1..REPLICA_ID_MAX: a ballot keeps the id in its low 16 bits."""

_LENGTH = struct.Struct(">I")
_LENGTH_MAX = 0xFFFFFFFF
_SMALL_BODY = 4096  # below this, copying a body twice beats setting up a memoryview


# ---------------------------------------------------------------------------
# CBOR bodies

def _reject_tag(*args):
    # Called with (tag, immutable) by cbor2 >= 6 and (decoder, tag) before.
    raise ProtocolError("CBOR tags are not allowed")


# The tags cbor2 6 decodes itself, found by decoding every tag in [0, 70000) and the
# largest ones; tests/test_wire.py re-checks that range, so a cbor2 upgrade adding a
# built-in decoder fails loudly there.  Every other tag reaches _reject_tag.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258,
                 260, 261, 1004, 43000, 55799)
_SAFE_OPTIONS = {
    "semantic_decoders": dict.fromkeys(_BUILTIN_TAGS, _reject_tag),
    "tag_hook": _reject_tag,
    "strict_hashable_types": True,
}
try:
    cbor2.loads(b"\x00", **_SAFE_OPTIONS)
except TypeError:
    # cbor2 < 6 cannot override its built-in tag decoders; unknown tags are still refused.
    _SAFE_OPTIONS = {"tag_hook": _reject_tag}
    warnings.warn("cbor2 < 6 decodes built-in CBOR tags from untrusted peers; "
                  "upgrade to cbor2 >= 6", RuntimeWarning, stacklevel=1)

CBOR_ACCELERATED = type(cbor2.loads).__name__ == "builtin_function_or_method"
"""True when cbor2 runs compiled code; False means cbor2 5.x's pure-Python fallback."""

_loads = cbor2.loads


def decode_body(body):
    """Decode one frame body (bytes) into Python objects; ProtocolError if invalid.

    Bytes after the first CBOR item are ignored (cbor2 does not report them and the
    length prefix already delimits the frame, so they cannot desynchronize the stream).
    """
    obj = _decode_fast(body)
    return obj if obj is not _FALLBACK else _decode_cbor2(body)


def _decode_cbor2(body):
    try:
        return _loads(body, **_SAFE_OPTIONS)
    except ProtocolError:
        raise
    except Exception as exc:
        # cbor2 versions differ in what they raise for malformed input (CBORDecodeError,
        # ValueError, TypeError, OverflowError, RecursionError...); all of it is the
        # sender's fault.
        raise ProtocolError(f"body is not valid CBOR: {str(exc)[:100]}") from exc


# ---------------------------------------------------------------------------
# Frames

class FrameDecoder:
    """Split a byte stream into frames and decode their CBOR bodies (sans-I/O).

    Call `feed()` with whatever the socket returned, then `next_frame()` until it
    returns None.  Received bytes live in one bytearray read from an offset, so a
    big frame's body is copied out once, not once per read; the consumed prefix is
    dropped once it is at least half the buffer, which keeps the work linear in the
    bytes received.
    """

    __slots__ = ("_buffer", "_offset", "_frame_bytes_max")

    def __init__(self, frame_bytes_max=FRAME_BYTES_MAX):
        """Refuse any frame whose body is longer than frame_bytes_max bytes."""
        if type(frame_bytes_max) is not int or not 0 <= frame_bytes_max <= _LENGTH_MAX:
            raise ValueError("frame_bytes_max must be an int in [0, 2**32)")
        self._buffer = bytearray()
        self._offset = 0
        self._frame_bytes_max = frame_bytes_max

    @property
    def buffered(self):
        """Bytes received but not yet returned as frames (nonzero at EOF: a torn frame)."""
        return len(self._buffer) - self._offset

    def feed(self, data):
        """Append received bytes.  Raises ProtocolError if the next frame is oversized.

        Checking here too (not only in next_frame) means that even a caller who feeds
        without draining never buffers more than one read past an oversized header.
        """
        buffer = self._buffer
        offset = self._offset
        if offset and offset * 2 >= len(buffer):
            # What remains is no longer than what was consumed: amortized O(1) a byte.
            del buffer[:offset]
            self._offset = offset = 0
        buffer += data
        if len(buffer) - offset >= 4:
            self._check_length(_LENGTH.unpack_from(buffer, offset)[0])

    def next_frame(self):
        """Return the next decoded frame body, or None until more bytes arrive.

        Raises ProtocolError on an oversized length prefix (the decoder then stays
        stuck on it) or an invalid CBOR body (that frame is skipped).  A body of CBOR
        null is invalid too: None means "no frame yet", and no message is null.
        """
        buffer = self._buffer
        offset = self._offset
        start = offset + 4
        if len(buffer) < start:
            return None
        length = _LENGTH.unpack_from(buffer, offset)[0]
        self._check_length(length)
        end = start + length
        if len(buffer) < end:
            return None
        # Straight from the buffer when the body is plain arrays, ints and strings
        # (every message is); anything else is cbor2's to decode or refuse.
        obj = _decode_fast(buffer, start, end)
        if obj is _FALLBACK:
            if length < _SMALL_BODY:
                body = bytes(buffer[start:end])
            else:
                # One copy instead of two, worth a memoryview's fixed cost (~0.5 us).
                with memoryview(buffer) as view:
                    body = bytes(view[start:end])
        if end == len(buffer):
            # Drained: start afresh rather than keep a (maybe 16 MiB) buffer alive.
            self._buffer = bytearray()
            self._offset = 0
        else:
            self._offset = end
        if obj is _FALLBACK:
            obj = _decode_cbor2(body)
        if obj is None:
            raise ProtocolError("frame body is CBOR null")
        return obj

    def _check_length(self, length):
        if length > self._frame_bytes_max:
            raise ProtocolError(
                f"frame body of {length} bytes exceeds the limit of {self._frame_bytes_max}")


def encode_frame(obj):
    """Return `obj` CBOR-encoded as one frame (bytes).  Tuples become arrays.

    The body is what cbor2.dumps writes, encoded by cborenc in one pass and one copy.
    """
    return _encode_frame(obj)


def encode_frames(objs):
    """Return several objects as consecutive frames in one bytes (one socket write)."""
    return b"".join([encode_frame(obj) for obj in objs])


# ---------------------------------------------------------------------------
# Peer messages

PREPARE = 1
PROMISE = 2
NACK = 3
ACCEPT = 4
ACCEPTED = 5
HEARTBEAT = 6
HEARTBEAT_ACK = 7
CATCHUP_REQ = 8
CHOSEN = 9
# Snapshot transfer is the shell's business, not the core's: in these two the third
# field is the snapshot's index rather than a ballot.
SNAPSHOT_CHUNK = 10
SNAPSHOT_ACK = 11
PREVOTE = 12
PREVOTE_ACK = 13

MESSAGE_NAMES = {
    PREPARE: "PREPARE", PROMISE: "PROMISE", NACK: "NACK", ACCEPT: "ACCEPT",
    ACCEPTED: "ACCEPTED", HEARTBEAT: "HEARTBEAT", HEARTBEAT_ACK: "HEARTBEAT_ACK",
    CATCHUP_REQ: "CATCHUP_REQ", CHOSEN: "CHOSEN", SNAPSHOT_CHUNK: "SNAPSHOT_CHUNK",
    SNAPSHOT_ACK: "SNAPSHOT_ACK", PREVOTE: "PREVOTE", PREVOTE_ACK: "PREVOTE_ACK",
}
"""Peer message type -> name, for log lines."""

# Field kinds after (type, src, ballot).
_INT = 0      # int in [0, INT_LIMIT)
_VALUES = 1   # list of bytes
_ENTRIES = 2  # flat list of (slot: int, ballot: int, value: bytes) triples
_BYTES = 3    # bytes

_PEER_FIELDS = {
    PREPARE: (("from_slot", _INT),),
    PROMISE: (("commit_index", _INT), ("entries", _ENTRIES)),
    NACK: (),
    ACCEPT: (("first_slot", _INT), ("values", _VALUES), ("commit_index", _INT)),
    ACCEPTED: (("first_slot", _INT), ("count", _INT), ("commit_index", _INT)),
    HEARTBEAT: (("commit_index", _INT), ("read_ctx", _INT)),
    HEARTBEAT_ACK: (("read_ctx", _INT), ("commit_index", _INT)),
    CATCHUP_REQ: (("from_slot", _INT),),
    CHOSEN: (("first_slot", _INT), ("values", _VALUES)),
    SNAPSHOT_CHUNK: (("offset", _INT), ("total", _INT), ("data", _BYTES)),
    SNAPSHOT_ACK: (("next_offset", _INT),),
    PREVOTE: (),
    PREVOTE_ACK: (("granted", _INT),),
}


def _brief(value):
    # For error messages: never repr a container or long string (megabytes, maybe).
    kind = type(value)
    if kind is str:
        return repr(value[:20])
    if kind is bool or (kind is int and -2**64 <= value < 2**64):
        return repr(value)
    return kind.__name__


def _is_wire_int(value):
    # type() rather than isinstance(): bool is an int subclass and must not pass.
    return type(value) is int and 0 <= value < INT_LIMIT


def _is_bytes_list(values):
    if type(values) is not list:
        return False
    for value in values:
        if type(value) is not bytes:
            return False
    return True


def _is_entries(entries):
    if type(entries) is not list or len(entries) % 3:
        return False
    triples = iter(entries)
    for slot, ballot, value in zip(triples, triples, triples):
        if (type(slot) is not int or type(ballot) is not int or type(value) is not bytes
                or not 0 <= slot < INT_LIMIT or not 0 <= ballot < INT_LIMIT):
            return False
    return True


_CHECKS = {_INT: _is_wire_int, _VALUES: _is_bytes_list, _ENTRIES: _is_entries,
           _BYTES: lambda value: type(value) is bytes}
_KIND_TEXT = {_INT: "an int in [0, 2**63)", _VALUES: "a list of bytes",
              _ENTRIES: "a flat list of [slot, ballot, value] triples", _BYTES: "bytes"}


def parse_peer_message(obj, cluster_ids, self_id, peer_id):
    """Check a decoded peer message and return it as the core's tuple.

    `peer_id` is the id the connection's hello established: a message whose src
    differs is refused, as is any peer that is not another member of `cluster_ids`.
    """
    if type(obj) is not list or len(obj) < 3:
        raise ProtocolError("peer message is not an array of at least 3 items")
    kind = obj[0]
    # type() check first: True == 1 would otherwise find PREPARE's fields.
    fields = _PEER_FIELDS.get(kind) if type(kind) is int else None
    if fields is None:
        raise ProtocolError(f"unknown peer message type {_brief(kind)}")
    if len(obj) != 3 + len(fields):
        raise ProtocolError(f"{MESSAGE_NAMES[kind]} has {len(obj)} items, "
                            f"expected {3 + len(fields)}")
    src = obj[1]
    if type(src) is not int or src != peer_id:
        raise ProtocolError(f"{MESSAGE_NAMES[kind]} claims src {_brief(src)} "
                            f"on the connection of replica {peer_id}")
    if peer_id == self_id or peer_id not in cluster_ids:
        raise ProtocolError(f"replica {peer_id} is not another member of the cluster")
    if not _is_wire_int(obj[2]):
        raise ProtocolError(f"{MESSAGE_NAMES[kind]}: ballot is not {_KIND_TEXT[_INT]}")
    for index, (name, field_kind) in enumerate(fields, 3):
        if not _CHECKS[field_kind](obj[index]):
            raise ProtocolError(f"{MESSAGE_NAMES[kind]}: {name} is not {_KIND_TEXT[field_kind]}")
    return tuple(obj)


def encode_peer_message(message):
    """Return a core message tuple as one frame."""
    return encode_frame(message)


# ---------------------------------------------------------------------------
# Hello and welcome

def peer_hello(cluster_id, replica_id):
    """The first frame's body a replica sends when it dials a peer."""
    return ["peer", cluster_id, replica_id]


def client_hello():
    """The first frame's body a client sends."""
    return ["client"]


def _is_replica_id(value):
    return type(value) is int and 1 <= value <= REPLICA_ID_MAX


CLUSTER_ID_CHARS_MAX = 128


def _is_cluster_id(value):
    return type(value) is str and 0 < len(value) <= CLUSTER_ID_CHARS_MAX


def parse_hello(obj):
    """Check a connection's first frame: ("peer", cluster_id, replica_id) or ("client",).

    The caller compares cluster_id with its own and replica_id with the membership.
    """
    if type(obj) is list and obj:
        if obj[0] == "peer" and len(obj) == 3:
            if _is_cluster_id(obj[1]) and _is_replica_id(obj[2]):
                return ("peer", obj[1], obj[2])
            raise ProtocolError("peer hello with a bad cluster id or replica id")
        if obj[0] == "client" and len(obj) == 1:
            return ("client",)
    raise ProtocolError("first frame is neither ['peer', cluster_id, replica_id] nor ['client']")


def welcome(cluster_id, replica_id):
    """The reply body to a valid hello."""
    return ["welcome", cluster_id, replica_id]


def parse_welcome(obj):
    """Check the reply to a hello; return (cluster_id, replica_id) of the replica."""
    if (type(obj) is list and len(obj) == 3 and obj[0] == "welcome"
            and _is_cluster_id(obj[1]) and _is_replica_id(obj[2])):
        return (obj[1], obj[2])
    raise ProtocolError("reply to hello is not ['welcome', cluster_id, replica_id]")


# ---------------------------------------------------------------------------
# Client requests and replies

def submit_request(request_id, client_batch):
    """The body of a request to replicate a client batch (see cypaxos.commands)."""
    return ["submit", request_id, client_batch]


def read_request(request_id, queries, stale=False):
    """The body of a request to answer queries (stale=True: any replica, no read index)."""
    return ["read", request_id, list(queries), stale]


def status_request(request_id):
    """The body of a request for the replica's status."""
    return ["status", request_id]


def snapshot_request(request_id):
    """The body of a request to take a snapshot."""
    return ["snapshot", request_id]


def parse_client_request(obj):
    """Check a decoded client request and return it as a tuple.

    ("submit", id, client_batch), ("read", id, [query, ...], stale), ("status", id) or
    ("snapshot", id).  The client batch's inner layout is left to the core.
    """
    if type(obj) is not list or len(obj) < 2 or type(obj[0]) is not str:
        raise ProtocolError("client request is not [op, request_id, ...]")
    op = obj[0]
    request_id = obj[1]
    if not _is_wire_int(request_id):
        raise ProtocolError("client request id is not an int in [0, 2**63)")
    n = len(obj)
    if op == "submit":
        if n == 3 and type(obj[2]) is bytes:
            return ("submit", request_id, obj[2])
    elif op == "read":
        if n == 4 and _is_bytes_list(obj[2]) and type(obj[3]) is bool:
            return ("read", request_id, obj[2], obj[3])
    elif op == "status" or op == "snapshot":
        if n == 2:
            return (op, request_id)
    else:
        raise ProtocolError(f"unknown client request {_brief(op)}")
    raise ProtocolError(f"malformed {op} request")


ERROR_CODES = frozenset({"busy", "too_large", "bad_request", "shutting_down"})
"""The codes an error reply may carry."""


def ok(request_id, payload):
    """A success reply body: payload is bytes, a list of bytes, a dict or an int."""
    return ["ok", request_id, payload]


def redirect(request_id, address):
    """A reply body saying "not the leader": address is the leader's (a str) or None."""
    if address is not None and type(address) is not str:
        raise TypeError("address must be a str or None")
    return ["redirect", request_id, address]


def error(request_id, code, message):
    """A failure reply body; code is one of ERROR_CODES."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return ["error", request_id, code, message]


def _is_ok_payload(payload):
    kind = type(payload)
    if kind is bytes or kind is dict:
        return True
    if kind is list:
        return _is_bytes_list(payload)
    return _is_wire_int(payload)


def parse_reply(obj):
    """Check a decoded reply (client side) and return it as a tuple.

    ("ok", id, payload), ("redirect", id, address_or_None) or ("error", id, code,
    message).  Codes outside ERROR_CODES are passed through, so old clients survive
    new codes.
    """
    if type(obj) is not list or len(obj) < 3 or not _is_wire_int(obj[1]):
        raise ProtocolError("reply is not [status, request_id, ...]")
    status = obj[0]
    n = len(obj)
    if status == "ok":
        if n == 3 and _is_ok_payload(obj[2]):
            return ("ok", obj[1], obj[2])
    elif status == "redirect":
        if n == 3 and (obj[2] is None or type(obj[2]) is str):
            return ("redirect", obj[1], obj[2])
    elif status == "error":
        if n == 4 and type(obj[2]) is str and type(obj[3]) is str:
            return ("error", obj[1], obj[2], obj[3])
    raise ProtocolError(f"malformed reply {_brief(status)}")
