"""Tests of cypaxos.cborenc: byte for byte what cbor2 writes, for anything."""
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import cborenc, wire

pytestmark = pytest.mark.fast

EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
         2**64, -1, -24, -25, -256, -257, -2**63, -2**63 - 1, -2**64, -2**64 - 1]
leaves = st.one_of(st.integers(-2**70, 2**70), st.sampled_from(EDGES), st.binary(max_size=300),
                   st.text(max_size=40), st.none(), st.booleans(),
                   st.floats(allow_nan=False))     # floats go to cbor2
values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=6),
                               st.lists(children, max_size=6).map(tuple),
                               st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=30)


def frame(body):
    return struct.pack(">I", len(body)) + body


@settings(max_examples=2000)
@given(values)
def test_same_bytes_as_cbor2(value):
    assert cborenc.dumps(value) == cbor2.dumps(value)
    assert cborenc.encode_frame(value) == frame(cbor2.dumps(value))


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 65535, 65536, 1 << 20])
def test_byte_and_text_string_lengths(size):
    for value in (b"x" * size, "y" * size, "\u00e9" * size, [b"z" * size, size]):
        assert cborenc.encode_frame(value) == frame(cbor2.dumps(value))


def test_what_cbor2_encodes_is_handed_to_it():
    class Int(int):
        pass

    deep = []
    for _ in range(100):
        deep = [deep]
    for value in (deep, Int(5), [1, 2.5], {"a": 1}, bytearray(b"ab"), 2**100, -2**100):
        assert cborenc.dumps(value) == cbor2.dumps(value)
    with pytest.raises(Exception):
        cborenc.dumps(object())


def test_frames_decode_back():
    message = (wire.ACCEPT, 1, (7 << 16) | 1, 42, [b"v" * 1000, b""], 41)
    decoder = wire.FrameDecoder()
    decoder.feed(wire.encode_frame(message))
    assert decoder.next_frame() == list(message[:4]) + [list(message[4]), message[5]]


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 65535, 65536, 1 << 20])
def test_bytes_header_is_the_head_of_a_byte_string(size):
    data = b"x" * size
    assert cborenc.bytes_header(size) + data == cbor2.dumps(data)
    assert cborenc.bytes_header(2**64 - 1) == b"\x5b" + b"\xff" * 8
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            cborenc.bytes_header(bad)
