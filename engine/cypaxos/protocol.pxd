# cython: language_level=3
"""The protocol's numbers, each in one place: peer message types, WAL record types,
result statuses, the ballot layout and the client batch header (docs/internals.md).

Cython code cimports them from here; protocol.pyx gives Python code the same names as
plain ints, with MESSAGE_NAMES, RECORD_NAMES and RESULT_NAMES for log lines.
"""
from libc.stdint cimport int64_t


# Peer message types: the first field of every peer message.
cpdef enum:
    PREPARE = 1
    PROMISE = 2
    NACK = 3
    ACCEPT = 4
    ACCEPTED = 5
    HEARTBEAT = 6
    HEARTBEAT_ACK = 7
    CATCHUP_REQ = 8
    CHOSEN = 9
    # Snapshot transfer is the shell's business, not the core's: in these two the
    # third field is the snapshot's index rather than a ballot.
    SNAPSHOT_CHUNK = 10
    SNAPSHOT_ACK = 11
    PREVOTE = 12
    PREVOTE_ACK = 13


# WAL record types: the first field of every record the core hands out.
cpdef enum:
    REC_PROMISE = 1
    REC_ACCEPT = 2
    REC_COMMIT = 3


# Result statuses: the u8 before each packed result.
cpdef enum:
    RESULT_OK = 0
    RESULT_ERROR = 1
    RESULT_SESSION_EXPIRED = 2
    RESULT_RETRY = 3


# A ballot is the int64 `round << BALLOT_ID_BITS | replica_id`; a client batch starts
# with u64 session_id | u64 first_seq | u64 acked_seq | u32 count | u32 payload_len.
cpdef enum:
    BALLOT_ID_BITS = 16
    BALLOT_ID_MASK = 0xffff
    CLIENT_BATCH_HEADER_BYTES = 32


# The 64-bit constants (C enums are int-sized); the names end in _C because
# protocol.pyx gives Python the plain names.
cdef extern from *:
    """
    #define CYPAXOS_CHOSEN_BALLOT ((int64_t)0x7fffffffffffffffLL)
    #define CYPAXOS_BALLOT_ROUND_MAX ((((int64_t)1) << 47) - 3)
    #define CYPAXOS_SEQ_LIMIT (((uint64_t)1) << 62)
    """
    # Marks a log entry known to be chosen: above every ballot a replica may use.
    const int64_t CHOSEN_BALLOT_C "CYPAXOS_CHOSEN_BALLOT"
    # The highest round a ballot may have.  The round after it still fits below
    # CHOSEN_BALLOT with any replica id, so no ballot arithmetic can overflow; a ballot
    # with a higher round is refused from peers and in the WAL, and a replica never
    # campaigns past it.
    const int64_t BALLOT_ROUND_MAX_C "CYPAXOS_BALLOT_ROUND_MAX"
    # Sequence numbers of a client batch stay below this (first_seq + count <= it), so
    # that no sum of them overflows.
    const unsigned long long SEQ_LIMIT_C "CYPAXOS_SEQ_LIMIT"


cdef inline bint ballot_fits(int64_t ballot) noexcept nogil:
    """Whether a ballot is in the ballot space: 0 (none) or a round <= BALLOT_ROUND_MAX."""
    return ballot >= 0 and (ballot >> BALLOT_ID_BITS) <= BALLOT_ROUND_MAX_C
