"""Tests of cypaxos.clientops: the client's per-command records, the loops over them,
and the compiled encoders commands.py exports (checked against the one-at-a-time ones)."""
import collections
import math

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from cypaxos import clientops as ops
from cypaxos import commands as c
from cypaxos.client.api import _park

pytestmark = pytest.mark.fast

keys = st.binary(max_size=40)
values = st.binary(max_size=100)


# ---------------------------------------------------------------------------
# Encoders

@settings(max_examples=200)
@given(st.lists(st.tuples(keys, values), max_size=30))
def test_encode_puts_is_encode_put_for_each(items):
    assert c.encode_puts(items) == [c.encode_put(k, v) for k, v in items]


def test_encode_puts_takes_any_pairs():
    assert c.encode_puts(iter([[b"k", b"v"], (b"kk", b"")])) == [
        c.encode_put(b"k", b"v"), c.encode_put(b"kk", b"")]


@pytest.mark.parametrize("items", [[("k", b"v")], [(b"k", bytearray(b"v"))],
                                   [(b"k", b"v"), (memoryview(b"k"), b"v")]])
def test_encode_puts_refuses_non_bytes(items):
    with pytest.raises(TypeError):
        c.encode_puts(items)


@settings(max_examples=200)
@given(st.lists(keys, max_size=30))
def test_encode_gets_is_encode_get_for_each(batch):
    assert c.encode_gets(batch) == [c.encode_get(k) for k in batch]


def test_encode_gets_refuses_non_bytes():
    with pytest.raises(TypeError):
        c.encode_gets([b"k", "k"])


@settings(max_examples=200)
@given(st.lists(st.one_of(st.just(b"\x00"), values.map(lambda v: b"\x01" + v)),
                max_size=30))
def test_decode_gets_is_decode_get_for_each(results):
    assert c.decode_gets(results) == [c.decode_get(r) for r in results]


@pytest.mark.parametrize("bad", [b"", b"\x02", b"\x00x", b"\x02abc", "\x01x", None])
def test_decode_gets_refuses_malformed(bad):
    with pytest.raises(ValueError):
        c.decode_gets([b"\x00", bad])


@settings(max_examples=200)
@given(st.integers(0, 2**64 - 1), st.integers(1, 2**62 - 100), st.integers(0, 2**64 - 1),
       st.lists(values, min_size=1, max_size=20))
def test_pack_ops_is_pack_client_batch_of_the_payloads(session_id, first_seq, acked_seq,
                                                       commands):
    batch = ops.make_ops(commands, 1.0)
    assert ops.pack_ops(session_id, first_seq, acked_seq, batch) == \
        c.pack_client_batch(session_id, first_seq, acked_seq, commands)


def test_pack_client_batch_takes_any_sequence():
    assert c.pack_client_batch(1, 1, 0, (b"a", b"b")) == \
        c.pack_client_batch(1, 1, 0, [b"a", b"b"])
    assert c.pack_client_batch(1, 1, 0, iter([b"a"])) == c.pack_client_batch(1, 1, 0, [b"a"])


def test_pack_ops_refuses_what_pack_client_batch_refuses():
    with pytest.raises(ValueError):
        ops.pack_ops(1, 0, 0, ops.make_ops([b"x"], 1.0))
    with pytest.raises(ValueError):
        ops.pack_ops(1, 1, 0, [])
    with pytest.raises(TypeError):
        ops.pack_ops(1, 1, 0, [b"not an op"])


# ---------------------------------------------------------------------------
# Ops and the loops over them

def queued(payloads, deadline=10.0):
    batch = ops.make_ops(payloads, deadline)
    ops.mark(batch, ops.QUEUED)
    return batch


def test_a_new_op():
    op = ops.Op(b"cmd", 2.5)
    assert (op.payload, op.deadline, op.state, op.sent, op.expired) == \
        (b"cmd", 2.5, ops.NEW, False, False)
    assert op.task is None and op.value is None and op.error is None
    assert [o.payload for o in ops.make_ops([b"a", b"b"], 1.0)] == [b"a", b"b"]


def test_finish_happens_once():
    op = ops.Op(b"cmd", 1.0)
    op.finish(b"first")
    op.finish(b"second", error=ValueError())
    assert (op.state, op.value, op.error, op.payload) == (ops.DONE, b"first", None, None)


def test_take_marks_sent_and_skips_abandoned():
    batch = queued([b"a", b"bb", b"ccc", b"dddd"])
    batch[1].state = ops.ABANDONED
    queue = collections.deque(batch)
    taken, size = ops.take(queue, 2, 1 << 20)
    assert taken == [batch[0], batch[2]] and size == (1 + 4) + (3 + 4)
    assert all(op.state == ops.SENT and op.sent for op in taken)
    assert list(queue) == [batch[3]] and batch[3].state == ops.QUEUED


def test_take_stops_at_the_byte_budget_but_takes_one_at_least():
    batch = queued([b"x" * 100, b"y" * 100])
    queue = collections.deque(batch)
    assert ops.take(queue, 10, 50) == ([batch[0]], 104)
    assert ops.take(queue, 10, 50) == ([batch[1]], 104)
    assert ops.take(queue, 10, 50) == ([], 0)


def test_abandon_counts_the_queued_ones():
    batch = queued([b"a", b"bb", b"ccc"])
    batch[0].state = ops.SENT
    batch[2].finish(b"")
    assert ops.abandon(batch) == (1, 2 + 4)
    assert [op.state for op in batch] == [ops.ABANDONED, ops.ABANDONED, ops.DONE]


def test_last_unfinished_and_values_if_all_done():
    batch = queued([b"a", b"b", b"c"])
    assert ops.last_unfinished(batch, 2) == 2
    batch[2].finish(b"2")
    batch[1].finish(b"1")
    assert ops.last_unfinished(batch, 2) == 0
    assert ops.values_if_all_done(batch) is None
    batch[0].finish(b"0")
    assert ops.last_unfinished(batch, 2) == -1
    assert ops.values_if_all_done(batch) == [b"0", b"1", b"2"]
    batch[0] = ops.Op(b"a", 1.0)
    batch[0].finish(error=ValueError("no"))
    assert ops.values_if_all_done(batch) is None


def test_finishing_a_batch_touches_only_sent_ops():
    batch = queued([b"a", b"b", b"c"])
    ops.mark(batch, ops.SENT)
    batch[1].state = ops.ABANDONED
    ops.finish_ok_empty(batch)
    assert [(op.state, op.value) for op in batch] == [
        (ops.DONE, b""), (ops.ABANDONED, None), (ops.DONE, b"")]
    reads = queued([b"a", b"b"])
    ops.mark(reads, ops.SENT)
    with pytest.raises(ValueError):
        ops.finish_values(reads, [b"only one"])
    ops.finish_values(reads, [b"1", None])
    assert [(op.state, op.value) for op in reads] == [(ops.DONE, b"1"), (ops.DONE, None)]


def test_sweep_fifo_expires_due_ops_and_drops_finished_ones():
    batch = [ops.Op(b"", deadline) for deadline in (1.0, 2.0, 3.0, 4.0)]
    batch[1].finish(b"")
    fifo = collections.deque(batch)
    assert ops.sweep_fifo(fifo, 2.5) == 3.0
    assert batch[0].expired and not batch[1].expired and not batch[2].expired
    assert list(fifo) == batch[2:]
    assert ops.sweep_fifo(fifo, 10.0) == math.inf and not fifo


async def test_finishing_wakes_the_parked_caller():
    batch = queued([b"a", b"b"])
    ops.mark(batch, ops.SENT)
    woken = []

    async def caller(op):
        await _park(op)
        woken.append(op.value)

    async with trio.open_nursery() as nursery:
        for op in batch:
            nursery.start_soon(caller, op)
        await trio.testing.wait_all_tasks_blocked()
        assert all(op.task is not None for op in batch)
        ops.finish_values(batch, [b"1", b"2"])
    assert sorted(woken) == [b"1", b"2"] and all(op.task is None for op in batch)


async def test_a_cancelled_caller_is_not_woken_later():
    op = ops.Op(b"a", 1.0)
    with trio.move_on_after(0.01):
        await _park(op)
    assert op.task is None
    op.finish(b"late")   # nobody to wake: must not reschedule a finished task
    assert op.value == b"late"
