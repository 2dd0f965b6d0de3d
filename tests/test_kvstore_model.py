"""The ordered, revisioned store (KVStore) against a plain Python model.

The model keeps a dict of keys (value, create/mod revision, version, lease), the
leases, and the history window as a list with the same bounds.  Seeded random puts,
deletes, cas, transactions and lease commands are applied to both; every answer is
checked, and so are ranges at every retained past revision, history queries (whole
and paged), lease queries, snapshot/restore round trips mid-stream, the digest and
check_invariants().  Malformed commands and queries of every kind are fuzzed with
hypothesis: an error result or ValueError, never a crash, and no state change.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import commands as c

pytestmark = pytest.mark.fast

statemachine = pytest.importorskip("cypaxos.statemachine")
KVStore = statemachine.KVStore
OVERHEAD = statemachine.CHANGE_OVERHEAD_BYTES


class Model:
    """What the store should hold, the slow and obvious way."""

    def __init__(self, changes_max, bytes_max):
        self.keys = {}          # key -> [value, create, mod, version, lease]
        self.leases = {}        # id -> ttl_ms
        self.history = []       # Change tuples, previous values included
        self.history_bytes = 0
        self.revision = 0
        self.compact = 0
        self.next_lease = 1
        self.changes_max = changes_max
        self.bytes_max = bytes_max

    def record(self, change):
        if change.revision <= self.compact:
            return
        self.history.append(change)
        self.history_bytes += (OVERHEAD + len(change.key) + len(change.value or b"")
                               + len(change.prev_value or b""))
        while self.history and (len(self.history) > self.changes_max
                                or self.history_bytes > self.bytes_max):
            self.compact = self.history[0].revision
            while self.history and self.history[0].revision == self.compact:
                gone = self.history.pop(0)
                self.history_bytes -= (OVERHEAD + len(gone.key) + len(gone.value or b"")
                                       + len(gone.prev_value or b""))

    def put(self, key, value, lease, rev):
        old = self.keys.get(key)
        self.record(c.Change(rev, c.CHANGE_PUT, key, value, old[0] if old else None,
                             old[2] if old else 0))
        if old:
            self.keys[key] = [value, old[1], rev, old[3] + 1, lease]
        else:
            self.keys[key] = [value, rev, rev, 1, lease]

    def delete(self, key, rev):
        old = self.keys.pop(key, None)
        if old is None:
            return False
        self.record(c.Change(rev, c.CHANGE_DELETE, key, None, old[0], old[2]))
        return True

    def meta(self, key):
        k = self.keys.get(key)
        return None if k is None else c.KeyMeta(k[0], k[2], k[1], k[3], k[4])

    def state_at(self, rev):
        """{key: (value, mod)} as of revision rev (rev >= compact)."""
        state = {k: (v[0], v[2]) for k, v in self.keys.items()}
        for change in reversed(self.history):
            if change.revision <= rev:
                break
            if change.prev_revision:
                state[change.key] = (change.prev_value, change.prev_revision)
            else:
                state.pop(change.key, None)
        return state

    def compare(self, cmp):
        k = self.keys.get(cmp[1])
        if cmp[0] == "absent":
            return k is None
        target, _, op, operand = cmp
        if target == "value":
            if k is None:
                return False
            have = k[0]
        else:
            have = 0 if k is None else {"mod_revision": k[2], "create_revision": k[1],
                                        "version": k[3]}[target]
        return {"==": have == operand, "!=": have != operand, "<": have < operand,
                ">": have > operand}[op]


def _key(rnd, keys):
    if rnd.random() < 0.9:
        return rnd.choice(keys)
    return rnd.randbytes(rnd.randrange(0, 6))


def _value(rnd):
    return rnd.randbytes(rnd.choice([0, 1, 5, 40, 300]))


def _lease(rnd, model):
    r = rnd.random()
    if r < 0.5 or not model.leases:
        return 0
    if r < 0.9:
        return rnd.choice(sorted(model.leases))
    return model.next_lease + rnd.randrange(3)   # not granted (yet)


def _random_txn(rnd, model, keys):
    compares = []
    for _ in range(rnd.randrange(0, 4)):
        key = _key(rnd, keys)
        target = rnd.choice(["value", "mod_revision", "create_revision", "version", "absent"])
        if target == "absent":
            compares.append(("absent", key))
            continue
        op = rnd.choice(["==", "!=", "<", ">"])
        k = model.keys.get(key)
        if target == "value":
            operand = k[0] if k and rnd.random() < 0.6 else _value(rnd)
        else:
            have = 0 if k is None else {"mod_revision": k[2], "create_revision": k[1],
                                        "version": k[3]}[target]
            operand = max(0, have + rnd.choice([-1, 0, 0, 1]))
        compares.append((target, key, op, operand))

    def ops():
        out = []
        for _ in range(rnd.randrange(0, 5)):
            kind = rnd.choice(["put", "put", "delete", "get"])
            key = _key(rnd, keys)
            if kind == "put":
                out.append(("put", key, _value(rnd), _lease(rnd, model)))
            else:
                out.append((kind, key))
        return out
    return compares, ops(), ops()


def _apply_txn(model, compares, success, failure):
    succeeded = all(model.compare(cmp) for cmp in compares)
    branch = success if succeeded else failure
    for op in branch:
        if op[0] == "put" and op[3] and op[3] not in model.leases:
            return c.TxnResult(False, [], model.revision, op[3])
    rev = model.revision + 1
    changed = False
    results = []
    for op in branch:
        if op[0] == "put":
            model.put(op[1], op[2], op[3], rev)
            _attach(model, op[1], op[3])
            changed = True
            results.append(None)
        elif op[0] == "delete":
            gone = model.delete(op[1], rev)
            changed = changed or gone
            results.append(gone)
        else:
            results.append(model.meta(op[1]))
    if changed:
        model.revision = rev
    return c.TxnResult(succeeded, results, model.revision, 0)


def _attach(model, key, lease):
    model.keys[key][4] = lease


def _revoke(model, lease):
    rev = model.revision + 1
    doomed = sorted(k for k, v in model.keys.items() if v[4] == lease)
    for key in doomed:
        model.delete(key, rev)
    del model.leases[lease]
    if doomed:
        model.revision = rev


def _check_range(store, model, rev, start, end, where):
    """One range read at rev over [start, end): whole, then paged."""
    state = model.state_at(rev)
    want = [c.KeyValue(k, v, m) for k, (v, m) in sorted(state.items())
            if k >= start and (end is None or k < end)]
    got = c.decode_range(store.query(c.encode_range(start, end, revision=rev)))
    assert got == c.RangeResult(c.QUERY_OK, rev or model.revision, model.compact, False,
                                want), where
    # Paged by count or by bytes: the pages add up to the whole.
    limit, size = random.Random(rev).choice([(1, 0), (2, 0), (0, 1), (0, 200), (3, 100)])
    pages, at = [], start
    for _ in range(len(want) + 2):
        page = c.decode_range(store.query(c.encode_range(
            at, end, revision=rev, limit=limit, reply_bytes_max=size)))
        assert page.status == c.QUERY_OK and page.revision == (rev or model.revision), where
        assert page.items or not page.more, where
        pages.extend(page.items)
        if not page.more:
            break
        at = page.items[-1].key + b"\x00"
    assert pages == want, where


def _check_history(store, model, rnd, keys, where):
    start_rev = rnd.randrange(0, model.revision + 3)
    flt = rnd.choice(["all", "key", "prefix", "range"])
    kwargs = {}
    if flt == "key":
        kwargs["key"] = _key(rnd, keys)
    elif flt == "prefix":
        kwargs["prefix"] = rnd.choice([b"", b"k", b"k1", b"\xff"])
    elif flt == "range":
        a, b = sorted([_key(rnd, keys), _key(rnd, keys)])
        kwargs.update(start=a, end=b)
    with_prev = rnd.random() < 0.5
    got = c.decode_history(store.query(c.encode_history(start_rev, with_prev=with_prev,
                                                        **kwargs)))
    first = max(start_rev, 1)
    if first <= model.compact:
        assert got.status == c.QUERY_COMPACTED, where
        return
    lo, hi = _filter_bounds(kwargs)
    want = [ch if with_prev else ch._replace(prev_value=None)
            for ch in model.history if ch.revision >= first
            and ch.key >= lo and (hi is None or ch.key < hi)]
    assert got == c.HistoryResult(c.QUERY_OK, model.revision, model.compact, False,
                                  max(first, model.revision + 1), 0, want), where
    # Paged with the cursor each answer gives: the pages add up to the whole.
    limit, size = rnd.choice([(1, 0), (2, 0), (0, 1), (0, 150)])
    pages, rev, skip = [], start_rev, 0
    for _ in range(len(want) + 2):
        page = c.decode_history(store.query(c.encode_history(
            rev, skip=skip, limit=limit, reply_bytes_max=size, with_prev=with_prev,
            **kwargs)))
        assert page.status == c.QUERY_OK and (page.changes or not page.more), where
        pages.extend(page.changes)
        rev, skip = page.next_revision, page.next_skip
        if not page.more:
            break
    assert pages == want, where


def _filter_bounds(kwargs):
    if "key" in kwargs:
        return kwargs["key"], kwargs["key"] + b"\x00"
    if "prefix" in kwargs:
        return kwargs["prefix"], c.prefix_end(kwargs["prefix"])
    return kwargs.get("start", b""), kwargs.get("end")


def _check_leases(store, model, where):
    more, leases = c.decode_lease_list(store.query(c.encode_lease_list()))
    assert not more
    counts = {}
    for v in model.keys.values():
        if v[4]:
            counts[v[4]] = counts.get(v[4], 0) + 1
    assert leases == [c.LeaseInfo(i, ttl, counts.get(i, 0))
                      for i, ttl in sorted(model.leases.items())], where
    for lease in list(model.leases)[:3] + [model.next_lease]:
        got = c.decode_lease_keys(store.query(c.encode_lease_keys(lease)))
        want = sorted(k for k, v in model.keys.items() if v[4] == lease)
        assert got == c.LeaseKeys(lease in model.leases, model.leases.get(lease, 0),
                                  False, want), where
        # Paged by bytes from a start key.
        pages, at = [], b""
        for _ in range(len(want) + 2):
            page = c.decode_lease_keys(store.query(c.encode_lease_keys(lease, at, 1)))
            pages.extend(page.keys)
            if not page.more:
                break
            at = page.keys[-1] + b"\x00"
        assert pages == want, where


def _check_state(store, model, where):
    store.check_invariants()
    snap = c.decode_kv_snapshot(store.snapshot())
    assert snap.revision == model.revision and snap.compact_revision == model.compact, where
    assert snap.next_lease_id == model.next_lease, where
    assert snap.keys == [(k, model.meta(k)) for k in sorted(model.keys)], where
    assert snap.leases == sorted(model.leases.items()), where
    assert snap.changes == model.history, where
    status = c.decode_store_status(store.query(c.encode_store_status()))
    assert status == c.StoreStatus(model.revision, model.compact, len(model.keys),
                                   len(model.leases), model.next_lease,
                                   len(model.history), model.history_bytes), where


@pytest.mark.parametrize("seed", range(16))
def test_store_matches_the_model(seed):
    rnd = random.Random(seed)
    changes_max = rnd.choice([3, 40, 1000])
    bytes_max = rnd.choice([300, 5000, 1 << 20])
    store = KVStore(history_changes_max=changes_max, history_bytes_max=bytes_max)
    model = Model(changes_max, bytes_max)
    keys = [b"k%d" % i for i in range(rnd.choice([5, 40, 400]))]
    steps = rnd.choice([300, 1500])
    for step in range(steps):
        where = f"seed {seed}, step {step}"
        r = rnd.random()
        key = _key(rnd, keys)
        if r < 0.2:
            value = _value(rnd)
            assert store.apply(c.encode_put(key, value)) == (c.RESULT_OK, b""), where
            model.revision += 1
            model.put(key, value, 0, model.revision)
        elif r < 0.35:
            value, lease = _value(rnd), _lease(rnd, model)
            status, result = store.apply(c.encode_put_rev(key, value, lease))
            if lease and lease not in model.leases:
                assert c.decode_write(result) == (False, model.revision), where
            else:
                model.revision += 1
                model.put(key, value, lease, model.revision)
                _attach(model, key, lease)
                assert c.decode_write(result) == (True, model.revision), where
        elif r < 0.45:
            old = rnd.random() < 0.5
            status, result = store.apply(c.encode_delete(key) if old
                                         else c.encode_delete_rev(key))
            gone = model.delete(key, model.revision + 1)
            model.revision += gone
            if old:
                assert c.decode_bool(result) == gone, where
            else:
                assert c.decode_write(result) == (gone, model.revision), where
        elif r < 0.55:
            k = model.keys.get(key)
            choice = rnd.random()
            expected = (k[0] if k else b"x") if choice < 0.5 else None if choice < 0.75 else b"x"
            new = _value(rnd)
            matched = k is None if expected is None else (k is not None and k[0] == expected)
            old = rnd.random() < 0.5
            status, result = store.apply(c.encode_cas(key, expected, new) if old
                                         else c.encode_cas_rev(key, expected, new))
            if matched:
                model.revision += 1
                model.put(key, new, 0, model.revision)
            if old:
                assert c.decode_bool(result) == matched, where
            else:
                assert c.decode_write(result) == (matched, model.revision), where
        elif r < 0.7:
            compares, success, failure = _random_txn(rnd, model, keys)
            status, result = store.apply(c.encode_txn(compares, success, failure))
            assert status == c.RESULT_OK, where
            assert c.decode_txn(result) == _apply_txn(model, compares, success, failure), where
        elif r < 0.75:
            ttl = rnd.randrange(1, 10**6)
            status, result = store.apply(c.encode_lease_grant(ttl))
            assert c.decode_lease_grant(result) == model.next_lease, where
            model.leases[model.next_lease] = ttl
            model.next_lease += 1
        elif r < 0.8:
            lease = _lease(rnd, model) or rnd.randrange(0, 3)
            status, result = store.apply(c.encode_lease_revoke(lease))
            existed = lease in model.leases
            if existed:
                _revoke(model, lease)
            assert c.decode_write(result) == (existed, model.revision), where
        elif r < 0.85:
            got = c.decode_get_rev(store.query(c.encode_get_rev(key)))
            assert got == c.GetResult(model.revision, model.meta(key)), where
            assert c.decode_get(store.query(c.encode_get(key))) == \
                (model.keys[key][0] if key in model.keys else None), where
        elif r < 0.9:
            a, b = sorted([_key(rnd, keys), _key(rnd, keys)])
            rev = rnd.randrange(max(model.compact, 1), model.revision + 1)   # 0 means now
            _check_range(store, model, rev, a, b if rnd.random() < 0.7 else None, where)
            if model.compact:
                got = c.decode_range(store.query(c.encode_range(revision=model.compact - 1
                                                                or 1)))
                if model.compact > 1:
                    assert got.status == c.QUERY_COMPACTED, where
            got = c.decode_range(store.query(c.encode_range(revision=model.revision + 1)))
            assert got.status == c.QUERY_FUTURE_REVISION, where
        elif r < 0.95:
            _check_history(store, model, rnd, keys, where)
        elif r < 0.97:
            _check_leases(store, model, where)
        else:
            # A snapshot round trip mid-stream: the restored store goes on instead.
            data = store.snapshot()
            restored = KVStore(history_changes_max=changes_max, history_bytes_max=bytes_max)
            restored.restore(data)
            assert restored.snapshot() == data, where
            assert restored.state_digest() == store.state_digest(), where
            store = restored
        if step % 97 == 0:
            _check_state(store, model, where)
    _check_state(store, model, f"seed {seed}, end")
    # Every retained past revision reads as the model says.
    for rev in range(max(model.compact, 1), model.revision + 1):
        _check_range(store, model, rev, b"", None, f"seed {seed}, range at {rev}")
    _check_leases(store, model, f"seed {seed}, end")


def test_replicas_applying_the_same_commands_agree():
    """Two stores (hash seeds aside, as two replicas) given the same commands, one of
    them restored from a snapshot midway, have equal digests at every step."""
    rnd = random.Random(7)
    one, two = KVStore(history_changes_max=50), KVStore(history_changes_max=50)
    model = Model(50, 1 << 30)
    keys = [b"k%d" % i for i in range(30)]
    for step in range(600):
        if rnd.random() < 0.3:
            command = c.encode_txn(*_random_txn(rnd, model, keys))
        elif rnd.random() < 0.1:
            command = c.encode_lease_grant(5000)
        else:
            command = c.encode_put_rev(_key(rnd, keys), _value(rnd), rnd.randrange(0, 4))
        assert one.apply(command) == two.apply(command)
        assert one.state_digest() == two.state_digest(), step
        if step == 300:
            fresh = KVStore(history_changes_max=50)
            fresh.restore(two.snapshot())
            two = fresh


def test_revisions_of_each_write_kind():
    store = KVStore()
    assert c.decode_write(store.apply(c.encode_put_rev(b"a", b"1"))[1]) == (True, 1)
    assert store.apply(c.encode_put(b"b", b"2")) == (c.RESULT_OK, b"")
    assert store.revision == 2
    assert c.decode_write(store.apply(c.encode_delete_rev(b"zz"))[1]) == (False, 2)
    assert c.decode_write(store.apply(c.encode_cas_rev(b"a", b"0", b"x"))[1]) == (False, 2)
    assert c.decode_write(store.apply(c.encode_cas_rev(b"a", b"1", b"x"))[1]) == (True, 3)
    got = c.decode_get_rev(store.query(c.encode_get_rev(b"a")))
    assert got == c.GetResult(3, c.KeyMeta(b"x", 3, 1, 2, 0))
    # A transaction is one revision, however many keys it changes.
    result = c.decode_txn(store.apply(c.encode_txn(
        [("value", b"a", "==", b"x"), ("mod_revision", b"b", "==", 2), ("absent", b"c")],
        [("put", b"c", b"3"), ("delete", b"b"), ("get", b"c"), ("get", b"b")],
        [("get", b"a")]))[1])
    assert result == c.TxnResult(True, [None, True, c.KeyMeta(b"3", 4, 4, 1, 0), None], 4)
    # A lease: its keys go at one revision when it is revoked.
    lease = c.decode_lease_grant(store.apply(c.encode_lease_grant(10_000))[1])
    assert lease == 1
    for key in (b"l2", b"l1"):
        store.apply(c.encode_put_rev(key, b"v", lease))
    assert c.decode_write(store.apply(c.encode_put_rev(b"x", b"v", 99))[1]) == (False, 6)
    assert c.decode_txn(store.apply(c.encode_txn([], [("put", b"x", b"v", 99)]))[1]) == \
        c.TxnResult(False, [], 6, 99)
    assert c.decode_write(store.apply(c.encode_lease_revoke(lease))[1]) == (True, 7)
    history = c.decode_history(store.query(c.encode_history(7)))
    assert [(ch.revision, ch.kind, ch.key) for ch in history.changes] == [
        (7, c.CHANGE_DELETE, b"l1"), (7, c.CHANGE_DELETE, b"l2")]
    assert c.decode_write(store.apply(c.encode_lease_revoke(lease))[1]) == (False, 7)
    store.check_invariants()


def test_the_window_keeps_whole_revisions_and_says_compacted():
    store = KVStore(history_changes_max=3)
    store.apply(c.encode_txn([], [("put", b"a", b"1"), ("put", b"b", b"1")]))   # rev 1
    store.apply(c.encode_put(b"a", b"2"))                                       # rev 2
    store.apply(c.encode_put(b"c", b"3"))                                       # rev 3
    # Rev 1's two changes went together; rev 1 itself is still readable.
    assert (store.compact_revision, store.revision) == (1, 3)
    assert c.decode_history(store.query(c.encode_history(1))).status == c.QUERY_COMPACTED
    assert [ch.revision for ch in c.decode_history(store.query(c.encode_history(2))).changes] \
        == [2, 3]
    at1 = c.decode_range(store.query(c.encode_range(revision=1)))
    assert at1.items == [c.KeyValue(b"a", b"1", 1), c.KeyValue(b"b", b"1", 1)]
    store.apply(c.encode_put(b"d", b"4"))
    store.apply(c.encode_put(b"e", b"5"))   # rev 2 goes
    assert store.compact_revision == 2
    assert c.decode_range(store.query(c.encode_range(revision=1))).status == c.QUERY_COMPACTED
    at2 = c.decode_range(store.query(c.encode_range(revision=2)))
    assert at2.items == [c.KeyValue(b"a", b"2", 2), c.KeyValue(b"b", b"1", 1)]
    # A command larger than the whole window leaves none of itself behind.
    small = KVStore(history_bytes_max=100)
    small.apply(c.encode_put(b"k", b"v" * 200))
    assert (small.compact_revision, small.revision) == (1, 1)
    small.check_invariants()


def test_ranges_over_many_keys_use_the_index():
    """Enough keys for a tree several levels deep, removed in an order that merges and
    refills nodes on both sides."""
    store = KVStore(history_changes_max=10)
    rnd = random.Random(3)
    keys = [b"%06d" % i for i in range(20000)]
    shuffled = keys[:]
    rnd.shuffle(shuffled)
    store.apply_many([c.encode_put(k, k) for k in shuffled])
    store.check_invariants()
    got = c.decode_range(store.query(c.encode_range(b"000100", b"000110")))
    assert [kv.key for kv in got.items] == keys[100:110]
    got = c.decode_range(store.query(c.encode_range(prefix=b"0199", limit=5)))
    assert [kv.key for kv in got.items] == keys[19900:19905] and got.more
    live = set(keys)
    for k in shuffled[:15000] + keys[-3000:]:
        if k in live:
            store.apply(c.encode_delete(k))
            live.remove(k)
    store.check_invariants()
    got = c.decode_range(store.query(c.encode_range(limit=0, reply_bytes_max=1 << 23)))
    assert [kv.key for kv in got.items] == sorted(live)
    for k in sorted(live):
        store.apply(c.encode_delete(k))
    store.check_invariants()
    assert c.decode_range(store.query(c.encode_range())).items == []


def test_version_0_snapshots_restore_as_created_at_revision_1():
    old = b"".join(len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little") + k + v
                   for k, v in [(b"b", b"2"), (b"a", b"1")])
    store = KVStore()
    store.restore(old)
    store.check_invariants()
    assert (store.revision, store.compact_revision) == (1, 1)
    assert c.decode_range(store.query(c.encode_range())).items == [
        c.KeyValue(b"a", b"1", 1), c.KeyValue(b"b", b"2", 1)]
    store.apply(c.encode_put(b"a", b"x"))
    assert c.decode_get_rev(store.query(c.encode_get_rev(b"a"))).kv == c.KeyMeta(b"x", 2, 1, 2, 0)


def _busy_store():
    store = KVStore(history_changes_max=20)
    lease = c.decode_lease_grant(store.apply(c.encode_lease_grant(3000))[1])
    for i in range(30):
        store.apply(c.encode_put_rev(b"k%d" % (i % 7), b"v%d" % i, lease if i % 3 else 0))
    store.apply(c.encode_delete(b"k1"))
    return store


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.binary(max_size=8))
def test_a_damaged_snapshot_is_refused_and_changes_nothing(at, junk):
    store = _busy_store()
    good = store.snapshot()
    digest = store.state_digest()
    bad = good[:at % (len(good) + 1)] + junk + good[at % (len(good) + 1) + len(junk):]
    target = _busy_store()
    try:
        target.restore(bad)
    except ValueError:
        assert target.state_digest() == digest
    target.check_invariants()


_COMMAND_KINDS = [b"P", b"D", b"C", b"p", b"d", b"c", b"T", b"L", b"V"]


def _valid_commands():
    return [c.encode_put(b"k", b"v"), c.encode_cas(b"k", b"v", b"w"),
            c.encode_put_rev(b"k", b"v", 1), c.encode_cas_rev(b"k", None, b"w"),
            c.encode_lease_grant(5), c.encode_lease_revoke(1),
            c.encode_txn([("value", b"k", "==", b"v"), ("version", b"k", ">", 1),
                          ("absent", b"q")],
                         [("put", b"k", b"x", 1), ("delete", b"j"), ("get", b"k")],
                         [("get", b"j")])]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_COMMAND_KINDS + [b"T" + b"\x01\x00\x00\x00"]), st.binary(max_size=60),
       st.integers(0, 6), st.integers(0, 200), st.binary(max_size=6))
def test_malformed_commands_are_refused_whole(kind, body, which, cut, junk):
    """Random bodies, and valid commands cut short or with bytes changed: either an
    error result that changed nothing, or a well-formed command's result."""
    store = _busy_store()
    before = store.state_digest()
    valid = _valid_commands()[which]
    for command in (kind + body, valid[:cut], valid[:cut] + junk + valid[cut + len(junk):]):
        status, result = store.apply(command)
        assert status in (c.RESULT_OK, c.RESULT_ERROR)
        if status == c.RESULT_ERROR:
            assert store.state_digest() == before
        store.check_invariants()
        before = store.state_digest()


_QUERIES = [c.encode_range(b"a", b"z", revision=3, limit=2), c.encode_range(prefix=b"k"),
            c.encode_history(5, key=b"k1", with_prev=True), c.encode_history(0),
            c.encode_lease_list(1), c.encode_lease_keys(1, b"k"), c.encode_get_rev(b"k")]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"R", b"H", b"E", b"K", b"g", b"S"]), st.binary(max_size=60),
       st.integers(0, len(_QUERIES) - 1), st.integers(0, 80), st.binary(max_size=6))
def test_malformed_queries_raise_value_error(kind, body, which, cut, junk):
    store = _busy_store()
    valid = _QUERIES[which]
    for query in (kind + body, valid[:cut], valid[:cut] + junk + valid[cut + len(junk):]):
        try:
            store.query(query)
        except ValueError:
            pass
    store.check_invariants()


def test_commands_decode_command_knows_every_kind():
    for command in _valid_commands():
        assert c.decode_command(command)[0]


@pytest.mark.parametrize("seed", range(4))
def test_the_index_under_random_creates_and_removes(seed):
    """Keys shorter than 8 bytes, and keys sharing prefixes longer than 8 (so that the
    nodes' prefixes tie), created and removed at random while the tree grows and
    shrinks through several levels; the index is checked as it goes."""
    rnd = random.Random(seed)
    store = KVStore(history_changes_max=1)
    live = set()
    shapes = [lambda i: b"%d" % i, lambda i: b"/registry/pods/ns-%d/p%d" % (i % 7, i),
              lambda i: bytes([i % 256]) * (i % 11), lambda i: b"k%06d" % i]
    for step in range(12000):
        key = rnd.choice(shapes)(rnd.randrange(4000))
        if rnd.random() < (0.7 if step < 6000 else 0.3):
            store.apply(c.encode_put(key, b"v"))
            live.add(key)
        else:
            store.apply(c.encode_delete(key))
            live.discard(key)
        if step % 1500 == 0:
            store.check_invariants()
            got = c.decode_range(store.query(c.encode_range(reply_bytes_max=1 << 23)))
            assert [kv.key for kv in got.items] == sorted(live)
    store.check_invariants()
    a, b = sorted(rnd.sample(sorted(live), 2))
    got = c.decode_range(store.query(c.encode_range(a, b, reply_bytes_max=1 << 23)))
    assert [kv.key for kv in got.items] == [k for k in sorted(live) if a <= k < b]
