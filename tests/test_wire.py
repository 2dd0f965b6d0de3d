"""Sans-I/O tests of cypaxos.wire: framing, CBOR bodies and message validation."""
import struct
import time

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import wire
from cypaxos.wire import ProtocolError

pytestmark = pytest.mark.fast

CLUSTER = frozenset({1, 2, 3})
SELF_ID = 1
PEER_ID = 2
BIG = 2**63 - 1  # the largest wire int (CHOSEN_BALLOT)


def frame(body):
    """A frame around raw body bytes."""
    return struct.pack(">I", len(body)) + body


def drain(decoder):
    frames = []
    while (obj := decoder.next_frame()) is not None:
        frames.append(obj)
    return frames


# ---------------------------------------------------------------------------
# Framing

SAMPLES = [
    0, 1, 2**63 - 1, -5, b"", b"\x00" * 300, "text", [], [1, [2, [3]]],
    {"leader": 3, "role": "follower"}, False, True, 1.5, (4, 2, 7, 1, [b"x"], 0),
]


def test_cbor_uses_compiled_extension():
    # cbor2 >= 6 is a Rust extension (cbor2._cbor2); 5.x had a C one of the same name.
    assert wire.CBOR_ACCELERATED
    assert cbor2.loads.__module__.endswith("_cbor2")


def test_round_trip():
    decoder = wire.FrameDecoder()
    decoder.feed(wire.encode_frames(SAMPLES))
    expected = [list(s) if isinstance(s, tuple) else s for s in SAMPLES]
    assert drain(decoder) == expected
    assert decoder.buffered == 0


def test_encode_frame_layout():
    assert wire.encode_frame([1, b"ab"]) == b"\x00\x00\x00\x05" + b"\x82\x01\x42ab"
    assert wire.encode_frames([1, 2]) == wire.encode_frame(1) + wire.encode_frame(2)
    assert wire.encode_frames([]) == b""
    assert wire.encode_peer_message((3, 2, 9)) == wire.encode_frame([3, 2, 9])


def test_split_at_every_byte_boundary():
    stream = wire.encode_frames(SAMPLES[:8])
    expected = SAMPLES[:8]
    for cut in range(len(stream) + 1):
        decoder = wire.FrameDecoder()
        decoder.feed(stream[:cut])
        got = drain(decoder)
        decoder.feed(stream[cut:])
        got += drain(decoder)
        assert got == expected, cut


def test_byte_at_a_time():
    stream = wire.encode_frames(SAMPLES)
    decoder = wire.FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got += drain(decoder)
    assert len(got) == len(SAMPLES)
    assert decoder.buffered == 0


def test_many_frames_in_one_feed():
    objs = [[4, 2, i, i, [b"v" * (i % 70)], i] for i in range(20000)]
    decoder = wire.FrameDecoder()
    decoder.feed(wire.encode_frames(objs))
    assert drain(decoder) == objs


def test_many_frames_with_torn_tails():
    # Every feed ends mid-frame, exercising the offset and compaction.
    objs = [[6, 2, i, i, i * 7] for i in range(5000)]
    stream = wire.encode_frames(objs)
    decoder = wire.FrameDecoder()
    got = []
    for start in range(0, len(stream), 997):
        decoder.feed(stream[start:start + 997])
        got += drain(decoder)
    assert got == objs


@pytest.mark.parametrize("chunk", [64 * 1024, 1024])
def test_big_frame_in_chunks_is_linear(chunk):
    value = b"\xab" * (10 * 1024 * 1024)
    stream = wire.encode_frame([9, 2, 1, [value]])
    decoder = wire.FrameDecoder()
    start = time.perf_counter()
    frames = []
    for i in range(0, len(stream), chunk):
        decoder.feed(stream[i:i + chunk])
        frames += drain(decoder)
    elapsed = time.perf_counter() - start
    assert frames == [[9, 2, 1, [value]]]
    # Linear is tens of ms; re-copying the buffer per feed would be ~50 GB at 1 KiB.
    assert elapsed < 2.0


def test_exactly_max_accepted():
    body = cbor2.dumps(b"x" * 100)
    decoder = wire.FrameDecoder(len(body))
    decoder.feed(frame(body))
    assert decoder.next_frame() == b"x" * 100


def test_oversized_rejected_on_header_alone():
    decoder = wire.FrameDecoder(1000)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(struct.pack(">I", 1001))
    # Still stuck on it: nothing after the header was buffered or will be.
    assert decoder.buffered == 4
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_oversized_default_limit():
    decoder = wire.FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", wire.FRAME_BYTES_MAX + 1) + b"\x00" * 10)
    decoder = wire.FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"\xff\xff\xff\xff")


def test_oversized_after_good_frames():
    decoder = wire.FrameDecoder(100)
    # The bad header is not the next frame yet, so feed accepts the bytes...
    decoder.feed(wire.encode_frame(1) + wire.encode_frame(2) + struct.pack(">I", 101))
    assert decoder.next_frame() == 1
    assert decoder.next_frame() == 2
    # ...and next_frame refuses it once it is.
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_oversized_header_split():
    decoder = wire.FrameDecoder(100)
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x01\x00")


def test_bad_frame_bytes_max():
    for bad in (-1, 2**32, 1.0, True):
        with pytest.raises(ValueError):
            wire.FrameDecoder(bad)


@pytest.mark.parametrize("body", [
    b"",                 # no item at all
    b"\xff",             # a lone break
    b"\x1c",             # reserved additional info
    b"\x82\x01",         # truncated array
    b"\x5a\xff\xff\xff\xff",  # byte string longer than the body
    b"\x62\xff\xfe",     # invalid UTF-8
    b"\x81" * 1000 + b"\x00",  # nesting deeper than cbor2 allows
    b"\x9f" * 1000,
    b"\xa1\x01\x02",     # a map with an int key
    b"\xf6",             # null: next_frame's None means "no frame yet"
])
def test_garbage_cbor_rejected(body):
    decoder = wire.FrameDecoder()
    decoder.feed(frame(body) + wire.encode_frame("next"))
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    # The bad frame was skipped (the shell closes the connection anyway).
    assert decoder.next_frame() == "next"


def test_text_keyed_maps_allowed():
    assert wire.decode_body(cbor2.dumps({"a": 1, "b": [b"x"]})) == {"a": 1, "b": [b"x"]}


def test_every_tag_rejected():
    # Built-in tag decoders (decimal, fraction, bigfloat) can take quadratic time, and
    # the protocol uses no tags: none may decode.  Covers cbor2 6's built-ins.
    for tag in list(range(70000)) + [2**32, 2**64 - 1]:
        body = cbor2.dumps(cbor2.CBORTag(tag, 0))
        with pytest.raises(ProtocolError):
            wire.decode_body(body)


@pytest.mark.parametrize("body", [
    b"\xc4\x82\x01\xc2\x50" + b"\x7f" * 16,  # decimal with a bignum mantissa
    b"\xd8\x1e\x82\x01\x02",                 # fraction 1/2
    b"\xd8\x1c\x81\xd8\x1d\x00",             # shareable / shared ref (a cycle)
    b"\xc2\x41\x01",                         # bignum
])
def test_known_dangerous_tags_rejected(body):
    with pytest.raises(ProtocolError):
        wire.decode_body(body)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=10))
def test_fuzz_random_stream(data, cuts):
    decoder = wire.FrameDecoder(64)
    pos = 0
    try:
        for size in cuts + [len(data)]:
            decoder.feed(data[pos:pos + size])
            pos += size
            drain(decoder)
    except ProtocolError:
        pass


@settings(max_examples=1000)
@given(st.binary(max_size=100))
def test_fuzz_random_body(body):
    # Random bodies behind valid headers actually reach the CBOR decoder.
    decoder = wire.FrameDecoder()
    decoder.feed(frame(body))
    try:
        decoder.next_frame()
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------
# Peer messages

VALID = {
    wire.PREPARE: [1, 2, 5, 10],
    wire.PROMISE: [2, 2, 5, 9, [10, 3, b"a", 11, BIG, b""]],
    wire.NACK: [3, 2, 7],
    wire.ACCEPT: [4, 2, 5, 10, [b"a", b"", b"c"], 9],
    wire.ACCEPTED: [5, 2, 5, 10, 3, 9],
    wire.HEARTBEAT: [6, 2, 5, 9, 44],
    wire.HEARTBEAT_ACK: [7, 2, 5, 44, 9],
    wire.CATCHUP_REQ: [8, 2, 5, 10],
    wire.CHOSEN: [9, 2, BIG, 10, [b"x" * 64] * 3],
    wire.SNAPSHOT_CHUNK: [10, 2, 500, 0, 3, b"abc"],
    wire.SNAPSHOT_ACK: [11, 2, 500, 3],
    wire.PREVOTE: [12, 2, 5],
    wire.PREVOTE_ACK: [13, 2, 5, 1],
}


def parse(obj):
    return wire.parse_peer_message(obj, CLUSTER, SELF_ID, PEER_ID)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_peer_message_round_trip(kind):
    decoder = wire.FrameDecoder()
    decoder.feed(wire.encode_peer_message(tuple(VALID[kind])))
    message = parse(decoder.next_frame())
    assert type(message) is tuple
    assert message == tuple(VALID[kind])


def test_peer_message_edge_values():
    assert parse([4, 2, 0, 0, [], 0]) == (4, 2, 0, 0, [], 0)
    assert parse([2, 2, 0, 0, []]) == (2, 2, 0, 0, [])
    assert parse([5, 2, BIG, BIG, BIG, BIG])[2] == BIG


@pytest.mark.parametrize("kind", sorted(VALID))
def test_peer_message_wrong_arity(kind):
    message = VALID[kind]
    with pytest.raises(ProtocolError, match="items"):
        parse(message[:-1] if len(message) > 3 else message + [0])
    with pytest.raises(ProtocolError, match="items"):
        parse(message + [0])


def int_positions(kind):
    fields = {wire.PREPARE: (3,), wire.PROMISE: (3,), wire.NACK: (), wire.ACCEPT: (3, 5),
              wire.ACCEPTED: (3, 4, 5), wire.HEARTBEAT: (3, 4), wire.HEARTBEAT_ACK: (3, 4),
              wire.CATCHUP_REQ: (3,), wire.CHOSEN: (3,), wire.SNAPSHOT_CHUNK: (3, 4),
              wire.SNAPSHOT_ACK: (3,), wire.PREVOTE: (), wire.PREVOTE_ACK: (3,)}[kind]
    return (2,) + fields  # the ballot, then the message's own int fields


@pytest.mark.parametrize("kind", sorted(VALID))
@pytest.mark.parametrize("bad", [True, False, -1, 2**63, 2**64 - 1, 1.0, "1", b"1", None, [1]])
def test_peer_message_bad_int(kind, bad):
    for pos in int_positions(kind):
        message = list(VALID[kind])
        message[pos] = bad
        with pytest.raises(ProtocolError):
            parse(message)


@pytest.mark.parametrize("kind", [wire.ACCEPT, wire.CHOSEN])
@pytest.mark.parametrize("bad", [
    ["a"], [b"a", "b"], [1], [None], [True], [[b"a"]], b"ab", "ab", None, (b"a",), {b"a": 1},
])
def test_peer_message_bad_values(kind, bad):
    message = list(VALID[kind])
    message[4] = bad
    with pytest.raises(ProtocolError, match="values"):
        parse(message)


@pytest.mark.parametrize("bad", [
    [1, 2],                          # not a multiple of 3
    [1, 2, b"a", 4],
    [1, 2, "a"],                     # str value
    [1, 2, 3],                       # int value
    [b"a", 2, b"b"],                 # bytes slot
    [True, 2, b"a"],                 # bool slot
    [1, False, b"a"],                # bool ballot
    [-1, 2, b"a"],
    [1, 2**63, b"a"],
    [[1, 2, b"a"]],                  # nested triples instead of a flat list
    b"",
    None,
])
def test_promise_bad_entries(bad):
    with pytest.raises(ProtocolError, match="entries"):
        parse([2, 2, 5, 9, bad])


@pytest.mark.parametrize("obj", [
    None, b"", "x", 4, {}, (4, 2, 5, 10, [b"a"], 9), [], [4], [4, 2],
    [0, 2, 5], [10, 2, 5], [-1, 2, 5], [True, 2, 5, 10], [1.0, 2, 5, 10], ["1", 2, 5, 10],
    [[1], 2, 5],
])
def test_peer_message_not_a_message(obj):
    with pytest.raises(ProtocolError):
        parse(obj)


@pytest.mark.parametrize("src", [1, 3, 4, 0, True, 2.0, "2", None])
def test_peer_message_wrong_src(src):
    for kind in VALID:
        message = list(VALID[kind])
        message[1] = src
        with pytest.raises(ProtocolError, match="src"):
            parse(message)


def test_peer_id_must_be_another_member():
    with pytest.raises(ProtocolError, match="member"):
        wire.parse_peer_message([3, 1, 5], CLUSTER, SELF_ID, SELF_ID)
    with pytest.raises(ProtocolError, match="member"):
        wire.parse_peer_message([3, 9, 5], CLUSTER, SELF_ID, 9)


def test_error_messages_stay_short():
    huge = [b"x"] * 100000
    with pytest.raises(ProtocolError) as info:
        parse([huge, 2, 5])
    assert len(str(info.value)) < 100
    with pytest.raises(ProtocolError) as info:
        parse([4, "y" * 100000, 5, 10, [], 9])
    assert len(str(info.value)) < 100


# Arbitrary decoded CBOR: whatever a peer sends, parsing gives a tuple or ProtocolError.
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64 - 1) | st.binary(max_size=8)
    | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)
peerish = st.tuples(st.integers(0, 10), st.sampled_from([1, 2, 3]),
                    st.lists(st.integers(0, 20) | st.lists(st.binary(max_size=3), max_size=4)
                             | cbor_values, max_size=4)).map(lambda t: [t[0], t[1]] + t[2])


@settings(max_examples=1000)
@given(cbor_values | peerish)
def test_fuzz_parsers(obj):
    for parser in (parse, wire.parse_welcome, wire.parse_client_request,
                   wire.parse_reply):
        try:
            result = parser(obj)
        except ProtocolError:
            continue
        assert type(result) is tuple


# ---------------------------------------------------------------------------
# Hello and welcome

def test_welcome():
    assert wire.welcome("c-7", 3) == ["welcome", "c-7", 3]
    assert wire.parse_welcome(wire.welcome("c-7", 3)) == ("c-7", 3)
    for bad in (["welcome", "c"], ["welcome", "c", 0], ["peer", "c", 3], ["welcome", True, 3],
                ["welcome", 7, 3], None):
        with pytest.raises(ProtocolError):
            wire.parse_welcome(bad)


# ---------------------------------------------------------------------------
# Client requests and replies

def test_client_requests():
    assert wire.parse_client_request(wire.submit_request(1, b"batch")) == ("submit", 1, b"batch")
    assert wire.parse_client_request(wire.read_request(2, [b"Gk", b""], True)) == \
        ("read", 2, [b"Gk", b""], True)
    assert wire.parse_client_request(wire.read_request(3, [])) == ("read", 3, [], False)
    assert wire.parse_client_request(wire.status_request(BIG)) == ("status", BIG)
    assert wire.parse_client_request(wire.snapshot_request(0)) == ("snapshot", 0)


@pytest.mark.parametrize("obj", [
    None, [], ["submit"], "submit", [b"submit", 1, b""], ["submit", 1], ["submit", 1, "x"],
    ["submit", 1, b"", b""], ["submit", -1, b""], ["submit", True, b""],
    ["submit", 2**63, b""], ["submit", 1.0, b""], ["read", 1, [b"q"]],
    ["read", 1, [b"q"], 1], ["read", 1, ["q"], False], ["read", 1, b"q", False],
    ["read", 1, [b"q"], False, 0], ["status", 1, 2], ["snapshot"], ["snapshot", None],
    ["nope", 1], [1, 1],
])
def test_bad_client_requests(obj):
    with pytest.raises(ProtocolError):
        wire.parse_client_request(obj)


def test_replies_round_trip():
    replies = [
        wire.ok(1, b"results"), wire.ok(2, [b"\x01v", b"\x00"]), wire.ok(3, {"role": "leader"}),
        wire.ok(4, 123), wire.redirect(5, "10.0.0.2:7000"), wire.redirect(6, None),
        wire.error(7, "busy", "queue full"),
    ]
    decoder = wire.FrameDecoder()
    decoder.feed(wire.encode_frames(replies))
    got = [wire.parse_reply(obj) for obj in drain(decoder)]
    assert got == [tuple(r) for r in replies]
    # Unknown error codes reach old clients intact.
    assert wire.parse_reply(["error", 1, "new_code", "m"]) == ("error", 1, "new_code", "m")


def test_reply_builders_refuse_bad_arguments():
    with pytest.raises(ValueError):
        wire.error(1, "oops", "message")
    with pytest.raises(TypeError):
        wire.redirect(1, ("host", 1))
    for code in wire.ERROR_CODES:
        assert wire.error(1, code, "m")[2] == code


@pytest.mark.parametrize("obj", [
    None, [], ["ok", 1], ["ok", -1, b""], ["ok", True, b""], ["ok", 1, "text"],
    ["ok", 1, [b"a", "b"]], ["ok", 1, -3], ["ok", 1, None], ["ok", 1, True], ["ok", 1, b"", 0],
    ["redirect", 1, 5], ["redirect", 1], ["error", 1, "busy"], ["error", 1, "busy", b"m"],
    ["error", 1, 3, "m"], ["welcome", 1, 2], [None, 1, 2],
])
def test_bad_replies(obj):
    with pytest.raises(ProtocolError):
        wire.parse_reply(obj)
