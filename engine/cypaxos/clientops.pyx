"""The client's per-command records and the loops over them.

A client keeps one `Op` per command or query a caller is waiting on; its session
(client/session.py) moves it through the states below as it is queued, sent in a
batch and answered.  At hundreds of thousands of commands a second the client's CPU
went to exactly these per-command steps in Python (making the record, taking it off
the queue, copying its bytes into a batch, finishing it), so they live here; the
decisions around them (what to send, when to resend, what an error means) are the
session's.

Finishing an op wakes the caller parked on it (`Op.task`): a Trio task is
rescheduled directly (the fast path of the Trio client); anything else there is a
callable taking no arguments, called once, which is how another event loop's client,
or the simulator's, hears that a call ended.  A wake-up must not call back into the
session: it runs in the middle of the session's handling of a reply.

The byte formats are those of commands.py (docs/internals.md, "Slot values and client
batches" and "Key-value commands"); `pack_client_batch`, `encode_puts`, `encode_gets`
and `decode_gets` here are the implementations commands.py exports.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from cypaxos.protocol cimport CLIENT_BATCH_HEADER_BYTES, SEQ_LIMIT_C

import trio

_reschedule = trio.lowlevel.reschedule
_TrioTask = trio.lowlevel.Task

# Op.state: NEW -> QUEUED -> SENT -> DONE; a caller that gives up makes a QUEUED or
# SENT op ABANDONED (a queued one is then never sent, a sent one finishes unseen).
NEW = 0
QUEUED = 1
SENT = 2
DONE = 3
ABANDONED = 4

cdef enum:
    _NEW = 0
    _QUEUED = 1
    _SENT = 2
    _DONE = 3
    _ABANDONED = 4

BATCH_HEADER_BYTES = CLIENT_BATCH_HEADER_BYTES
"""Bytes before a client batch's payload: session_id, first_seq, acked_seq (u64 each),
count and payload_len (u32 each), little-endian."""

SEQ_LIMIT = SEQ_LIMIT_C
"""The core refuses a batch unless 1 <= first_seq and first_seq + count <= SEQ_LIMIT."""

cdef uint64_t _U32_MAX = 0xFFFFFFFF
cdef object _U64_MAX = 2**64 - 1
cdef bytes _EMPTY = b""


@cython.freelist(1024)
@cython.no_gc
cdef class Op:
    """One pending call: a command or a query, and how it ended.

    Its caller parks on it (the client's `_park`); `finish` or the deadline sweep wakes
    it.  Invariant: `task` is set only while the caller is parked (a Trio task, or a
    callable of no arguments); `payload` is None once the op is DONE (it is never sent
    again).

    Not tracked by the cyclic GC: a client makes one per command, and with every
    one of them tracked the collections they set off cost the load generator about
    a tenth of its throughput.  The references an op holds cannot form a cycle
    while the op lives on: `task` is the parked caller, held only while it waits
    (cleared when woken, and every waiting caller is woken by the client's close),
    and an `error` is taken off the op before it is raised (client/calls.py's
    `_error_of`), so that its traceback cannot lead back to the op.
    """

    cdef public object payload    # the command or query bytes
    cdef public object task       # the parked caller (Trio task or callable), until woken
    cdef public object value      # the result bytes once DONE without error
    cdef public object error      # the exception its caller gets, if any
    cdef public int state         # NEW, QUEUED, SENT, DONE or ABANDONED
    cdef public bint sent         # did it ever leave the client (maybe_applied)
    cdef public bint expired      # its deadline passed before it was DONE
    cdef public double deadline   # the client's clock time after which its caller gives up

    def __init__(self, payload, double deadline):
        self.payload = payload
        self.deadline = deadline

    def finish(self, value=None, error=None):
        """End the op with `value` or `error` (once: later calls do nothing)."""
        if self.state == _DONE:
            return
        self.error = error
        _done(self, value)

    def wake(self):
        """Reschedule the parked caller, if there is one."""
        _wake(self)


cdef inline int _wake(Op op) except -1:
    task = op.task
    if task is not None:
        op.task = None
        if type(task) is _TrioTask:
            _reschedule(task)
        else:
            task()
    return 0


cdef inline int _done(Op op, object value) except -1:
    """Op.finish(value) for an op known not to be DONE yet."""
    op.value = value
    op.state = _DONE
    op.payload = None
    return _wake(op)


def make_ops(list payloads, double deadline):
    """A NEW op for each of `payloads`, all with `deadline`."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(payloads)
    cdef list ops = [None] * n
    cdef Op op
    for i in range(n):
        op = Op.__new__(Op)
        op.payload = <object>PyList_GET_ITEM(payloads, i)
        op.deadline = deadline
        ops[i] = op
    return ops


def mark(list ops, int state):
    """Set every op's state (NEW ones becoming QUEUED, as a bulk call queues them)."""
    cdef Op op
    for op in ops:
        op.state = state


def last_unfinished(list ops, Py_ssize_t index):
    """The index of the last op at or before `index` that is not DONE, or -1."""
    cdef Op op
    while index >= 0:
        op = <Op>PyList_GET_ITEM(ops, index)
        if op.state != _DONE:
            return index
        index -= 1
    return -1


def abandon(list ops):
    """Make QUEUED and SENT ops ABANDONED (their caller left); the number and queue
    size (payload + 4 bytes each) of the QUEUED ones."""
    cdef Op op
    cdef Py_ssize_t dropped = 0, dropped_bytes = 0
    for op in ops:
        if op.state == _QUEUED:
            op.state = _ABANDONED
            dropped += 1
            dropped_bytes += PyBytes_GET_SIZE(op.payload) + 4
        elif op.state == _SENT:
            op.state = _ABANDONED
    return dropped, dropped_bytes


def values_if_all_done(list ops):
    """Every op's value if all are DONE without an error, else None."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ops)
    cdef list values = [None] * n
    cdef Op op
    for i in range(n):
        op = <Op>PyList_GET_ITEM(ops, i)
        if op.state != _DONE or op.error is not None:
            return None
        values[i] = op.value
    return values


def take(queue, Py_ssize_t max_count, Py_ssize_t max_bytes):
    """Pop up to `max_count` QUEUED ops (about `max_bytes`) off a deque; mark them SENT.

    Ops that are no longer QUEUED (abandoned by a caller that timed out) are dropped on
    the way.  Returns the ops and their size as the queue accounts it (payload + 4
    bytes each); at least one op if any is queued, however large.
    """
    cdef list ops = []
    cdef Py_ssize_t size = 0, n
    cdef Op op
    popleft = queue.popleft
    while queue and max_count > 0:
        op = <Op?>queue[0]
        if op.state != _QUEUED:
            popleft()
            continue
        n = PyBytes_GET_SIZE(op.payload) + 4
        if size + n > max_bytes and ops:
            break
        popleft()
        op.state = _SENT
        op.sent = True
        ops.append(op)
        size += n
        max_count -= 1
    return ops, size


def finish_ok_empty(list ops):
    """Finish each SENT op with b"" (a batch of puts answered all OK)."""
    cdef Op op
    for op in ops:
        if op.state == _SENT:
            _done(op, _EMPTY)


def finish_values(list ops, list values):
    """Finish each SENT op with its value (a read's answers, same length as `ops`)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ops)
    cdef Op op
    if PyList_GET_SIZE(values) != n:
        raise ValueError("one value per op is needed")
    for i in range(n):
        op = <Op>PyList_GET_ITEM(ops, i)
        if op.state == _SENT:
            _done(op, <object>PyList_GET_ITEM(values, i))


def sweep_fifo(fifo, double now):
    """Expire due ops at the head of a deadline-ordered deque and drop finished ones.

    Returns the deadline of the first op left (inf if none).
    """
    cdef Op op
    popleft = fifo.popleft
    while fifo:
        op = <Op?>fifo[0]
        if op.state == _DONE or op.state == _ABANDONED or op.expired:
            popleft()
        elif op.deadline <= now:
            popleft()
            op.expired = True
            _wake(op)
        else:
            return op.deadline
    return float("inf")


# ---------------------------------------------------------------------------
# Byte formats

cdef inline char *_put_u32(char *p, uint32_t v) noexcept:
    p[0] = <char>(v & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>((v >> 16) & 0xFF)
    p[3] = <char>((v >> 24) & 0xFF)
    return p + 4


cdef inline char *_put_u64(char *p, uint64_t v) noexcept:
    _put_u32(p, <uint32_t>(v & 0xFFFFFFFF))
    _put_u32(p + 4, <uint32_t>(v >> 32))
    return p + 8


cdef bytes _pack(session_id, first_seq, acked_seq, list items, bint of_ops):
    """A client batch of `items` (bytes commands, or Ops whose payloads they are)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(items), length
    cdef uint64_t payload_len = 0
    cdef object command
    if n == 0:
        raise ValueError("a client batch needs at least one command")
    if not (0 <= session_id <= _U64_MAX and 0 <= acked_seq <= _U64_MAX):
        raise ValueError("session_id and acked_seq must be in [0, 2**64)")
    if not 1 <= first_seq or first_seq + n > SEQ_LIMIT:
        raise ValueError("sequence numbers must be in [1, 2**62)")
    for i in range(n):
        command = <object>PyList_GET_ITEM(items, i)
        if of_ops:
            command = (<Op?>command).payload
        if type(command) is not bytes:
            raise TypeError("commands must be bytes")
        length = PyBytes_GET_SIZE(command)
        if <uint64_t>length > _U32_MAX:
            raise ValueError("command longer than 2**32 - 1 bytes")
        payload_len += 4 + <uint64_t>length
    if payload_len > _U32_MAX:
        raise ValueError("client batch payload longer than 2**32 - 1 bytes")
    cdef bytes data = PyBytes_FromStringAndSize(NULL, 32 + <Py_ssize_t>payload_len)
    cdef char *p = PyBytes_AS_STRING(data)
    p = _put_u64(p, <uint64_t>session_id)
    p = _put_u64(p, <uint64_t>first_seq)
    p = _put_u64(p, <uint64_t>acked_seq)
    p = _put_u32(p, <uint32_t>n)
    p = _put_u32(p, <uint32_t>payload_len)
    for i in range(n):
        command = <object>PyList_GET_ITEM(items, i)
        if of_ops:
            command = (<Op>command).payload
        length = PyBytes_GET_SIZE(command)
        p = _put_u32(p, <uint32_t>length)
        memcpy(p, PyBytes_AS_STRING(command), length)
        p += length
    return data


def pack_client_batch(session_id, first_seq, acked_seq, commands):
    """Return a client batch (bytes) holding `commands` (a non-empty list of bytes).

    Refuses what the core would refuse (no commands, first_seq 0, sequence numbers
    reaching SEQ_LIMIT) so a client learns about it before sending.
    """
    if type(commands) is not list:
        commands = list(commands)
    return _pack(session_id, first_seq, acked_seq, commands, False)


def pack_ops(session_id, first_seq, acked_seq, list ops):
    """`pack_client_batch` of the ops' payloads."""
    return _pack(session_id, first_seq, acked_seq, ops, True)


cdef bytes _command(char tag, bytes key, bytes value, bint with_length):
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
    cdef Py_ssize_t vlen = PyBytes_GET_SIZE(value) if value is not None else 0
    cdef Py_ssize_t head = 5 if with_length else 1
    cdef bytes out = PyBytes_FromStringAndSize(NULL, head + klen + vlen)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = tag
    if with_length:
        _put_u32(p + 1, <uint32_t>klen)
    memcpy(p + head, PyBytes_AS_STRING(key), klen)
    if vlen:
        memcpy(p + head + klen, PyBytes_AS_STRING(value), vlen)
    return out


def encode_puts(items):
    """Commands setting each `(key, value)` of `items` (bytes), in order; like
    `encode_put` for each, in one pass (the bulk client calls' hot path).

    Raises TypeError unless every key and value is `bytes`.
    """
    cdef list out = []
    for item in items:
        key, value = item
        if type(key) is not bytes or type(value) is not bytes:
            raise TypeError("keys and values must be bytes")
        if <uint64_t>PyBytes_GET_SIZE(key) > _U32_MAX:
            raise ValueError("key longer than 2**32 - 1 bytes")
        out.append(_command(c'P', key, value, True))
    return out


def encode_gets(keys):
    """Queries reading each of `keys` (bytes), in order; like `encode_get` for each.

    Raises TypeError unless every key is `bytes`.
    """
    cdef list out = []
    for key in keys:
        if type(key) is not bytes:
            raise TypeError("keys must be bytes")
        if <uint64_t>PyBytes_GET_SIZE(key) > _U32_MAX:
            raise ValueError("key longer than 2**32 - 1 bytes")
        out.append(_command(c'G', key, None, False))
    return out


def decode_gets(list results):
    """The values get queries returned (None where the key was absent), in order."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(results)
    cdef list out = [None] * n
    cdef object result
    cdef const char *p
    for i in range(n):
        result = <object>PyList_GET_ITEM(results, i)
        if type(result) is not bytes or PyBytes_GET_SIZE(result) == 0:
            raise ValueError("malformed get result")
        p = PyBytes_AS_STRING(result)
        if p[0] == 1:
            out[i] = result[1:]
        elif p[0] != 0 or PyBytes_GET_SIZE(result) != 1:
            raise ValueError("malformed get result")
    return out
