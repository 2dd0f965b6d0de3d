"""Frames on the wire: ``u32 big-endian body length | CBOR body`` (docs/internals.md, "Wire").

Sans-I/O: nothing here touches a socket.  The shell feeds received bytes to a
`FrameDecoder` and takes decoded CBOR bodies out with `next_frame()`; the message
checks are in `cypaxos.wire.messages`.  Every violation raises `ProtocolError`, after
which the connection should be closed (with one log line).

Bodies of plain arrays, ints and strings (every message) are decoded by
cypaxos.cbordec straight from the receive buffer; anything else, malformed input
included, by cbor2's compiled extension (Rust in cbor2 >= 6, C before) with every CBOR
tag refused: the protocol uses none, and some built-in tag decoders (decimal,
bigfloat, fraction) take time quadratic in the body size, so an unauthenticated client
could stall the event loop with one frame.  Map keys must be strings or bytes (int
keys with colliding hashes would be another quadratic stall).
"""
import struct
import warnings

import cbor2

from ..cbordec import FALLBACK as _FALLBACK
from ..cbordec import decode as _decode_fast
from ..cborenc import encode_frame as _encode_frame

__all__ = [
    "ProtocolError", "FRAME_BYTES_MAX", "CBOR_ACCELERATED",
    "FrameDecoder", "decode_body", "encode_frame", "encode_frames",
]


class ProtocolError(ValueError):
    """The other side broke the wire protocol; close the connection."""


FRAME_BYTES_MAX = 16 * 1024 * 1024
"""Default limit on a frame's body length, in bytes."""

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
