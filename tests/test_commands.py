"""Tests of cypaxos.commands: client batches, packed results and key-value commands."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import commands as c

pytestmark = pytest.mark.fast

u64 = st.integers(0, 2**64 - 1)
command_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=20)


def batch_args():
    return st.tuples(u64, st.integers(1, 2**62 - 100), u64, command_lists)


# ---------------------------------------------------------------------------
# Client batches

def test_batch_layout():
    packed = c.pack_client_batch(7, 10, 9, [b"ab", b""])
    assert packed == (struct.pack("<QQQII", 7, 10, 9, 2, 4 + 2 + 4)
                      + b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00")
    assert c.BATCH_HEADER_BYTES == 32


@settings(max_examples=300)
@given(batch_args())
def test_batch_round_trip(args):
    packed = c.pack_client_batch(*args)
    batch, end = c.unpack_client_batch(packed)
    assert batch == c.ClientBatch(*args)
    assert end == len(packed)


@settings(max_examples=100)
@given(st.lists(batch_args(), max_size=5))
def test_slot_value_round_trip(many):
    value = b"".join(c.pack_client_batch(*args) for args in many)
    assert c.unpack_client_batches(value) == [c.ClientBatch(*args) for args in many]


def test_empty_slot_value_is_a_no_op():
    assert c.unpack_client_batches(b"") == []


def test_unpack_accepts_memoryview():
    packed = c.pack_client_batch(1, 1, 0, [b"xyz"])
    batch, _ = c.unpack_client_batch(memoryview(packed))
    assert batch.commands == [b"xyz"] and type(batch.commands[0]) is bytes


@pytest.mark.parametrize("args", [
    (1, 1, 0, []),                     # no commands
    (1, 0, 0, [b"x"]),                 # seq 0
    (1, 2**62 - 1, 0, [b"x", b"y"]),   # seq reaches 2**62
    (-1, 1, 0, [b"x"]),
    (2**64, 1, 0, [b"x"]),
    (1, 1, 2**64, [b"x"]),
])
def test_pack_refuses_what_the_core_refuses(args):
    with pytest.raises(ValueError):
        c.pack_client_batch(*args)


def test_pack_refuses_non_bytes():
    with pytest.raises(TypeError):
        c.pack_client_batch(1, 1, 0, ["text"])


def corrupt(packed, count=None, payload_len=None):
    fields = list(struct.unpack_from("<QQQII", packed))
    if count is not None:
        fields[3] = count
    if payload_len is not None:
        fields[4] = payload_len
    return struct.pack("<QQQII", *fields) + packed[32:]


GOOD = c.pack_client_batch(1, 1, 0, [b"ab", b"cde"])


@pytest.mark.parametrize("bad", [
    GOOD[:31],                           # short header
    GOOD[:-1],                           # truncated payload
    corrupt(GOOD, count=3),              # count larger than the commands
    corrupt(GOOD, count=1),              # trailing bytes in the payload
    corrupt(GOOD, count=2**32 - 1),      # absurd count
    corrupt(GOOD, payload_len=len(GOOD) - 32 + 1),
    corrupt(GOOD, payload_len=4),        # a command overruns the payload
    GOOD[:32] + b"\xff\xff\xff\xff" + GOOD[36:],
])
def test_unpack_refuses_malformed(bad):
    with pytest.raises(ValueError):
        c.unpack_client_batches(bad)


def test_unpack_refuses_trailing_garbage_after_batches():
    with pytest.raises(ValueError):
        c.unpack_client_batches(GOOD + b"\x00")


# ---------------------------------------------------------------------------
# Packed results

results = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=20)


def test_results_layout():
    assert c.pack_results([(0, b"ok"), (1, b"")]) == b"\x00\x02\x00\x00\x00ok\x01\x00\x00\x00\x00"


@settings(max_examples=300)
@given(results)
def test_results_round_trip(items):
    assert c.unpack_results(c.pack_results(items)) == items


@pytest.mark.parametrize("bad", [b"\x00", b"\x00\x01\x00\x00", b"\x00\x02\x00\x00\x00o"])
def test_results_truncated(bad):
    with pytest.raises(ValueError):
        c.unpack_results(bad)


# ---------------------------------------------------------------------------
# Key-value commands

def test_kv_layouts():
    assert c.encode_put(b"k", b"vv") == b"P\x01\x00\x00\x00kvv"
    assert c.encode_delete(b"k") == b"Dk"
    assert c.encode_get(b"k") == b"Gk"
    assert c.encode_cas(b"k", b"old", b"new") == b"C\x01\x00\x00\x00k\x01\x03\x00\x00\x00oldnew"
    assert c.encode_cas(b"k", None, b"new") == b"C\x01\x00\x00\x00k\x00\x00\x00\x00\x00new"


@settings(max_examples=300)
@given(st.binary(max_size=20), st.binary(max_size=20), st.none() | st.binary(max_size=20))
def test_kv_round_trip(key, value, expected):
    assert c.decode_command(c.encode_put(key, value)) == ("put", key, value)
    assert c.decode_command(c.encode_delete(key)) == ("delete", key)
    assert c.decode_command(c.encode_get(key)) == ("get", key)
    assert c.decode_command(c.encode_cas(key, expected, value)) == ("cas", key, expected, value)


@pytest.mark.parametrize("bad", [
    b"", b"X", b"P\x01\x00", b"P\x05\x00\x00\x00ab", b"C\x01\x00\x00\x00k\x01",
    b"C\x01\x00\x00\x00k\x02\x00\x00\x00\x00",             # has_expected not 0/1
    b"C\x01\x00\x00\x00k\x00\x01\x00\x00\x00x",            # absent but with a value
    b"C\x01\x00\x00\x00k\x01\x09\x00\x00\x00old",          # expected overruns
])
def test_decode_command_refuses_malformed(bad):
    with pytest.raises(ValueError):
        c.decode_command(bad)


def test_kv_keys_must_be_bytes():
    with pytest.raises(TypeError):
        c.encode_put("k", b"v")
    with pytest.raises(TypeError):
        c.encode_get(None)


def test_result_decoders():
    assert c.decode_get(b"\x01value") == b"value"
    assert c.decode_get(b"\x01") == b""
    assert c.decode_get(b"\x00") is None
    assert c.decode_bool(b"\x01") is True
    assert c.decode_bool(b"\x00") is False
    for bad in (b"", b"\x02", b"\x00x"):
        with pytest.raises(ValueError):
            c.decode_get(bad)
    for bad in (b"", b"\x02", b"\x01\x01"):
        with pytest.raises(ValueError):
            c.decode_bool(bad)


# ---------------------------------------------------------------------------
# Agreement with the compiled engine, when it is built

def test_kv_commands_match_the_compiled_store():
    statemachine = pytest.importorskip("cypaxos.statemachine")
    store = statemachine.KVStore()
    assert store.apply(c.encode_put(b"k", b"v1")) == (c.RESULT_OK, b"")
    assert c.decode_get(store.query(c.encode_get(b"k"))) == b"v1"
    assert c.decode_bool(store.apply(c.encode_cas(b"k", b"v1", b"v2"))[1]) is True
    assert c.decode_bool(store.apply(c.encode_cas(b"k", b"v1", b"v3"))[1]) is False
    assert c.decode_bool(store.apply(c.encode_cas(b"new", None, b"n"))[1]) is True
    assert c.decode_get(store.query(c.encode_get(b"k"))) == b"v2"
    assert c.decode_bool(store.apply(c.encode_delete(b"k"))[1]) is True
    assert c.decode_bool(store.apply(c.encode_delete(b"k"))[1]) is False
    assert c.decode_get(store.query(c.encode_get(b"k"))) is None


@settings(max_examples=100)
@given(batch_args())
def test_batches_match_the_compiled_validator(args):
    core = pytest.importorskip("cypaxos.core")
    packed = c.pack_client_batch(*args)
    assert core.validate_client_batch(packed) == (args[0], args[1], len(args[3]))


# ---------------------------------------------------------------------------
# The revisioned store's commands and queries (docs/internals.md)

def test_revisioned_layouts():
    assert c.encode_put_rev(b"k", b"v", 7) == b"p" + (7).to_bytes(8, "little") + b"\x01\x00\x00\x00kv"
    assert c.encode_delete_rev(b"k") == b"dk"
    assert c.encode_cas_rev(b"k", None, b"n") == b"c\x01\x00\x00\x00k\x00\x00\x00\x00\x00n"
    assert c.encode_lease_grant(5000) == b"L" + (5000).to_bytes(8, "little")
    assert c.encode_lease_revoke(3) == b"V" + (3).to_bytes(8, "little")
    assert c.encode_get_rev(b"k") == b"gk"
    assert c.encode_range(b"a", b"c", revision=9, limit=2) == (
        b"R" + struct.pack("<QIIBI", 9, 2, 0, 1, 1) + b"ac")
    assert c.encode_range(prefix=b"a\xff") == b"R" + struct.pack("<QIIBI", 0, 0, 0, 1, 2) + b"a\xffb"
    assert c.encode_range() == b"R" + struct.pack("<QIIBI", 0, 0, 0, 0, 0)
    assert c.encode_history(4, key=b"k", with_prev=True) == (
        b"H" + struct.pack("<QIIIBI", 4, 0, 0, 0, 3, 1) + b"kk\x00")
    assert c.encode_txn([("absent", b"k")], [("get", b"k")]) == (
        b"T" + b"\x01\x00\x00\x00" + b"\x02\x00\x01\x00\x00\x00k"
        + b"\x01\x00\x00\x00" + b"\x02\x01\x00\x00\x00k" + b"\x00\x00\x00\x00")


def test_prefix_end():
    assert c.prefix_end(b"ab") == b"ac"
    assert c.prefix_end(b"a\xff\xff") == b"b"
    assert c.prefix_end(b"\xff") is None
    assert c.prefix_end(b"") is None


keys = st.binary(max_size=12)
compares = st.one_of(
    st.tuples(st.just("value"), keys, st.sampled_from(sorted(c.COMPARE_OPS)), st.binary(max_size=8)),
    st.tuples(st.sampled_from(["mod_revision", "create_revision", "version"]), keys,
              st.sampled_from(sorted(c.COMPARE_OPS)), u64),
    st.tuples(st.just("absent"), keys))
txn_ops = st.one_of(st.tuples(st.just("put"), keys, st.binary(max_size=8), u64),
                    st.tuples(st.sampled_from(["delete", "get"]), keys))


@settings(max_examples=300)
@given(st.lists(compares, max_size=4), st.lists(txn_ops, max_size=4),
       st.lists(txn_ops, max_size=4))
def test_txn_round_trip(cmps, success, failure):
    assert c.decode_command(c.encode_txn(cmps, success, failure)) == (
        "txn", cmps, success, failure)


@settings(max_examples=300)
@given(keys, st.binary(max_size=12), u64, st.none() | st.binary(max_size=8))
def test_revisioned_round_trip(key, value, lease, expected):
    assert c.decode_command(c.encode_put_rev(key, value, lease)) == ("put_rev", key, value, lease)
    assert c.decode_command(c.encode_delete_rev(key)) == ("delete_rev", key)
    assert c.decode_command(c.encode_cas_rev(key, expected, value)) == (
        "cas_rev", key, expected, value)
    assert c.decode_command(c.encode_lease_grant(lease)) == ("lease_grant", lease)
    assert c.decode_command(c.encode_lease_revoke(lease)) == ("lease_revoke", lease)


@pytest.mark.parametrize("args", [
    ([("value", b"k", "=", b"v")], [], []),
    ([("absent", b"k", "==", b"")], [], []),
    ([], [("put", b"k")], []),
    ([], [("scan", b"k")], []),
    ([], [("put", b"k", b"v", -1)], []),
])
def test_encode_txn_refuses_bad_parts(args):
    with pytest.raises((ValueError, TypeError)):
        c.encode_txn(*args)


@pytest.mark.parametrize("decode, bad", [
    (c.decode_write, b"\x01"), (c.decode_write, b"\x02" + bytes(8)),
    (c.decode_get_rev, b"\x01" + bytes(8)), (c.decode_range, bytes(21)),
    (c.decode_range, b"\x00" + bytes(16) + b"\x00\x01\x00\x00\x00"),
    (c.decode_history, bytes(33)), (c.decode_txn, b"\x05"),
    (c.decode_lease_list, b"\x00\x01\x00\x00\x00"), (c.decode_lease_keys, bytes(13)),
    (c.decode_store_status, bytes(55)), (c.decode_kv_snapshot, c.SNAPSHOT_MAGIC + b"\x02"),
])
def test_result_decoders_refuse_malformed(decode, bad):
    with pytest.raises(ValueError):
        decode(bad)
