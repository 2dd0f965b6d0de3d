# cython: language_level=3
"""The protocol's numbers for Python code: the names of protocol.pxd as plain ints.

    from cypaxos.protocol import ACCEPT, MESSAGE_NAMES, RESULT_OK

Message types (PREPARE .. PREVOTE_ACK), WAL record types (REC_PROMISE, REC_ACCEPT,
REC_COMMIT), result statuses (RESULT_OK, RESULT_ERROR, RESULT_SESSION_EXPIRED,
RESULT_RETRY), the ballot layout (BALLOT_ID_BITS, BALLOT_ID_MASK, BALLOT_ROUND_MAX,
CHOSEN_BALLOT) and the client batch header (CLIENT_BATCH_HEADER_BYTES, SEQ_LIMIT);
docs/internals.md describes each.  The ballot helpers live here too.
"""

__all__ = [
    "PREPARE", "PROMISE", "NACK", "ACCEPT", "ACCEPTED", "HEARTBEAT", "HEARTBEAT_ACK",
    "CATCHUP_REQ", "CHOSEN", "SNAPSHOT_CHUNK", "SNAPSHOT_ACK", "PREVOTE", "PREVOTE_ACK",
    "MESSAGE_NAMES", "REC_PROMISE", "REC_ACCEPT", "REC_COMMIT", "RECORD_NAMES",
    "RESULT_OK", "RESULT_ERROR", "RESULT_SESSION_EXPIRED", "RESULT_RETRY", "RESULT_NAMES",
    "BALLOT_ID_BITS", "BALLOT_ID_MASK", "BALLOT_ROUND_MAX", "CHOSEN_BALLOT",
    "CLIENT_BATCH_HEADER_BYTES", "SEQ_LIMIT", "make_ballot", "ballot_round", "ballot_owner",
]

CHOSEN_BALLOT = CHOSEN_BALLOT_C
"""Marks a log entry known to be chosen (2**63 - 1): above every usable ballot."""

BALLOT_ROUND_MAX = BALLOT_ROUND_MAX_C
"""The highest round a ballot may have (2**47 - 3); see protocol.pxd."""

SEQ_LIMIT = SEQ_LIMIT_C
"""A client batch's first_seq + count never exceeds this (2**62)."""

MESSAGE_NAMES = {
    PREPARE: "PREPARE", PROMISE: "PROMISE", NACK: "NACK", ACCEPT: "ACCEPT",
    ACCEPTED: "ACCEPTED", HEARTBEAT: "HEARTBEAT", HEARTBEAT_ACK: "HEARTBEAT_ACK",
    CATCHUP_REQ: "CATCHUP_REQ", CHOSEN: "CHOSEN", SNAPSHOT_CHUNK: "SNAPSHOT_CHUNK",
    SNAPSHOT_ACK: "SNAPSHOT_ACK", PREVOTE: "PREVOTE", PREVOTE_ACK: "PREVOTE_ACK",
}
"""Peer message type -> name, for log lines."""

RECORD_NAMES = {REC_PROMISE: "PROMISE", REC_ACCEPT: "ACCEPT", REC_COMMIT: "COMMIT"}
"""WAL record type -> name."""

RESULT_NAMES = {
    RESULT_OK: "OK", RESULT_ERROR: "ERROR", RESULT_SESSION_EXPIRED: "SESSION_EXPIRED",
    RESULT_RETRY: "RETRY",
}
"""Result status -> name."""


def make_ballot(round_, replica_id):
    """The ballot `(round, replica_id)` as the int64 the core compares.

    Raises ValueError for a round past BALLOT_ROUND_MAX or an id outside 0..65535.
    """
    if not 0 <= round_ <= BALLOT_ROUND_MAX_C or not 0 <= replica_id <= BALLOT_ID_MASK:
        raise ValueError(f"no ballot has round {round_} and replica id {replica_id}")
    return (round_ << BALLOT_ID_BITS) | replica_id


def ballot_round(ballot):
    """The round of a ballot."""
    return ballot >> BALLOT_ID_BITS


def ballot_owner(ballot):
    """The replica that owns a ballot."""
    return ballot & BALLOT_ID_MASK
