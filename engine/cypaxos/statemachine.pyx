# cython: language_level=3
"""State machines the core applies chosen commands to.

The core hands a state machine one command at a time as a pointer into the chosen
slot's bytes, so the built-in store does no per-command Python work beyond creating
the key and value objects it must keep.  Every state machine must be deterministic:
replicas that apply the same commands in the same order must end in the same state.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

import hashlib


cdef inline uint32_t load_u32(const char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline void store_u32(char* p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline uint64_t mix64(uint64_t h) noexcept nogil:
    # The splitmix64 finalizer: cheap and well distributed.
    h ^= h >> 30
    h *= 0xbf58476d1ce4e5b9ULL
    h ^= h >> 27
    h *= 0x94d049bb133111ebULL
    h ^= h >> 31
    return h


cdef uint64_t hash_bytes(const char* p, Py_ssize_t n, uint64_t seed) noexcept nogil:
    """A deterministic 64-bit hash (the same on every replica and every run)."""
    cdef uint64_t h = mix64(seed ^ <uint64_t>n)
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = mix64(h ^ w)
        i += 8
    w = 0
    if i < n:
        memcpy(&w, p + i, n - i)
        h = mix64(h ^ w ^ 0xff)
    return h


@cython.final
cdef class ResultWriter:
    def __dealloc__(self):
        if self.buf != NULL:
            PyMem_Free(self.buf)

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.size + extra
        cdef Py_ssize_t cap
        cdef char* grown
        if need <= self.capacity:
            return 0
        cap = self.capacity * 2 if self.capacity else 256
        while cap < need:
            cap *= 2
        grown = <char*>PyMem_Realloc(self.buf, cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.capacity = cap
        return 0

    cdef int write(self, uint8_t status, const char* data, Py_ssize_t n) except -1:
        self.reserve(5 + n)
        self.buf[self.size] = <char>status
        store_u32(self.buf + self.size + 1, <uint32_t>n)
        if n:
            memcpy(self.buf + self.size + 5, data, n)
        self.size += 5 + n
        return 0

    cdef int write_object(self, uint8_t status, bytes data) except -1:
        return self.write(status, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef bytes take(self):
        """Return the packed results and empty the buffer (the capacity is kept)."""
        cdef bytes out = PyBytes_FromStringAndSize(self.buf, self.size)
        self.size = 0
        return out


cdef class StateMachine:
    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        raise NotImplementedError

    cpdef bytes query(self, bytes query):
        """Answer a read-only query against the current state."""
        raise NotImplementedError

    cpdef bytes snapshot(self):
        """Serialize the whole state."""
        raise NotImplementedError

    cpdef restore(self, bytes data):
        """Replace the whole state with one produced by snapshot()."""
        raise NotImplementedError

    cpdef str state_digest(self):
        """A hash of the state, equal on replicas in equal states."""
        return hashlib.blake2b(self.snapshot(), digest_size=8).hexdigest()

    def apply(self, bytes command):
        """Apply one command outside the core (tests, tools); returns (status, result)."""
        cdef ResultWriter out = ResultWriter()
        self.apply_command(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command), out)
        packed = out.take()
        return packed[0], packed[5:]


cdef bytes ONE = b"\x01"
cdef bytes ZERO = b"\x00"


@cython.final
cdef class KVStore(StateMachine):
    """Keys and values are bytes.  Commands and results are described in docs/internals.md."""

    def __init__(self):
        self.data = {}
        self.applied_commands = 0

    def __len__(self):
        return len(self.data)

    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        cdef char op
        cdef uint32_t klen, elen
        cdef bytes key
        cdef object found
        cdef bint matched
        cdef Py_ssize_t pos
        self.applied_commands += 1
        if n < 1:
            return out.write(RESULT_ERROR, "empty command", 13)
        op = cmd[0]
        if op == b'P':
            if n < 5:
                return out.write(RESULT_ERROR, "malformed put", 13)
            klen = load_u32(cmd + 1)
            if 5 + <Py_ssize_t>klen > n:
                return out.write(RESULT_ERROR, "malformed put", 13)
            key = PyBytes_FromStringAndSize(cmd + 5, klen)
            self.data[key] = PyBytes_FromStringAndSize(cmd + 5 + klen, n - 5 - klen)
            return out.write(RESULT_OK, NULL, 0)
        if op == b'D':
            key = PyBytes_FromStringAndSize(cmd + 1, n - 1)
            found = self.data.pop(key, None)
            return out.write(RESULT_OK, "\x01" if found is not None else "\x00", 1)
        if op == b'C':
            if n < 10:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            klen = load_u32(cmd + 1)
            pos = 5 + klen
            if pos + 5 > n:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            key = PyBytes_FromStringAndSize(cmd + 5, klen)
            elen = load_u32(cmd + pos + 1)
            if pos + 5 + <Py_ssize_t>elen > n:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            found = self.data.get(key)
            if cmd[pos] == 0:
                matched = found is None
            else:
                matched = (found is not None and PyBytes_GET_SIZE(found) == elen
                           and memcmp(PyBytes_AS_STRING(found), cmd + pos + 5, elen) == 0)
            if matched:
                self.data[key] = PyBytes_FromStringAndSize(cmd + pos + 5 + elen, n - pos - 5 - elen)
                return out.write(RESULT_OK, "\x01", 1)
            return out.write(RESULT_OK, "\x00", 1)
        return out.write(RESULT_ERROR, "unknown command", 15)

    cpdef bytes query(self, bytes query):
        """`b"G" key` -> `b"\\x01" value` or `b"\\x00"`; `b"N"` -> the key count (decimal)."""
        if PyBytes_GET_SIZE(query) >= 1 and query[0] == 0x47:  # 'G'
            found = self.data.get(query[1:])
            return ZERO if found is None else ONE + found
        if query == b"N":
            return str(len(self.data)).encode()
        raise ValueError("unknown query")

    cpdef bytes snapshot(self):
        """`u32 klen | u32 vlen | key | value` per entry, in the dict's (replicated) order."""
        cdef ResultWriter buf = ResultWriter()
        cdef bytes k, v
        cdef char header[8]
        for k, v in self.data.items():
            buf.reserve(8 + len(k) + len(v))
            store_u32(buf.buf + buf.size, <uint32_t>len(k))
            store_u32(buf.buf + buf.size + 4, <uint32_t>len(v))
            memcpy(buf.buf + buf.size + 8, PyBytes_AS_STRING(k), len(k))
            memcpy(buf.buf + buf.size + 8 + len(k), PyBytes_AS_STRING(v), len(v))
            buf.size += 8 + len(k) + len(v)
        return buf.take()

    cpdef restore(self, bytes data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0
        cdef uint32_t klen, vlen
        cdef dict fresh = {}
        while pos < n:
            if pos + 8 > n:
                raise ValueError("truncated key-value snapshot")
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            if pos + 8 + <Py_ssize_t>klen + vlen > n:
                raise ValueError("truncated key-value snapshot")
            fresh[PyBytes_FromStringAndSize(p + pos + 8, klen)] = \
                PyBytes_FromStringAndSize(p + pos + 8 + klen, vlen)
            pos += 8 + klen + vlen
        self.data = fresh

    cpdef str state_digest(self):
        """Order-independent: the sum of a hash of every (key, value) pair, mod 2**64."""
        cdef uint64_t total = 0
        cdef uint64_t hk
        cdef bytes k, v
        for k, v in self.data.items():
            hk = hash_bytes(PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), 0x9e3779b97f4a7c15ULL)
            total += mix64(hk ^ hash_bytes(PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), hk))
        return "%016x" % total


@cython.final
cdef class PyStateMachine(StateMachine):
    """Wraps a user object with `apply(bytes) -> bytes`, `query`, `snapshot`, `restore`.

    An exception raised by `apply` becomes the command's result (status 1, the
    exception's type and message), identically on every replica, so a failing command
    never splits the replicas; the state machine must leave its state unchanged (or
    changed deterministically) when it raises.
    """

    def __init__(self, target):
        for name in ("apply", "query", "snapshot", "restore"):
            if not callable(getattr(target, name, None)):
                raise TypeError(f"a state machine needs a callable {name}() method: {target!r}")
        self.obj = target
        self.apply_method = target.apply

    @property
    def target(self):
        """The wrapped user object."""
        return self.obj

    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        cdef object result
        try:
            result = self.apply_method(PyBytes_FromStringAndSize(cmd, n))
            if result is None:
                result = b""
            elif type(result) is not bytes:
                result = bytes(result)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            return out.write_object(RESULT_ERROR, message)
        return out.write_object(RESULT_OK, result)

    cpdef bytes query(self, bytes query):
        result = self.obj.query(query)
        return b"" if result is None else bytes(result)

    cpdef bytes snapshot(self):
        return bytes(self.obj.snapshot())

    cpdef restore(self, bytes data):
        self.obj.restore(data)

    cpdef str state_digest(self):
        digest = getattr(self.obj, "state_digest", None)
        if callable(digest):
            return str(digest())
        return StateMachine.state_digest(self)
