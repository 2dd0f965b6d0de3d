"""Message shapes on the wire (docs/internals.md, "Peer messages" and "Wire").

Sans-I/O: the shell checks each decoded frame body with `parse_peer_message`,
`parse_client_request` or `parse_reply` before acting on it; every violation raises
`ProtocolError` (then close the connection, with one log line).  The frames before
those, the handshake, are `cypaxos.security.handshake`'s.

Message numbers come from cypaxos.protocol, the one table the core compiles in too.
"""
from ..ballots import REPLICA_ID_MAX
from ..protocol import (
    ACCEPT, ACCEPTED, CATCHUP_REQ, CHOSEN, HEARTBEAT, HEARTBEAT_ACK, MESSAGE_NAMES, NACK,
    PREPARE, PREVOTE, PREVOTE_ACK, PROMISE, SNAPSHOT_ACK, SNAPSHOT_CHUNK,
)
from .frames import ProtocolError, encode_frame

__all__ = [
    "INT_LIMIT", "REPLICA_ID_MAX", "CLUSTER_ID_CHARS_MAX",
    "PREPARE", "PROMISE", "NACK", "ACCEPT", "ACCEPTED", "HEARTBEAT", "HEARTBEAT_ACK",
    "CATCHUP_REQ", "CHOSEN", "SNAPSHOT_CHUNK", "SNAPSHOT_ACK", "PREVOTE", "PREVOTE_ACK",
    "MESSAGE_NAMES", "parse_peer_message", "encode_peer_message",
    "client_hello", "welcome", "parse_welcome",
    "submit_request", "read_request", "status_request", "snapshot_request",
    "backup_request", "backup_read_request",
    "parse_client_request", "ERROR_CODES", "ok", "redirect", "error", "parse_reply",
]

INT_LIMIT = 2**63
"""Every integer field on the wire is in [0, INT_LIMIT) (an int64 in the core)."""


# ---------------------------------------------------------------------------
# Peer messages

# Snapshot transfer (SNAPSHOT_CHUNK, SNAPSHOT_ACK) is the shell's business, not the
# core's: in these two the third field is the snapshot's index rather than a ballot.

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

def client_hello():
    """The first frame's body of a client without a key (`cypaxos.security.handshake`
    has every handshake frame; this one is for probes that speak the wire directly)."""
    return ["client"]


def _is_replica_id(value):
    return type(value) is int and 1 <= value <= REPLICA_ID_MAX


CLUSTER_ID_CHARS_MAX = 128


def _is_cluster_id(value):
    return type(value) is str and 0 < len(value) <= CLUSTER_ID_CHARS_MAX


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


def backup_request(request_id):
    """The body of a request for a snapshot at a linearizable point, to back up: the
    reply is the snapshot file's index (as for a snapshot request)."""
    return ["backup", request_id]


def backup_read_request(request_id, index, offset):
    """The body of a request for the bytes of snapshot file `index` from `offset`; the
    reply is ``{"index", "offset", "total", "data"}`` (a chunk, at most 1 MiB)."""
    return ["backup_read", request_id, index, offset]


def parse_client_request(obj):
    """Check a decoded client request and return it as a tuple.

    ("submit", id, client_batch), ("read", id, [query, ...], stale), ("status", id),
    ("snapshot", id), ("backup", id) or ("backup_read", id, index, offset).  The
    client batch's inner layout is left to the core.
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
    elif op == "status" or op == "snapshot" or op == "backup":
        if n == 2:
            return (op, request_id)
    elif op == "backup_read":
        if n == 4 and _is_wire_int(obj[2]) and _is_wire_int(obj[3]):
            return ("backup_read", request_id, obj[2], obj[3])
    else:
        raise ProtocolError(f"unknown client request {_brief(op)}")
    raise ProtocolError(f"malformed {op} request")


ERROR_CODES = frozenset({"busy", "too_large", "bad_request", "shutting_down", "not_found"})
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
