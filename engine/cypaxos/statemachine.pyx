# cython: language_level=3
"""State machines the core applies chosen commands to.

The core hands a state machine one command at a time as a pointer into the chosen
slot's bytes, so the built-in store does no per-command Python work at all: it keeps
keys and values in a hash table of its own, not in Python objects.  Every state machine must be deterministic:
replicas that apply the same commands in the same order must end in the same state.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

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

    cdef int apply_commands(self, const char* packed, uint32_t count,
                            ResultWriter out) except -1:
        """Apply `count` commands packed as `u32 len | command` (a client batch's
        payload), in order."""
        cdef uint32_t k, n
        for k in range(count):
            n = load_u32(packed)
            self.apply_command(packed + 4, n, out)
            packed += 4 + n
        return 0

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

    def apply_many(self, commands):
        """Apply commands in order as the core applies a client batch's (through
        apply_commands); returns their (status, result) pairs."""
        from cypaxos.commands import BATCH_HEADER_BYTES, pack_client_batch, unpack_results
        cdef bytes packed = pack_client_batch(1, 1, 0, list(commands))
        cdef ResultWriter out = ResultWriter()
        cdef Py_ssize_t header = BATCH_HEADER_BYTES
        self.apply_commands(PyBytes_AS_STRING(packed) + header, len(commands), out)
        return unpack_results(out.take())

    def apply(self, bytes command):
        """Apply one command outside the core (tests, tools); returns (status, result)."""
        cdef ResultWriter out = ResultWriter()
        self.apply_command(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command), out)
        packed = out.take()
        return packed[0], packed[5:]


cdef bytes ZERO = b"\x00"
# Slots of an empty KVStore (a power of two); entries it has room for at first.
cdef enum:
    _KV_SLOTS_MIN = 16
    # How many commands ahead KVStore.apply_commands prefetches (a power of two).
    _PREFETCH_AHEAD = 8


cdef extern from *:
    void __builtin_prefetch(const void* address) noexcept nogil


@cython.final
cdef class KVStore(StateMachine):
    """Keys and values are bytes.  Commands and results are described in docs/internals.md."""

    def __cinit__(self):
        self.slots = <KVSlot*>PyMem_Calloc(_KV_SLOTS_MIN, sizeof(KVSlot))
        self.entries = <KVEntry**>PyMem_Malloc(_KV_SLOTS_MIN * sizeof(KVEntry*))
        if self.slots == NULL or self.entries == NULL:
            raise MemoryError()
        self.slots_mask = _KV_SLOTS_MIN - 1
        self.entries_capacity = _KV_SLOTS_MIN
        self.entries_size = 0
        self.count = 0
        # Where keys land depends on a seed that differs per process (as Python's own
        # hash of bytes does, and with PYTHONHASHSEED): clients choose the keys, so a
        # fixed seed would let them pick keys that all collide.  Nothing observable
        # depends on it: snapshots follow insertion order.
        self.seed = <uint64_t>hash(b"cypaxos.statemachine.KVStore")

    def __init__(self):
        self.applied_commands = 0

    def __dealloc__(self):
        self.free_all()
        PyMem_Free(self.slots)
        PyMem_Free(self.entries)

    def __len__(self):
        return self.count

    cdef void free_all(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.entries_size):
            if self.entries[i] != NULL:
                PyMem_Free(self.entries[i])
                self.entries[i] = NULL
        if self.slots != NULL:
            memset(self.slots, 0, (self.slots_mask + 1) * sizeof(KVSlot))
        self.entries_size = 0
        self.count = 0

    cdef uint64_t key_hash(self, const char* key, Py_ssize_t klen) noexcept:
        return hash_bytes(key, klen, self.seed)

    cdef Py_ssize_t home_slot(self, const char* cmd, Py_ssize_t n) noexcept:
        """The slot where the key of a put, delete or cas command would be first looked
        for (-1 for anything else): for prefetching, so never an error."""
        cdef uint32_t klen
        if n >= 5 and (cmd[0] == b'P' or cmd[0] == b'C'):
            klen = load_u32(cmd + 1)
            if 5 + <Py_ssize_t>klen <= n:
                return self.key_hash(cmd + 5, klen) & self.slots_mask
        elif n >= 1 and cmd[0] == b'D':
            return self.key_hash(cmd + 1, n - 1) & self.slots_mask
        return -1

    cdef int apply_commands(self, const char* packed, uint32_t count,
                            ResultWriter out) except -1:
        # A put is mostly two cache misses (its slot, then its entry) when the table
        # is larger than the cache.  Looking ahead hides them: the slot of the command
        # _PREFETCH_AHEAD on is prefetched, and so is the entry in the slot of the one
        # half as far on (its slot is in the cache by then).  A slot index gone stale
        # because the table grew meanwhile only costs a useless prefetch.
        cdef Py_ssize_t ring[_PREFETCH_AHEAD]
        cdef const char* ahead_at = packed
        cdef uint32_t ahead = 0, k, n
        cdef Py_ssize_t slot
        cdef KVEntry* e
        for k in range(count):
            # Keep the slots of commands k .. k + _PREFETCH_AHEAD - 1 on their way
            # (the first pass starts them all).
            while ahead < count and ahead < k + _PREFETCH_AHEAD:
                n = load_u32(ahead_at)
                slot = self.home_slot(ahead_at + 4, n)
                if slot >= 0:
                    __builtin_prefetch(&self.slots[slot])
                ring[ahead % _PREFETCH_AHEAD] = slot
                ahead_at += 4 + n
                ahead += 1
            if k + _PREFETCH_AHEAD // 2 < ahead:
                slot = ring[(k + _PREFETCH_AHEAD // 2) % _PREFETCH_AHEAD]
                if slot >= 0:
                    e = self.slots[slot & self.slots_mask].entry
                    if e != NULL:
                        __builtin_prefetch(e)
            n = load_u32(packed)
            self.apply_command(packed + 4, n, out)
            packed += 4 + n
        return 0

    cdef Py_ssize_t find(self, const char* key, Py_ssize_t klen, uint64_t h) noexcept:
        """The slot holding `key`, or -1 - (the empty slot where it would go)."""
        cdef Py_ssize_t i = h & self.slots_mask
        cdef KVEntry* e
        while True:
            e = self.slots[i].entry
            if e == NULL:
                return -1 - i
            if (self.slots[i].hash == h and e.klen == klen
                    and memcmp(e.data, key, klen) == 0):
                return i
            i = (i + 1) & self.slots_mask

    cdef int append_entry(self, KVEntry* e) except -1:
        cdef Py_ssize_t i, j, cap
        cdef KVEntry** grown
        if self.entries_size == self.entries_capacity:
            if 2 * self.count <= self.entries_size:
                # Half are holes left by deletes: close them up (amortized O(1)).
                j = 0
                for i in range(self.entries_size):
                    if self.entries[i] != NULL:
                        self.entries[j] = self.entries[i]
                        self.entries[j].order = j
                        j += 1
                self.entries_size = j
            else:
                cap = self.entries_capacity * 2
                grown = <KVEntry**>PyMem_Realloc(self.entries, cap * sizeof(KVEntry*))
                if grown == NULL:
                    raise MemoryError()
                self.entries = grown
                self.entries_capacity = cap
        e.order = self.entries_size
        self.entries[self.entries_size] = e
        self.entries_size += 1
        return 0

    cdef int grow(self) except -1:
        cdef Py_ssize_t n = 2 * (self.slots_mask + 1)
        cdef Py_ssize_t i, j
        cdef KVSlot* fresh = <KVSlot*>PyMem_Calloc(n, sizeof(KVSlot))
        if fresh == NULL:
            raise MemoryError()
        for i in range(self.slots_mask + 1):
            if self.slots[i].entry != NULL:
                j = self.slots[i].hash & (n - 1)
                while fresh[j].entry != NULL:
                    j = (j + 1) & (n - 1)
                fresh[j] = self.slots[i]
        PyMem_Free(self.slots)
        self.slots = fresh
        self.slots_mask = n - 1
        return 0

    cdef int put(self, const char* key, Py_ssize_t klen, const char* value,
                 Py_ssize_t vlen) except -1:
        """Set key to value (an existing key keeps its place in insertion order)."""
        cdef uint64_t h = self.key_hash(key, klen)
        cdef Py_ssize_t i = self.find(key, klen, h)
        cdef KVEntry* e
        if i >= 0:
            e = self.slots[i].entry
            if vlen > e.vcap or e.vcap > 2 * vlen + 256:
                # Resized to fit (shrunk too, so one huge value leaves no slack).
                e = <KVEntry*>PyMem_Realloc(e, sizeof(KVEntry) + klen + vlen)
                if e == NULL:
                    raise MemoryError()
                e.vcap = <uint32_t>vlen
                self.slots[i].entry = e
                self.entries[e.order] = e
            memcpy(e.data + klen, value, vlen)
            e.vlen = <uint32_t>vlen
            return 0
        if 10 * (self.count + 1) > 7 * (self.slots_mask + 1):
            self.grow()
            i = self.find(key, klen, h)
        i = -1 - i
        e = <KVEntry*>PyMem_Malloc(sizeof(KVEntry) + klen + vlen)
        if e == NULL:
            raise MemoryError()
        e.klen = <uint32_t>klen
        e.vlen = <uint32_t>vlen
        e.vcap = <uint32_t>vlen
        memcpy(e.data, key, klen)
        memcpy(e.data + klen, value, vlen)
        try:
            self.append_entry(e)
        except MemoryError:
            PyMem_Free(e)
            raise
        self.slots[i].hash = h
        self.slots[i].entry = e
        self.count += 1
        return 0

    cdef bint remove(self, const char* key, Py_ssize_t klen) noexcept:
        """Delete key; False if it was absent."""
        cdef Py_ssize_t i = self.find(key, klen, self.key_hash(key, klen))
        cdef Py_ssize_t j, home
        cdef Py_ssize_t mask = self.slots_mask
        cdef KVEntry* e
        if i < 0:
            return False
        e = self.slots[i].entry
        self.entries[e.order] = NULL
        PyMem_Free(e)
        self.count -= 1
        # Backward-shift deletion: move later members of the probe run into the
        # hole when their home slot is not in (hole, their slot], so that no lookup
        # stops early at it (and no tombstones are needed).
        j = i
        while True:
            j = (j + 1) & mask
            if self.slots[j].entry == NULL:
                break
            home = self.slots[j].hash & mask
            if ((j - home) & mask) >= ((j - i) & mask):
                self.slots[i] = self.slots[j]
                i = j
        self.slots[i].entry = NULL
        self.slots[i].hash = 0
        return True

    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        cdef char op
        cdef uint32_t klen, elen
        cdef Py_ssize_t pos, slot
        cdef KVEntry* found
        cdef bint matched
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
            self.put(cmd + 5, klen, cmd + 5 + klen, n - 5 - klen)
            return out.write(RESULT_OK, NULL, 0)
        if op == b'D':
            if self.remove(cmd + 1, n - 1):
                return out.write(RESULT_OK, "\x01", 1)
            return out.write(RESULT_OK, "\x00", 1)
        if op == b'C':
            if n < 10:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            klen = load_u32(cmd + 1)
            pos = 5 + klen
            if pos + 5 > n:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            elen = load_u32(cmd + pos + 1)
            if pos + 5 + <Py_ssize_t>elen > n:
                return out.write(RESULT_ERROR, "malformed cas", 13)
            slot = self.find(cmd + 5, klen, self.key_hash(cmd + 5, klen))
            found = self.slots[slot].entry if slot >= 0 else NULL
            if cmd[pos] == 0:
                matched = found == NULL
            else:
                matched = (found != NULL and found.vlen == elen
                           and memcmp(found.data + klen, cmd + pos + 5, elen) == 0)
            if matched:
                self.put(cmd + 5, klen, cmd + pos + 5 + elen, n - pos - 5 - elen)
                return out.write(RESULT_OK, "\x01", 1)
            return out.write(RESULT_OK, "\x00", 1)
        return out.write(RESULT_ERROR, "unknown command", 15)

    cpdef bytes query(self, bytes query):
        """`b"G" key` -> `b"\\x01" value` or `b"\\x00"`; `b"N"` -> the key count (decimal)."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(query)
        cdef Py_ssize_t slot
        cdef KVEntry* e
        cdef bytes out
        if n >= 1 and q[0] == 0x47:  # 'G'
            slot = self.find(q + 1, n - 1, self.key_hash(q + 1, n - 1))
            if slot < 0:
                return ZERO
            e = self.slots[slot].entry
            out = PyBytes_FromStringAndSize(NULL, 1 + e.vlen)
            PyBytes_AS_STRING(out)[0] = 1
            memcpy(PyBytes_AS_STRING(out) + 1, e.data + e.klen, e.vlen)
            return out
        if query == b"N":
            return str(self.count).encode()
        raise ValueError("unknown query")

    cpdef bytes snapshot(self):
        """`u32 klen | u32 vlen | key | value` per entry, in insertion order."""
        cdef ResultWriter buf = ResultWriter()
        cdef Py_ssize_t i, size = 0
        cdef KVEntry* e
        for i in range(self.entries_size):
            e = self.entries[i]
            if e != NULL:
                size += 8 + e.klen + e.vlen
        buf.reserve(size)
        for i in range(self.entries_size):
            e = self.entries[i]
            if e == NULL:
                continue
            store_u32(buf.buf + buf.size, e.klen)
            store_u32(buf.buf + buf.size + 4, e.vlen)
            memcpy(buf.buf + buf.size + 8, e.data, e.klen + e.vlen)
            buf.size += 8 + e.klen + e.vlen
        return buf.take()

    cpdef restore(self, bytes data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0
        cdef uint32_t klen, vlen
        # Checked in full first: a bad snapshot leaves the state as it was.
        while pos < n:
            if pos + 8 > n:
                raise ValueError("truncated key-value snapshot")
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            if pos + 8 + <Py_ssize_t>klen + vlen > n:
                raise ValueError("truncated key-value snapshot")
            pos += 8 + klen + vlen
        self.free_all()
        pos = 0
        while pos < n:
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            self.put(p + pos + 8, klen, p + pos + 8 + klen, vlen)
            pos += 8 + klen + vlen

    cpdef str state_digest(self):
        """Order-independent: the sum of a hash of every (key, value) pair, mod 2**64."""
        cdef uint64_t total = 0
        cdef uint64_t hk
        cdef Py_ssize_t i
        cdef KVEntry* e
        for i in range(self.entries_size):
            e = self.entries[i]
            if e == NULL:
                continue
            hk = hash_bytes(e.data, e.klen, 0x9e3779b97f4a7c15ULL)
            total += mix64(hk ^ hash_bytes(e.data + e.klen, e.vlen, hk))
        return "%016x" % total

    def check_invariants(self):
        """Raise AssertionError if the table's invariants (see the .pxd) do not hold."""
        cdef Py_ssize_t i, live = 0, occupied = 0
        cdef KVEntry* e
        assert 0 <= self.count <= self.entries_size <= self.entries_capacity
        assert 10 * self.count <= 7 * (self.slots_mask + 1)
        for i in range(self.entries_size):
            e = self.entries[i]
            if e != NULL:
                live += 1
                assert e.order == i, "entry out of place"
                assert e.vlen <= e.vcap
                assert self.find(e.data, e.klen, self.key_hash(e.data, e.klen)) >= 0, \
                    "entry not reachable from its hash"
        for i in range(self.slots_mask + 1):
            if self.slots[i].entry != NULL:
                occupied += 1
                e = self.slots[i].entry
                assert self.slots[i].hash == self.key_hash(e.data, e.klen)
                assert self.entries[e.order] == e
        assert live == occupied == self.count, (live, occupied, self.count)


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
