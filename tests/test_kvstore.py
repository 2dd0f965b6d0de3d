"""The built-in key-value store (cypaxos.statemachine.KVStore) against a dict model.

The store keeps its own hash table; these tests drive it with seeded random commands
and check every answer, its snapshot (keys in key order), restore (also of version 0
snapshots: `_snapshot_of`), the digest, and the table's invariants.  Revisions,
ranges, history, transactions and leases are checked in tests/test_kvstore_model.py.
"""

import random

import pytest

from cypaxos import commands as c

pytestmark = pytest.mark.fast

statemachine = pytest.importorskip("cypaxos.statemachine")
KVStore = statemachine.KVStore


def _snapshot_of(model: dict) -> bytes:
    return b"".join(len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little") + k + v
                    for k, v in model.items())


def _keys_of(snapshot: bytes) -> list:
    """(key, value) pairs of a snapshot, in its (key) order."""
    return [(key, meta.value) for key, meta in c.decode_kv_snapshot(snapshot).keys]


def _random_key(rnd, key_count):
    if rnd.random() < 0.9:
        return b"k%d" % rnd.randrange(key_count)
    return rnd.randbytes(rnd.randrange(0, 30))   # any length, the empty key included


@pytest.mark.parametrize("seed", range(24))
def test_store_matches_a_dict(seed):
    rnd = random.Random(seed)
    store = KVStore()
    model: dict = {}
    key_count = rnd.choice([3, 20, 300, 5000])
    steps = rnd.choice([50, 2000, 20000])
    for step in range(steps):
        key = _random_key(rnd, key_count)
        r = rnd.random()
        where = f"seed {seed}, step {step}, key {key!r}"
        if r < 0.5:
            value = rnd.randbytes(rnd.choice([0, 1, 10, 64, 300, 3000]))
            assert store.apply(c.encode_put(key, value)) == (c.RESULT_OK, b""), where
            model[key] = value
        elif r < 0.75:
            status, result = store.apply(c.encode_delete(key))
            assert (status, c.decode_bool(result)) == (c.RESULT_OK, key in model), where
            model.pop(key, None)
        elif r < 0.9:
            choice = rnd.random()
            expected = model.get(key) if choice < 0.5 else None if choice < 0.75 else b"x"
            new = rnd.randbytes(rnd.randrange(0, 20))
            status, result = store.apply(c.encode_cas(key, expected, new))
            matched = key not in model if expected is None else model.get(key) == expected
            assert (status, c.decode_bool(result)) == (c.RESULT_OK, matched), where
            if matched:
                model[key] = new
        else:
            assert c.decode_get(store.query(c.encode_get(key))) == model.get(key), where
        if step % 997 == 0:
            store.check_invariants()
    store.check_invariants()
    assert len(store) == len(model)
    assert store.query(b"N") == str(len(model)).encode()
    assert _keys_of(store.snapshot()) == sorted(model.items()), f"seed {seed}"

    restored = KVStore()
    restored.restore(store.snapshot())
    restored.check_invariants()
    assert restored.snapshot() == store.snapshot()
    assert restored.state_digest() == store.state_digest()


def test_snapshots_list_keys_in_key_order_whatever_the_history():
    store = KVStore()
    for key in (b"c", b"a", b"b"):
        store.apply(c.encode_put(key, key * 3))
    store.apply(c.encode_put(b"a", b"longer value than before" * 20))   # out of line
    store.apply(c.encode_delete(b"b"))
    store.apply(c.encode_put(b"b", b"again"))
    assert _keys_of(store.snapshot()) == [
        (b"a", b"longer value than before" * 20), (b"b", b"again"), (b"c", b"ccc")]
    store.apply(c.encode_put(b"a", b"tiny"))   # back in the entry
    assert c.decode_get(store.query(c.encode_get(b"a"))) == b"tiny"
    store.check_invariants()


def test_digest_ignores_the_table_layout_and_sees_every_byte():
    one = KVStore()
    for i in range(500):
        one.apply(c.encode_put(b"k%d" % i, b"v%d" % i))
    for i in range(0, 500, 3):
        one.apply(c.encode_delete(b"k%d" % i))
    two = KVStore()
    two.restore(one.snapshot())   # the same state, laid out in another order
    assert two.snapshot() == one.snapshot()
    assert one.state_digest() == two.state_digest()
    two.apply(c.encode_put(b"k1", b"vX"))
    assert one.state_digest() != two.state_digest()
    one.apply(c.encode_put(b"k1", b"vX"))
    assert one.state_digest() == two.state_digest()
    one.apply(c.encode_put(b"k2", b"v2"))   # the same value, but a new revision
    assert one.state_digest() != two.state_digest()


def test_a_truncated_snapshot_is_refused_and_leaves_the_state_alone():
    store = KVStore()
    store.apply(c.encode_put(b"keep", b"me"))
    good = _snapshot_of({b"a": b"1", b"b": b"2"})
    with pytest.raises(ValueError, match="truncated"):
        store.restore(good[:-1])
    assert _keys_of(store.snapshot()) == [(b"keep", b"me")]
    store.restore(good)   # a version 0 snapshot (keys and values only)
    assert _keys_of(store.snapshot()) == [(b"a", b"1"), (b"b", b"2")]
    store.check_invariants()
    store.restore(b"")
    assert len(store) == 0
    store.check_invariants()


def test_malformed_commands_get_error_results():
    store = KVStore()
    assert store.apply(b"")[0] == c.RESULT_ERROR
    assert store.apply(b"P\x05\x00")[0] == c.RESULT_ERROR
    assert store.apply(b"P\xff\x00\x00\x00abc")[0] == c.RESULT_ERROR
    assert store.apply(b"C\x01\x00\x00\x00k\x01\xff\xff\xff\xff")[0] == c.RESULT_ERROR
    assert store.apply(b"Z")[0] == c.RESULT_ERROR
    assert len(store) == 0
    with pytest.raises(ValueError):
        store.query(b"?")


@pytest.mark.parametrize("seed", range(6))
def test_batches_apply_as_commands_one_at_a_time(seed):
    """apply_commands (how the core applies a client batch, with prefetching) gives
    the results and state of applying each command alone, also while the table grows
    and shrinks in the middle of a batch."""
    rnd = random.Random(seed)
    one, many = KVStore(), KVStore()
    for round_ in range(40):
        commands = []
        for _ in range(rnd.choice([1, 3, 8, 9, 100, 700])):
            key = _random_key(rnd, 2000)
            r = rnd.random()
            if r < 0.6:
                commands.append(c.encode_put(key, rnd.randbytes(rnd.randrange(0, 100))))
            elif r < 0.8:
                commands.append(c.encode_delete(key))
            elif r < 0.95:
                commands.append(c.encode_cas(key, None, b"new"))
            else:
                commands.append(rnd.choice([b"", b"P", b"Z", b"C\x00"]))   # malformed
        expected = [one.apply(command) for command in commands]
        assert many.apply_many(commands) == expected, f"seed {seed}, round {round_}"
        assert many.snapshot() == one.snapshot(), f"seed {seed}, round {round_}"
    many.check_invariants()


def test_apply_packed_applies_a_payload_and_refuses_a_bad_one():
    store = KVStore()
    commands = [c.encode_put(b"a", b"1"), c.encode_delete(b"zz"), b"Z"]
    payload = b"".join(len(x).to_bytes(4, "little") + x for x in commands)
    assert c.unpack_results(store.apply_packed(payload, 3)) == KVStore().apply_many(commands)
    for bad, count in ((payload[:-1], 3), (payload, 2), (payload, 4)):
        with pytest.raises(ValueError):
            KVStore().apply_packed(bad, count)
