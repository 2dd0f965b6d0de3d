"""The wire protocol, sans-I/O: frames (`cypaxos.wire.frames`) and the messages they
carry (`cypaxos.wire.messages`).  See docs/internals.md, "Peer messages" and "Wire".

Every public name of both modules is re-exported here: ``from cypaxos import wire``
then ``wire.encode_frame(wire.status_request(1))``.
"""
from .frames import (
    CBOR_ACCELERATED, FRAME_BYTES_MAX, FrameDecoder, ProtocolError, decode_body,
    encode_frame, encode_frames,
)
from .messages import (
    ACCEPT, ACCEPTED, CATCHUP_REQ, CHOSEN, CLUSTER_ID_CHARS_MAX, ERROR_CODES, HEARTBEAT,
    HEARTBEAT_ACK, INT_LIMIT, MESSAGE_NAMES, NACK, PREPARE, PREVOTE, PREVOTE_ACK, PROMISE,
    REPLICA_ID_MAX, SNAPSHOT_ACK, SNAPSHOT_CHUNK, client_hello, encode_peer_message, error,
    ok, parse_client_request, parse_hello, parse_peer_message, parse_reply, parse_welcome,
    peer_hello, read_request, redirect, snapshot_request, status_request, submit_request,
    welcome,
)

__all__ = [
    "ProtocolError", "FRAME_BYTES_MAX", "INT_LIMIT", "CBOR_ACCELERATED",
    "FrameDecoder", "decode_body", "encode_frame", "encode_frames",
    "PREPARE", "PROMISE", "NACK", "ACCEPT", "ACCEPTED", "HEARTBEAT", "HEARTBEAT_ACK",
    "CATCHUP_REQ", "CHOSEN", "SNAPSHOT_CHUNK", "SNAPSHOT_ACK", "PREVOTE", "PREVOTE_ACK",
    "MESSAGE_NAMES", "parse_peer_message", "encode_peer_message",
    "peer_hello", "client_hello", "parse_hello", "welcome", "parse_welcome",
    "submit_request", "read_request", "status_request", "snapshot_request",
    "parse_client_request", "ERROR_CODES", "ok", "redirect", "error", "parse_reply",
    "REPLICA_ID_MAX", "CLUSTER_ID_CHARS_MAX",
]
