"""Tests of cypaxos.cbordec: cbor2's answer for every input, or FALLBACK to ask cbor2."""
import os
import random

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import cbordec, wire
from cypaxos.wire import frames
from cypaxos.cbordec import FALLBACK

pytestmark = pytest.mark.fast

EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
         -1, -24, -25, -256, -257, -2**63, -2**63 - 1, -2**64]
easy_leaves = st.one_of(st.integers(-2**64, 2**64 - 1), st.sampled_from(EDGES),
                        st.binary(max_size=300), st.text(max_size=40), st.none(),
                        st.booleans())
easy = st.recursive(easy_leaves, lambda children: st.lists(children, max_size=6),
                    max_leaves=30)
hard_leaves = st.one_of(easy_leaves, st.floats(allow_nan=False), st.integers(2**64, 2**70),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
anything = st.recursive(hard_leaves, lambda children: st.lists(children, max_size=6),
                        max_leaves=30)


def cbor2_outcome(data):
    try:
        return ("value", cbor2.loads(data, **frames._SAFE_OPTIONS))
    except Exception as exc:
        return ("error", type(exc))


def fast_outcome(data):
    value = cbordec.decode(data)
    return FALLBACK if value is FALLBACK else ("value", value)


@settings(max_examples=2000)
@given(easy)
def test_easy_values_decode_without_cbor2(value):
    assert cbordec.decode(cbor2.dumps(value)) == value


@settings(max_examples=1000)
@given(anything)
def test_anything_else_is_cbor2s(value):
    data = cbor2.dumps(value)
    got = fast_outcome(data)
    assert got is FALLBACK or got == cbor2_outcome(data)


@settings(max_examples=1000)
@given(easy, st.data())
def test_mutated_bodies_agree_with_cbor2(value, data):
    body = bytearray(cbor2.dumps(value))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(body) - 1)))
        if action == "flip" and body:
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = bytes([data.draw(st.integers(0, 255))])
    body = bytes(body)
    got = fast_outcome(body)
    assert got is FALLBACK or repr(got) == repr(cbor2_outcome(body))
    # Through the wire module the outcome is exactly cbor2's, fast path or not.
    expected = cbor2_outcome(body)
    try:
        outcome = ("value", wire.decode_body(body))
    except wire.ProtocolError:
        outcome = "error"
    # By repr: a mutated body may hold a NaN, which two decodes give as two floats
    # that never compare equal.
    assert repr(outcome) == repr("error" if expected[0] == "error" else expected)


def test_random_bytes_agree_with_cbor2():
    rng = random.Random(1234)
    for _ in range(20_000):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 24)))
        got = fast_outcome(body)
        assert got is FALLBACK or got == cbor2_outcome(body), body


def test_ranges_trailing_bytes_and_limits():
    data = b"junk" + cbor2.dumps([1, b"ab", "c"]) + b"trailing"
    assert cbordec.decode(data, 4) == [1, b"ab", "c"]
    assert cbordec.decode(bytearray(data), 4, len(data) - 8) == [1, b"ab", "c"]
    assert cbordec.decode(memoryview(data)[4:]) == [1, b"ab", "c"]
    assert cbordec.decode(b"\x82\x01", 0) is FALLBACK          # truncated
    assert cbordec.decode(b"\x9b" + b"\xff" * 8) is FALLBACK   # 2**64-1 items: no allocation
    assert cbordec.decode(b"\x9f\x01\xff") is FALLBACK         # indefinite length
    assert cbordec.decode(b"\xc2\x41\x01") is FALLBACK         # a tag
    assert cbordec.decode(b"\x62\xff\xfe") is FALLBACK         # invalid UTF-8
    deep = b"\x81" * 40 + b"\x00"
    assert cbordec.decode(deep) is FALLBACK
    assert wire.decode_body(deep) == cbor2.loads(deep)
    with pytest.raises(ValueError):
        cbordec.decode(b"\x00", 5)


def test_frames_of_every_size_round_trip():
    decoder = wire.FrameDecoder()
    messages = [[wire.ACCEPT, 1, 7, 42, [os.urandom(n)], 41] for n in (0, 10, 5000, 300_000)]
    for message in messages:
        decoder.feed(wire.encode_frame(message))
    assert [decoder.next_frame() for _ in messages] == messages
