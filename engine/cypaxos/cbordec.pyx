"""CBOR decoding of the values the protocol sends and logs, straight from the receive
buffer.

Frames, WAL records and client requests are arrays of ints, byte strings and short
text (docs/internals.md, "Wire").  `decode` reads exactly those, from a range of any
bytes-like buffer, and makes each byte string with one copy out of the buffer.  Every
other item (maps, floats, tags, indefinite lengths, reserved codes, nesting past 32,
invalid UTF-8) and every malformed or truncated input makes it give up and return
`FALLBACK`: the caller then decodes the same bytes with cbor2, whose result or error
stands.  So for any input the outcome is cbor2's (the tests compare them on random and
mutated bodies); this module only ever answers the easy cases, faster.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t

FALLBACK = object()
"""What `decode` returns when cbor2 must decide (anything but the easy cases)."""

cdef object _FALLBACK = FALLBACK

cdef enum:
    _DEPTH_MAX = 32


cdef object _item(const unsigned char *p, Py_ssize_t end, Py_ssize_t *pos, int depth):
    """The item at p[pos[0]:end] (pos advanced past it), or _FALLBACK."""
    cdef Py_ssize_t at = pos[0], i, count
    cdef unsigned char initial, info
    cdef int major, width
    cdef uint64_t arg = 0
    cdef list items
    if at >= end:
        return _FALLBACK
    initial = p[at]
    at += 1
    major = initial >> 5
    info = initial & 0x1F
    if major == 7:
        pos[0] = at
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        return _FALLBACK    # undefined, other simple values, floats, break
    if info < 24:
        arg = info
    elif info <= 27:
        width = 1 << (info - 24)
        if end - at < width:
            return _FALLBACK
        for i in range(width):
            arg = (arg << 8) | p[at + i]
        at += width
    else:
        return _FALLBACK    # reserved codes, indefinite lengths
    if major == 0:
        pos[0] = at
        return PyLong_FromUnsignedLongLong(arg)
    if major == 1:
        pos[0] = at
        if arg < 0x8000000000000000:
            return PyLong_FromLongLong(-1 - <long long>arg)
        return -1 - PyLong_FromUnsignedLongLong(arg)
    if major == 2 or major == 3:
        if arg > <uint64_t>(end - at):
            return _FALLBACK
        pos[0] = at + <Py_ssize_t>arg
        if major == 2:
            return PyBytes_FromStringAndSize(<const char *>p + at, <Py_ssize_t>arg)
        try:
            return PyUnicode_DecodeUTF8(<const char *>p + at, <Py_ssize_t>arg, "strict")
        except UnicodeDecodeError:
            return _FALLBACK
    if major == 4:
        # Every item takes at least one byte: a count beyond the bytes left is malformed
        # (and must not make us allocate for it).
        if depth >= _DEPTH_MAX or arg > <uint64_t>(end - at):
            return _FALLBACK
        count = <Py_ssize_t>arg
        items = PyList_New(count)
        for i in range(count):
            Py_INCREF(None)
            PyList_SET_ITEM(items, i, None)   # a valid list while it fills
        pos[0] = at
        for i in range(count):
            item = _item(p, end, pos, depth + 1)
            if item is _FALLBACK:
                return _FALLBACK
            items[i] = item
        return items
    return _FALLBACK        # maps, tags


def decode(data, Py_ssize_t start=0, Py_ssize_t end=-1):
    """The first CBOR item of data[start:end] (end -1: the end), or FALLBACK.

    Bytes after the first item are ignored, as cbor2.loads ignores them.
    """
    cdef Py_buffer view
    cdef Py_ssize_t pos = start
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if end < 0 or end > view.len:
            end = view.len
        if start < 0 or start > end:
            raise ValueError("start is outside the buffer")
        return _item(<const unsigned char *>view.buf, end, &pos, 0)
    finally:
        PyBuffer_Release(&view)
