"""CBOR encoding of the values the protocol sends and logs, in one pass and one copy.

Frames, WAL records and client requests are lists of ints, byte strings and short
text (docs/internals.md, "Wire").  cbor2 encodes them into a growing buffer and then
copies the result into a bytes object: for a megabyte of slot values that is several
copies, made for each of them (every ACCEPT, every WAL record, every client batch).
Here the size is computed first, the bytes object is allocated once and written in
place.  The output is byte for byte what cbor2 writes for the same value (the tests
check this); anything else (floats, maps, int subclasses, ints beyond 64 bits, deep
nesting) is handed to cbor2 whole.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import cbor2

_cbor2_dumps = cbor2.dumps

cdef enum:
    _DEPTH_MAX = 32           # deeper values go to cbor2 (none of ours nest past 3)
    _LENGTH_MAX = 0xFFFFFFFF  # a frame's body length is a u32


cdef inline Py_ssize_t _head_size(uint64_t n) noexcept:
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


cdef inline char *_head(char *p, int major, uint64_t n) noexcept:
    cdef int shift, width
    cdef unsigned char m = <unsigned char>(major << 5)
    if n < 24:
        p[0] = <char>(m | <unsigned char>n)
        return p + 1
    if n < 0x100:
        p[0] = <char>(m | 24)
        width = 1
    elif n < 0x10000:
        p[0] = <char>(m | 25)
        width = 2
    elif n < 0x100000000:
        p[0] = <char>(m | 26)
        width = 4
    else:
        p[0] = <char>(m | 27)
        width = 8
    for shift in range(width):
        p[1 + shift] = <char>((n >> (8 * (width - 1 - shift))) & 0xFF)
    return p + 1 + width


cdef inline int _int_head(object obj, int *major, uint64_t *n) except -1:
    """The CBOR major type and argument of an int; 0 if it needs more than 64 bits."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(obj, &overflow)
    if overflow == 0:
        if v >= 0:
            major[0] = 0
            n[0] = <uint64_t>v
        else:
            major[0] = 1
            n[0] = <uint64_t>(-1 - v)
        return 1
    if overflow > 0 and obj <= 0xFFFFFFFFFFFFFFFF:
        major[0] = 0
        n[0] = PyLong_AsUnsignedLongLong(obj)
        return 1
    return 0   # rare: cbor2 writes these (a 64-bit negint, or a bignum tag)


cdef Py_ssize_t _size(object obj, int depth) except -2:
    """Encoded size of obj, or -1 if cbor2 must encode it."""
    cdef type kind = type(obj)
    cdef Py_ssize_t i, n, total, part
    cdef const char *utf8
    cdef int major
    cdef uint64_t arg
    if kind is bytes:
        n = PyBytes_GET_SIZE(obj)
        return _head_size(<uint64_t>n) + n
    if kind is int:
        if not _int_head(obj, &major, &arg):
            return -1
        return _head_size(arg)
    if kind is list or kind is tuple:
        if depth >= _DEPTH_MAX:
            return -1
        n = PySequence_Fast_GET_SIZE(obj)
        total = _head_size(<uint64_t>n)
        for i in range(n):
            part = _size(<object>PySequence_Fast_GET_ITEM(obj, i), depth + 1)
            if part < 0:
                return -1
            total += part
        return total
    if kind is str:
        utf8 = PyUnicode_AsUTF8AndSize(obj, &n)
        return _head_size(<uint64_t>n) + n
    if obj is None or kind is bool:
        return 1
    return -1


cdef char *_write(char *p, object obj) except NULL:
    """Write obj (which _size accepted) at p; the position after it."""
    cdef type kind = type(obj)
    cdef Py_ssize_t i, n
    cdef const char *utf8
    cdef int major
    cdef uint64_t arg
    if kind is bytes:
        n = PyBytes_GET_SIZE(obj)
        p = _head(p, 2, <uint64_t>n)
        memcpy(p, PyBytes_AS_STRING(obj), n)
        return p + n
    if kind is int:
        _int_head(obj, &major, &arg)
        return _head(p, major, arg)
    if kind is list or kind is tuple:
        n = PySequence_Fast_GET_SIZE(obj)
        p = _head(p, 4, <uint64_t>n)
        for i in range(n):
            p = _write(p, <object>PySequence_Fast_GET_ITEM(obj, i))
        return p
    if kind is str:
        utf8 = PyUnicode_AsUTF8AndSize(obj, &n)
        p = _head(p, 3, <uint64_t>n)
        memcpy(p, utf8, n)
        return p + n
    if obj is None:
        p[0] = <char>0xF6
    elif obj is True:
        p[0] = <char>0xF5
    else:
        p[0] = <char>0xF4
    return p + 1


cdef bytes _encode(object obj, Py_ssize_t prefix):
    cdef Py_ssize_t size = _size(obj, 0)
    cdef bytes out
    cdef char *p
    if size < 0:
        return None
    out = PyBytes_FromStringAndSize(NULL, prefix + size)
    p = PyBytes_AS_STRING(out)
    if prefix:
        if size > _LENGTH_MAX:
            raise ValueError("frame body longer than 2**32 - 1 bytes")
        p[0] = <char>((size >> 24) & 0xFF)
        p[1] = <char>((size >> 16) & 0xFF)
        p[2] = <char>((size >> 8) & 0xFF)
        p[3] = <char>(size & 0xFF)
    _write(p + prefix, obj)
    return out


def bytes_header(length):
    """The CBOR header of a byte string of `length` bytes, without the bytes (for a
    body written in pieces: the string itself need not be copied into it)."""
    if not 0 <= length <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError("a CBOR byte string has 0 .. 2**64 - 1 bytes")
    cdef uint64_t n = length
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _head_size(n))
    _head(PyBytes_AS_STRING(out), 2, n)
    return out


def dumps(obj):
    """`obj` as CBOR (bytes), exactly as `cbor2.dumps(obj)` writes it."""
    out = _encode(obj, 0)
    return out if out is not None else _cbor2_dumps(obj)


def encode_frame(obj):
    """`obj` as one frame: its CBOR body's length (u32, big-endian), then the body."""
    out = _encode(obj, 4)
    if out is not None:
        return out
    body = _cbor2_dumps(obj)
    if len(body) > _LENGTH_MAX:
        raise ValueError("frame body longer than 2**32 - 1 bytes")
    return len(body).to_bytes(4, "big") + body
