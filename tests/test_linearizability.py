"""Tests for cypaxos.testing.linearizability."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import time

import pytest

from cypaxos.testing.linearizability import (
    CheckResult,
    CheckTimeout,
    History,
    Op,
    check,
)

pytestmark = pytest.mark.fast

A, B, C = b"a", b"b", b"c"
K = b"k"


def op(kind, arg=None, start=0, end=1, result=None, outcome="ok", key=K, client=0):
    """Terse Op constructor for hand-written histories."""
    return Op(client, kind, key, arg, start, end, outcome, result)


def put(v, s, e, **kw):
    return op("put", v, s, e, **kw)


def get(r, s, e, **kw):
    return op("get", None, s, e, result=r, **kw)


def delete(r, s, e, **kw):
    return op("delete", None, s, e, result=r, **kw)


def cas(exp, new, r, s, e, **kw):
    return op("cas", (exp, new), s, e, result=r, **kw)


def unknown(kind, arg, s, end=None, **kw):
    return op(kind, arg, s, end, outcome="unknown", **kw)


def ok(ops, initial=None):
    return check(ops, initial).ok


# --------------------------------------------------------------------------
# Hand-written histories
# --------------------------------------------------------------------------

def test_empty_history():
    res = check([])
    assert res == CheckResult(True, None, res.message, 0)


def test_sequential_put_get():
    assert ok([put(A, 0, 1), get(A, 2, 3), put(B, 4, 5), get(B, 6, 7)])


def test_read_of_absent_key():
    assert ok([get(None, 0, 1)])
    assert not ok([get(A, 0, 1)])


def test_initial_state():
    assert ok([get(A, 0, 1)], initial={K: A})
    assert not ok([get(None, 0, 1)], initial={K: A})
    assert ok([get(None, 0, 1)], initial={b"other": A})


def test_stale_read_after_completed_write():
    res = check([put(A, 0, 1), put(B, 2, 3), get(A, 4, 5)])
    assert not res.ok
    assert res.key == K
    assert "get()" in res.message and "put(b'b')" in res.message


def test_lost_write():
    assert not ok([put(A, 0, 1), get(None, 2, 3)])


def test_read_concurrent_with_write_sees_old_or_new():
    assert ok([put(A, 0, 1), put(B, 2, 6), get(A, 3, 4)])
    assert ok([put(A, 0, 1), put(B, 2, 6), get(B, 3, 4)])
    # ...but not new-then-old by one client after the other.
    assert not ok([put(A, 0, 1), put(B, 2, 9), get(B, 3, 4), get(A, 5, 6)])


def test_concurrent_writes_both_orders_valid():
    base = [put(A, 0, 10, client=1), put(B, 1, 9, client=2)]
    assert ok(base + [get(A, 11, 12)])
    assert ok(base + [get(B, 11, 12)])
    assert not ok(base + [get(None, 11, 12)])
    # Two later reads must agree on the winner.
    assert not ok(base + [get(A, 11, 12), get(B, 13, 14)])


def test_touching_intervals_are_concurrent():
    # With an integer clock, end == start does not prove order.
    assert ok([put(A, 0, 5), get(None, 5, 6)])
    assert not ok([put(A, 0, 5), get(None, 6, 7)])


def test_cas_success_and_failure():
    assert ok([cas(None, A, True, 0, 1), cas(None, B, False, 2, 3), get(A, 4, 5)])
    assert ok([put(A, 0, 1), cas(A, B, True, 2, 3), get(B, 4, 5)])
    # A cas that fails although the value matched.
    assert not ok([put(A, 0, 1), cas(A, B, False, 2, 3)])
    # A cas that succeeds although the value did not match.
    assert not ok([put(A, 0, 1), cas(B, C, True, 2, 3)])


def test_cas_applied_twice():
    assert not ok([cas(None, A, True, 0, 1), cas(None, A, True, 2, 3)])
    # Even when concurrent, only one "create if absent" can win.
    assert not ok([cas(None, A, True, 0, 5, client=1), cas(None, B, True, 1, 4, client=2)])
    assert not ok([put(A, 0, 1), cas(A, B, True, 2, 3), cas(A, C, True, 4, 5)])
    # With a delete in between both can succeed.
    assert ok([cas(None, A, True, 0, 1), delete(True, 2, 3), cas(None, A, True, 4, 5)])


def test_value_never_written():
    res = check([put(A, 0, 1), get(b"zzz", 2, 3)])
    assert not res.ok and "b'zzz'" in res.message
    assert not ok([put(A, 0, 1), cas(b"zzz", B, True, 2, 3)])
    assert ok([put(A, 0, 1), cas(b"zzz", B, False, 2, 3)])
    assert ok([get(b"zzz", 2, 3)], initial={K: b"zzz"})


def test_delete_results():
    assert ok([put(A, 0, 1), delete(True, 2, 3), delete(False, 4, 5), get(None, 6, 7)])
    assert not ok([delete(True, 0, 1)])
    assert not ok([put(A, 0, 1), delete(False, 2, 3)])
    assert not ok([put(A, 0, 1), delete(True, 2, 3), delete(True, 4, 5)])
    assert not ok([put(A, 0, 1), delete(True, 2, 3), get(A, 4, 5)])
    # Concurrent deletes: exactly one may report True.
    assert ok([put(A, 0, 1), delete(True, 2, 5, client=1), delete(False, 3, 4, client=2)])
    assert not ok([put(A, 0, 1), delete(True, 2, 5, client=1), delete(True, 3, 4, client=2)])


def test_unknown_write_that_later_shows_up():
    assert ok([unknown("put", A, 0), get(None, 1, 2), get(A, 50, 51)])
    # Its effect may land long after the client gave up on it.
    assert ok([unknown("put", A, 0, 1), get(None, 10, 11), get(A, 50, 51)])
    # But once seen it cannot vanish without another write.
    assert not ok([unknown("put", A, 0), get(A, 1, 2), get(None, 3, 4)])
    # Nor take effect before it was invoked.
    assert not ok([get(A, 0, 1), unknown("put", A, 2)])


def test_unknown_write_that_never_shows():
    ops = [unknown("put", bytes([i]), i) for i in range(50)]
    ops += [get(None, 100 + 2 * i, 101 + 2 * i) for i in range(50)]
    assert ok(ops)


def test_unknown_delete_and_cas():
    assert ok([put(A, 0, 1), unknown("delete", None, 2), get(None, 5, 6)])
    assert ok([put(A, 0, 1), unknown("cas", (A, B), 2), get(B, 5, 6), get(B, 7, 8)])
    # A cas whose precondition never held cannot explain the read.
    assert not ok([put(A, 0, 1), unknown("cas", (C, B), 2), get(B, 5, 6)])


def test_failed_ops_are_ignored():
    assert ok([put(A, 0, 1, outcome="fail"), get(None, 2, 3)])
    assert not ok([put(A, 0, 1, outcome="fail"), get(A, 2, 3)])


def test_unknown_reads_are_ignored():
    assert ok([put(A, 0, 1), unknown("get", None, 2, 3), get(A, 4, 5)])


def test_keys_are_independent():
    k1, k2 = b"k1", b"k2"
    ops = [
        put(A, 0, 1, key=k1),
        put(B, 0, 1, key=k2),
        get(A, 2, 3, key=k1),
        get(B, 2, 3, key=k2),
    ]
    assert ok(ops)
    res = check(ops + [get(A, 4, 5, key=k2)])
    assert not res.ok and res.key == k2
    assert res.ops_checked == 5


def test_invalid_ops_rejected():
    with pytest.raises(ValueError):
        check([op("incr")])
    with pytest.raises(ValueError):
        check([op("put", A, outcome="maybe")])
    with pytest.raises(ValueError):
        check([op("put", A, start=5, end=1)])
    with pytest.raises(ValueError):
        check([op("put", A, end=None)])
    with pytest.raises(ValueError):
        check([op("cas", A)])


def test_failure_message_is_concise_and_points_at_the_problem():
    # 200 writes with a read after each; read 150 returns a stale value.
    ops = []
    for i in range(200):
        ops.append(put(b"v%d" % i, 10 * i, 10 * i + 2, client=i % 3))
        seen = b"v%d" % (i - 5 if i == 150 else i)
        ops.append(get(seen, 10 * i + 3, 10 * i + 4, client=3))
    res = check(ops)
    assert not res.ok
    lines = res.message.splitlines()
    assert len(lines) < 60
    assert "key b'k'" in lines[0]
    assert "[1503, 1504] client 3: get() ok -> b'v145'" in res.message
    # A read of a value nobody wrote is reported as such.
    res = check(ops + [get(b"never", 5000, 5001)])
    assert "b'never'" in res.message.splitlines()[0]


def test_step_budget_raises_instead_of_passing():
    # Many concurrent writes, then two reads that disagree: refuting it
    # means trying every subset of the writes.
    ops = [put(bytes([i]), 0, 100, client=i) for i in range(12)]
    ops += [get(bytes([0]), 101, 102), get(bytes([1]), 103, 104)]
    with pytest.raises(CheckTimeout) as info:
        check(ops, max_steps=1000)
    assert info.value.key == K
    assert not check(ops).ok


# --------------------------------------------------------------------------
# History recording and persistence
# --------------------------------------------------------------------------

def test_history_records_calls():
    h = History()
    t1 = h.invoke("c1", "put", K, A, now=0)
    t2 = h.invoke("c2", "get", K, None, now=1)
    t3 = h.invoke("c3", "cas", K, (A, B), now=2)
    h.complete(t1, "ok", None, now=3)
    h.complete(t2, "ok", A, now=4)
    ops = h.ops()
    assert ops[0] == Op("c1", "put", K, A, 0, 3, "ok", None)
    assert ops[1] == Op("c2", "get", K, None, 1, 4, "ok", A)
    # Never completed: counts as unknown.
    assert ops[2].outcome == "unknown" and ops[2].end is None
    assert h.check().ok and len(h) == 3
    with pytest.raises(ValueError):
        h.complete(t1, "ok", None, now=5)
    h.complete(t3, "unknown", None, now=9)
    assert h.ops()[2] == Op("c3", "cas", K, (A, B), 2, 9, "unknown", None)


def test_history_defaults_to_monotonic_clock():
    h = History()
    before = time.monotonic()
    h.complete(h.invoke(0, "get", K), "ok", None)
    (rec,) = h.ops()
    assert before <= rec.start <= rec.end <= time.monotonic()


def test_history_save_load_roundtrip(tmp_path):
    h = History()
    tok = h.invoke(1, "cas", b"\x00key", (None, b"\xff\x00"), now=0.125)
    h.complete(tok, "ok", True, now=1.5)
    h.complete(h.invoke("c", "put", "strkey", b"v", now=2), "fail", None, now=3)
    h.invoke(2, "delete", b"k", None, now=4)  # left open
    h.complete(h.invoke(3, "get", b"\x00key", None, now=5), "ok", b"\xff\x00", now=6)
    path = tmp_path / "history.json"
    h.save(str(path))
    loaded = History.load(str(path))
    assert loaded.ops() == h.ops()
    assert loaded.check().ok


def test_saved_failing_history_fails_again(tmp_path):
    rng = random.Random(7)
    ops, _ = generate(rng, 300, keys=3, clients=5)
    ops, _ = mutate_future_read(rng, ops)
    path = tmp_path / "bad.json"
    History(ops).save(str(path))
    again = check(History.load(str(path)).ops())
    assert not again.ok
    assert again.message == check(ops).message


# --------------------------------------------------------------------------
# Brute-force cross-check on tiny histories
# --------------------------------------------------------------------------

def _model(kind, arg, state):
    """Reference KV register: (result, new state)."""
    if kind == "put":
        return None, arg
    if kind == "get":
        return state, state
    if kind == "delete":
        return state is not None, None
    expected, new = arg
    return (True, new) if state == expected else (False, state)


def brute_force(ops, init=None):
    """Linearizable iff some subset of unknown writes plus all ok ops has a
    real-time-respecting order matching every ok result."""
    done = [o for o in ops if o.outcome == "ok"]
    maybe = [o for o in ops if o.outcome == "unknown" and o.kind != "get"]

    def end(o):
        return o.end if o.outcome == "ok" else math.inf

    for n in range(len(maybe) + 1):
        for extra in itertools.combinations(maybe, n):
            for order in itertools.permutations(done + list(extra)):
                if any(end(order[j]) < order[i].start
                       for i in range(len(order)) for j in range(i + 1, len(order))):
                    continue
                state = init
                for o in order:
                    res, state = _model(o.kind, o.arg, state)
                    if o.outcome == "ok" and o.kind != "put" and res != o.result:
                        break
                else:
                    return True
    return False


def reference(ops, init=None):
    """Plain memoized search with none of the checker's pruning: pick any op
    that no pending completed op must precede; unknown ops are optional."""
    done = frozenset(o for o in ops if o.outcome == "ok")
    maybe = frozenset(o for o in ops if o.outcome == "unknown" and o.kind != "get")

    @functools.lru_cache(maxsize=None)
    def search(left, optional, state):
        if not left:
            return True
        deadline = min(o.end for o in left)
        for o in left | optional:
            if o.start > deadline:
                continue
            res, new = _model(o.kind, o.arg, state)
            if o in left and o.kind != "put" and res != o.result:
                continue
            if search(left - {o}, optional - {o}, new):
                return True
        return False

    return search(done, maybe, init)


def random_small_history(rng, n_max, p_unknown=0.2):
    vals = [None, A, B]
    ops = []
    for c in range(rng.randint(1, n_max)):
        kind = rng.choice(["put", "get", "delete", "cas"])
        arg = {"put": rng.choice([A, B]), "cas": (rng.choice(vals), rng.choice([A, B]))}.get(kind)
        result = rng.choice(vals) if kind == "get" else rng.choice([True, False])
        if kind == "put":
            result = None
        start = rng.randint(0, n_max)
        end = start + rng.randint(0, 4)
        outcome = rng.choices(["ok", "unknown", "fail"], [1 - p_unknown - 0.1, p_unknown, 0.1])[0]
        if outcome == "unknown" and rng.random() < 0.5:
            end = None
        ops.append(Op(c, kind, K, arg, start, end, outcome, result))
    return ops


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_tiny_histories(seed):
    rng = random.Random(seed)
    verdicts = set()
    for _ in range(400):
        ops = random_small_history(rng, 6)
        init = rng.choice([None, A])
        expected = brute_force(ops, init)
        assert check(ops, {K: init}).ok == expected, ops
        verdicts.add(expected)
    assert verdicts == {True, False}  # the generator exercises both answers


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_search_on_small_histories(seed):
    # Larger than brute force allows, with many unknown ops, to exercise the
    # checker's pruning of unknown ops against a search that has none.
    rng = random.Random(100 + seed)
    verdicts = []
    for _ in range(300):
        ops = random_small_history(rng, 12, p_unknown=rng.choice([0.2, 0.5]))
        init = rng.choice([None, A])
        expected = reference(ops, init)
        assert check(ops, {K: init}).ok == expected, ops
        verdicts.append(expected)
    assert 0.1 < sum(verdicts) / len(verdicts) < 0.9


# --------------------------------------------------------------------------
# Randomized histories from a simulated register
# --------------------------------------------------------------------------

def generate(rng, n_ops, keys, clients, *, values=4, p_unknown=0.05, p_fail=0.03,
             int_clock=False):
    """Linearizable history: every applied op takes effect at a random point
    of its interval (unknown ops: any time after start, or never)."""
    key_names = [b"key%d" % i for i in range(keys)]
    pool = [b"v%d" % i for i in range(values)]
    per_client = [n_ops // clients + (c < n_ops % clients) for c in range(clients)]
    plans = []  # (lin point or None, index)
    raw = []
    for c, count in enumerate(per_client):
        t = rng.randint(0, 3) if int_clock else rng.uniform(0, 3)
        for _ in range(count):
            kind = rng.choice(["put", "put", "get", "get", "get", "delete", "cas", "cas"])
            key = rng.choice(key_names)
            arg = {"put": rng.choice(pool),
                   "cas": (rng.choice(pool + [None]), rng.choice(pool))}.get(kind)
            dur = rng.randint(0, 6) if int_clock else rng.expovariate(1 / 2.0)
            start, end = t, t + dur
            roll = rng.random()
            if roll < p_fail:
                outcome, lin = "fail", None
            elif roll < p_fail + p_unknown:
                outcome = "unknown"
                lin = start + rng.uniform(0, 40) if rng.random() < 0.5 else None
            else:
                outcome, lin = "ok", rng.uniform(start, end)
            raw.append([c, kind, key, arg, start, end, outcome, None])
            if lin is not None:
                plans.append((lin, len(raw) - 1))
            gap = rng.randint(0, 3) if int_clock else rng.uniform(0, 1)
            t = end + gap
    state = {}
    for _, idx in sorted(plans):
        rec = raw[idx]
        res, new = _model(rec[1], rec[3], state.get(rec[2]))
        state[rec[2]] = new
        rec[7] = res
    ops = []
    for rec in raw:
        if rec[6] != "ok":
            rec[7] = None
            if rec[6] == "unknown" and rng.random() < 0.5:
                rec[5] = None  # the client never heard back at all
        ops.append(Op(*rec))
    rng.shuffle(ops)  # the checker must not rely on input order
    return ops, key_names


def mutate_read(rng, ops):
    """Make one completed read return a value that was never written."""
    reads = [i for i, o in enumerate(ops) if o.kind == "get" and o.outcome == "ok"]
    i = rng.choice(reads)
    bad = list(ops)
    bad[i] = dataclasses.replace(ops[i], result=b"never-written")
    return bad, bad[i]


def mutate_future_read(rng, ops):
    """Make one completed read return the value of a write that was only
    invoked after the read returned (an unknown-outcome put, so that the
    rest of the history stays linearizable and only the search can tell)."""
    reads = [i for i, o in enumerate(ops) if o.kind == "get" and o.outcome == "ok"]
    i = rng.choice(reads)
    bad = list(ops)
    bad[i] = dataclasses.replace(ops[i], result=b"future")
    # Invoked just after the read returned (one tick on an integer clock).
    late = ops[i].end + (1 if isinstance(ops[i].end, int) else rng.choice([1.0, 1e-3]))
    bad.append(Op("late", "put", ops[i].key, b"future", late, None, "unknown", None))
    return bad, bad[i]


@pytest.mark.parametrize("seed", range(20))
def test_random_linearizable_histories_pass(seed):
    rng = random.Random(seed)
    ops, _ = generate(rng, rng.randint(20, 400), keys=rng.randint(1, 4),
                      clients=rng.randint(1, 8), int_clock=seed % 2 == 1,
                      p_unknown=rng.choice([0.0, 0.05, 0.3]))
    res = check(ops)
    assert res.ok, res.message


@pytest.mark.parametrize("mutate", [mutate_read, mutate_future_read])
@pytest.mark.parametrize("seed", range(20))
def test_mutated_read_fails(seed, mutate):
    rng = random.Random(1000 + seed)
    ops, _ = generate(rng, rng.randint(20, 300), keys=rng.randint(1, 3),
                      clients=rng.randint(1, 8), int_clock=seed % 2 == 1,
                      p_unknown=rng.choice([0.0, 0.05, 0.3]))
    bad, changed = mutate(rng, ops)
    res = check(bad)
    assert not res.ok
    assert res.key == changed.key
    assert f"client {changed.client!r}: get() ok -> {changed.result!r}" in res.message


def test_many_pending_unknown_writes_do_not_explode():
    # 60 writes that time out at once on one hot key, only one ever visible,
    # followed by a long run of completed ops.
    rng = random.Random(3)
    ops = [unknown("put", b"u%d" % i, i * 0.01, client=i) for i in range(60)]
    ops.append(get(b"u42", 0.5, 0.9, client=200))
    t, last = 1.0, b"u42"
    for i in range(300):
        if rng.random() < 0.3:
            last = b"p%d" % i
            ops.append(put(last, t, t + 1, client=100))
        else:
            ops.append(get(last, t, t + 1, client=100))
        t += 2
    start = time.perf_counter()
    assert check(ops).ok
    # The same history with an impossible read at the end must fail fast
    # too, not wander through subsets of the pending writes.
    assert not check(ops + [get(b"u42", t + 5, t + 6, client=100)], max_steps=2_000_000).ok
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("n_ops, keys, clients", [(2400, 4, 12), (1200, 2, 20)])
def test_hot_keys_with_hundreds_of_ops(n_ops, keys, clients):
    rng = random.Random(11)
    ops, _ = generate(rng, n_ops, keys=keys, clients=clients, values=3, p_unknown=0.05)
    bad, changed = mutate_future_read(rng, ops)
    start = time.perf_counter()
    res = check(ops)
    assert res.ok, res.message
    res = check(bad)
    assert not res.ok and res.key == changed.key
    assert time.perf_counter() - start < 10


def test_twenty_thousand_ops_over_a_hundred_keys():
    # A sanity bound, not a benchmark: it takes well under a second.
    rng = random.Random(42)
    ops, _ = generate(rng, 20_000, keys=100, clients=200)
    bad, changed = mutate_future_read(rng, ops)
    start = time.perf_counter()
    res = check(ops)
    elapsed = time.perf_counter() - start
    assert res.ok, res.message
    assert res.ops_checked > 18_000
    assert elapsed < 10, f"took {elapsed:.1f}s"
    res = check(bad)
    assert not res.ok and res.key == changed.key
