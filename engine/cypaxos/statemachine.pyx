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
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memmove, memset

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

    cdef int append(self, const void* data, Py_ssize_t n) except -1:
        """Append bytes to the result being written (see open_result)."""
        self.reserve(n)
        if n:
            memcpy(self.buf + self.size, data, n)
        self.size += n
        return 0

    cdef int append_u64(self, uint64_t v) except -1:
        self.reserve(8)
        memcpy(self.buf + self.size, &v, 8)
        self.size += 8
        return 0

    cdef int append_u32(self, uint32_t v) except -1:
        self.reserve(4)
        store_u32(self.buf + self.size, v)
        self.size += 4
        return 0

    cdef int append_u8(self, uint8_t v) except -1:
        self.reserve(1)
        self.buf[self.size] = <char>v
        self.size += 1
        return 0

    cdef Py_ssize_t open_result(self, uint8_t status) except -1:
        """Start a result whose bytes are appended next; close_result(the returned
        offset) writes its length."""
        cdef Py_ssize_t at = self.size
        self.reserve(5)
        self.buf[at] = <char>status
        self.size += 5
        return at

    cdef void close_result(self, Py_ssize_t at) noexcept:
        store_u32(self.buf + at + 1, <uint32_t>(self.size - at - 5))

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

    def apply_packed(self, bytes payload, uint32_t count):
        """Apply `count` commands packed as a client batch's payload (`u32 len |
        command` each) as the core does, and return their packed results: a batch
        applied with no Python work per command (benchmarks, tools)."""
        cdef const char* p = PyBytes_AS_STRING(payload)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), pos = 0
        cdef uint32_t k
        cdef ResultWriter out = ResultWriter()
        for k in range(count):
            if pos + 4 > n or pos + 4 + <Py_ssize_t>load_u32(p + pos) > n:
                raise ValueError("payload shorter than its commands")
            pos += 4 + <Py_ssize_t>load_u32(p + pos)
        if pos != n:
            raise ValueError("payload longer than its commands")
        self.apply_commands(p, count, out)
        return out.take()

    def apply(self, bytes command):
        """Apply one command outside the core (tests, tools); returns (status, result)."""
        cdef ResultWriter out = ResultWriter()
        self.apply_command(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command), out)
        packed = out.take()
        return packed[0], packed[5:]


cdef bytes ZERO = b"\x00"
# Slots of an empty KVStore (a power of two).
cdef enum:
    _KV_SLOTS_MIN = 16
    # How many commands ahead KVStore.apply_commands prefetches (a power of two).
    _PREFETCH_AHEAD = 8
    _LEASE_SLOTS_MIN = 8
    # Deepest B+tree: every node but the root holds at least _BT_MIN items.
    _BT_DEPTH_MAX = 40
    # What a change counts for in the history window's byte bound, on top of its key
    # and values (a fixed figure, not sizeof: the bound decides results, so it must
    # be the same on every platform).
    _CHANGE_OVERHEAD = 32
cdef uint64_t _REVISION_MAX = 0xFFFFFFFFFFFFFFFFULL

# Kinds of change in the history window and in history results (commands.CHANGE_*).
cdef enum:
    _CHANGE_PUT = 0
    _CHANGE_DELETE = 1

# Compare targets and operators of a transaction, and its operation kinds.
cdef enum:
    _CMP_VALUE = 0
    _CMP_MOD_REVISION = 1
    _CMP_ABSENT = 2
    _CMP_CREATE_REVISION = 3
    _CMP_VERSION = 4
    _CMP_TARGETS = 5
    _OP_EQ = 0
    _OP_NE = 1
    _OP_LT = 2
    _OP_GT = 3
    _TXN_PUT = 0
    _TXN_DELETE = 1
    _TXN_GET = 2

# Outcomes of range and history queries, the first byte of their results
# (commands.QUERY_*).
cdef enum:
    _QUERY_OK = 0
    _QUERY_COMPACTED = 1
    _QUERY_FUTURE_REVISION = 2

CHANGE_OVERHEAD_BYTES = _CHANGE_OVERHEAD
"""A change counts for this many bytes in the history window, plus its key and values."""
HISTORY_CHANGES_MAX_DEFAULT = 10_000
"""Changes the history window keeps by default (every replica must use the same)."""
HISTORY_BYTES_MAX_DEFAULT = 4 << 20
"""Bytes the history window keeps by default (every replica must use the same)."""
REPLY_BYTES_DEFAULT = 1 << 20
"""The size bound of a range, history or lease query that gives none (0)."""
REPLY_BYTES_CEILING = 8 << 20
"""No query result is larger than this (one item larger still comes alone)."""

# A snapshot of this version starts with these bytes: as a version 0 snapshot (a bare
# list of u32 klen | u32 vlen | key | value) they would be a key of 4 GiB, which no
# command can carry.
SNAPSHOT_MAGIC = b"\xff\xff\xff\xffCYPXKV"
SNAPSHOT_VERSION = 1

cdef BTNode _NODE_PROBE
# A leaf uses only the fields up to `children`: it is allocated that short.
cdef Py_ssize_t _LEAF_BYTES = <Py_ssize_t>(<char*>&_NODE_PROBE.children[0]
                                           - <char*>&_NODE_PROBE)


cdef extern from *:
    void __builtin_prefetch(const void* address) noexcept nogil
    # (address, 1 = for writing, 3 = keep in every cache level)
    void prefetch_for_write "__builtin_prefetch"(const void* address, int rw,
                                                 int locality) noexcept nogil
    uint64_t __builtin_bswap64(uint64_t x) noexcept nogil


cdef inline uint64_t load_u64(const char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline void store_u64(char* p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cdef inline int key_cmp(const char* a, Py_ssize_t alen, const char* b,
                        Py_ssize_t blen) noexcept nogil:
    """Bytewise order (shorter first on a common prefix): the order of Python bytes.
    Eight bytes at a time, inline (a call to memcmp costs more for short keys); the
    last, partial word is read overlapping the one before it (those bytes are equal
    by then), so a key of 9 to 16 bytes takes two word compares."""
    cdef Py_ssize_t m = alen if alen < blen else blen
    cdef Py_ssize_t i = 0
    cdef uint64_t x = 0, y = 0
    if m >= 8:
        while True:
            memcpy(&x, a + i, 8)
            memcpy(&y, b + i, 8)
            if x != y:
                break
            i += 8
            if i >= m:
                return (alen > blen) - (alen < blen)
            if i + 8 > m:
                i = m - 8
    else:
        memcpy(&x, a, m)
        memcpy(&y, b, m)
        if x == y:
            return (alen > blen) - (alen < blen)
    # Little-endian loads: byte-swapped, the first differing byte decides.
    x = __builtin_bswap64(x)
    y = __builtin_bswap64(y)
    return -1 if x < y else 1


cdef int _entry_cmp(const void* a, const void* b) noexcept nogil:
    cdef KVEntry* x = (<KVEntry**>a)[0]
    cdef KVEntry* y = (<KVEntry**>b)[0]
    return key_cmp(x.data, x.klen, y.data, y.klen)


cdef int _u64_cmp(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<uint64_t*>a)[0]
    cdef uint64_t y = (<uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef inline bint in_range(const char* key, Py_ssize_t klen, const char* start,
                          Py_ssize_t slen, const char* end, Py_ssize_t elen,
                          bint has_end) noexcept nogil:
    """start <= key < end (no upper bound unless has_end)."""
    if key_cmp(key, klen, start, slen) < 0:
        return False
    return not has_end or key_cmp(key, klen, end, elen) < 0


cdef inline uint64_t key_prefix(const char* key, Py_ssize_t klen) noexcept nogil:
    """The first 8 bytes of a key as a big-endian number (zero-padded): keys whose
    prefixes differ are ordered as their prefixes are."""
    cdef uint64_t x = 0
    memcpy(&x, key, klen if klen < 8 else 8)
    return __builtin_bswap64(x)


cdef inline int leaf_lower(BTNode* nd, const char* key, Py_ssize_t klen,
                           uint64_t prefix) noexcept nogil:
    """The first place in a leaf whose key is >= key (count if none).  Prefixes
    decide most steps without reading the entries."""
    cdef int lo = 0, hi = nd.count, mid
    cdef KVEntry* e
    while lo < hi:
        mid = (lo + hi) >> 1
        if nd.pfx[mid] != prefix:
            if nd.pfx[mid] < prefix:
                lo = mid + 1
            else:
                hi = mid
            continue
        e = nd.entries[mid]
        if key_cmp(e.data, e.klen, key, klen) < 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline int inner_child(BTNode* nd, const char* key, Py_ssize_t klen,
                            uint64_t prefix) noexcept nogil:
    """The child of an inner node whose keys may include key."""
    cdef int lo = 1, hi = nd.count, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if nd.pfx[mid] != prefix:
            if nd.pfx[mid] < prefix:
                lo = mid + 1
            else:
                hi = mid
            continue
        if key_cmp(nd.sep[mid], nd.sep_len[mid], key, klen) <= 0:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


cdef inline void _shift_up(BTNode* nd, int at, bint leaf) noexcept nogil:
    """Open place `at` of a node (its items from `at` move one up; count unchanged).
    In an inner node the place is a child with the separator in front of it, except
    at 0, where child 0 moves up and separators from 1 do."""
    cdef int n = nd.count - at
    if leaf:
        memmove(&nd.entries[at + 1], &nd.entries[at], n * sizeof(KVEntry*))
        memmove(&nd.pfx[at + 1], &nd.pfx[at], n * sizeof(uint64_t))
        return
    memmove(&nd.children[at + 1], &nd.children[at], n * sizeof(BTNode*))
    if at == 0:
        at = 1
        n -= 1
    memmove(&nd.sep[at + 1], &nd.sep[at], n * sizeof(char*))
    memmove(&nd.sep_len[at + 1], &nd.sep_len[at], n * sizeof(uint32_t))
    memmove(&nd.pfx[at + 1], &nd.pfx[at], n * sizeof(uint64_t))


cdef inline void _shift_down(BTNode* nd, int at, bint leaf) noexcept nogil:
    """Close place `at` of a node (its items after `at` move one down; count
    unchanged).  In an inner node at 0, child 0 goes and separator 1 with it
    (separator 2 becomes separator 1)."""
    cdef int n = nd.count - at - 1
    if leaf:
        memmove(&nd.entries[at], &nd.entries[at + 1], n * sizeof(KVEntry*))
        memmove(&nd.pfx[at], &nd.pfx[at + 1], n * sizeof(uint64_t))
        return
    memmove(&nd.children[at], &nd.children[at + 1], n * sizeof(BTNode*))
    if at == 0:
        at = 1
        n -= 1
    memmove(&nd.sep[at], &nd.sep[at + 1], n * sizeof(char*))
    memmove(&nd.sep_len[at], &nd.sep_len[at + 1], n * sizeof(uint32_t))
    memmove(&nd.pfx[at], &nd.pfx[at + 1], n * sizeof(uint64_t))


cdef BTNode* node_new(bint leaf) except NULL:
    cdef BTNode* nd = <BTNode*>PyMem_Malloc(_LEAF_BYTES if leaf else sizeof(BTNode))
    if nd == NULL:
        raise MemoryError()
    nd.count = 0
    nd.leaf = leaf
    nd.next = NULL
    return nd


cdef char* key_copy(const char* key, Py_ssize_t klen) except NULL:
    cdef char* out = <char*>PyMem_Malloc(klen if klen else 1)
    if out == NULL:
        raise MemoryError()
    memcpy(out, key, klen)
    return out


cdef void node_free(BTNode* nd) noexcept:
    cdef int i
    if not nd.leaf:
        for i in range(nd.count):
            node_free(nd.children[i])
            if i:
                PyMem_Free(nd.sep[i])
    PyMem_Free(nd)


cdef inline void value_free(KVEntry* e) noexcept:
    if e.value != e.data + e.klen:
        PyMem_Free(e.value)


cdef void entry_free(KVEntry* e) noexcept:
    value_free(e)
    PyMem_Free(e)


cdef int _range_item(ResultWriter w, const char* key, Py_ssize_t klen, const char* value,
                     Py_ssize_t vlen, uint64_t mod_revision, uint32_t count, uint32_t limit,
                     Py_ssize_t bound) except -1:
    """Append one item to a range reply of `count` items so far: 1, or 0 (nothing
    appended) when the limit or the size bound ends the reply before it (the first
    item always goes, whatever its size)."""
    cdef Py_ssize_t item = 16 + klen + vlen
    if (limit and count == limit) or (count and w.size + item > bound):
        return 0
    w.reserve(item)
    w.append_u32(<uint32_t>klen)
    w.append_u32(<uint32_t>vlen)
    w.append_u64(mod_revision)
    w.append(key, klen)
    w.append(value, vlen)
    return 1


cdef inline Py_ssize_t _arena_bytes(Py_ssize_t payload) noexcept:
    """Bytes a change takes in the history arena: its header and payload, rounded up
    to 8 so that the next header is aligned."""
    return (<Py_ssize_t>sizeof(KVChange) + payload + 7) & ~(<Py_ssize_t>7)


cdef inline Py_ssize_t _reply_bound(uint32_t asked) noexcept:
    if asked == 0:
        return REPLY_BYTES_DEFAULT
    return asked if asked < REPLY_BYTES_CEILING else REPLY_BYTES_CEILING


cdef _check_node(BTNode* nd, int depth, bint is_root, bytes low, bytes high):
    """Check a subtree: its keys are in [low, high) (None: unbounded), its node sizes,
    and that its leaves are `depth` levels down."""
    cdef int i
    cdef KVEntry* e
    cdef bytes key
    if not is_root:
        assert _BT_MIN <= nd.count <= _BT_FANOUT, ("node size", nd.count)
    assert nd.count <= _BT_FANOUT
    if nd.leaf:
        assert depth == 0, "leaves at different depths"
        for i in range(nd.count):
            e = nd.entries[i]
            key = PyBytes_FromStringAndSize(e.data, e.klen)
            assert nd.pfx[i] == key_prefix(e.data, e.klen), "stale key prefix"
            assert low is None or key >= low, "key under its separator"
            assert high is None or key < high, "key over its separator"
        return
    assert depth > 0 and nd.count >= 2, "inner node"
    for i in range(1, nd.count):
        assert nd.pfx[i] == key_prefix(nd.sep[i], nd.sep_len[i]), "stale separator prefix"
    for i in range(nd.count):
        _check_node(nd.children[i], depth - 1, False,
                    PyBytes_FromStringAndSize(nd.sep[i], nd.sep_len[i]) if i else low,
                    PyBytes_FromStringAndSize(nd.sep[i + 1], nd.sep_len[i + 1])
                    if i + 1 < nd.count else high)


@cython.final
cdef class KVStore(StateMachine):
    """Keys and values are bytes.  Commands and results are described in docs/internals.md.

    `history_changes_max` and `history_bytes_max` bound the window of recent changes
    (for watches and past reads); they decide results, so every replica of a cluster
    must be given the same.
    """

    def __cinit__(self, *args, **kwargs):
        self.slots = <KVSlot*>PyMem_Calloc(_KV_SLOTS_MIN, sizeof(KVSlot))
        self.lease_slots = <KVLease**>PyMem_Calloc(_LEASE_SLOTS_MIN, sizeof(KVLease*))
        self.history = <KVChange**>PyMem_Malloc(_KV_SLOTS_MIN * sizeof(KVChange*))
        if self.slots == NULL or self.lease_slots == NULL or self.history == NULL:
            raise MemoryError()
        self.slots_mask = _KV_SLOTS_MIN - 1
        self.lease_mask = _LEASE_SLOTS_MIN - 1
        self.history_capacity = _KV_SLOTS_MIN
        self.root = node_new(True)
        # Where keys land depends on a seed that differs per process (as Python's own
        # hash of bytes does, and with PYTHONHASHSEED): clients choose the keys, so a
        # fixed seed would let them pick keys that all collide.  Nothing observable
        # depends on it: snapshots and ranges follow key order.
        self.seed = <uint64_t>hash(b"cypaxos.statemachine.KVStore")
        self.next_lease_id = 1

    def __init__(self, history_changes_max=HISTORY_CHANGES_MAX_DEFAULT,
                 history_bytes_max=HISTORY_BYTES_MAX_DEFAULT):
        if history_changes_max < 0 or history_bytes_max < 0:
            raise ValueError("history bounds must be >= 0")
        self.history_changes_max = history_changes_max
        self.history_bytes_max = history_bytes_max
        self.applied_commands = 0

    def __dealloc__(self):
        self.free_all()
        PyMem_Free(self.slots)
        PyMem_Free(self.lease_slots)
        PyMem_Free(self.history)
        PyMem_Free(self.arena)
        if self.root != NULL:
            node_free(self.root)

    def __len__(self):
        return self.count

    cdef void free_all(self) noexcept:
        """Drop every key, lease and change, and the counters (back to a new store)."""
        cdef Py_ssize_t i
        cdef KVEntry* e
        for i in range(self.slots_mask + 1):
            e = self.slots[i].entry
            if e != NULL:
                entry_free(e)
                self.slots[i].entry = NULL
                self.slots[i].hash = 0
        self.count = 0
        self.entry_bytes = 0
        if self.root != NULL:
            node_free(self.root)
        # A leaf of the minimal size cannot fail to allocate in practice; if it did,
        # the store would have no root and would refuse (crash) on the next use.
        self.root = <BTNode*>PyMem_Malloc(_LEAF_BYTES)
        if self.root != NULL:
            self.root.count = 0
            self.root.leaf = 1
            self.root.next = NULL
        self.depth = 0
        self.history_head = 0
        self.arena_tail = 0
        self.history_size = 0
        self.history_bytes = 0
        for i in range(self.lease_mask + 1):
            if self.lease_slots[i] != NULL:
                PyMem_Free(self.lease_slots[i])
                self.lease_slots[i] = NULL
        self.lease_count = 0
        self.next_lease_id = 1
        self.revision = 0
        self.compact_revision = 0

    # -- the hash table ---------------------------------------------------------

    cdef uint64_t key_hash(self, const char* key, Py_ssize_t klen) noexcept:
        if key == self.hint_key and klen == self.hint_klen:
            return self.hint_hash   # hashed already, by apply_commands' look-ahead
        return hash_bytes(key, klen, self.seed)

    cdef const char* command_key(self, const char* cmd, Py_ssize_t n,
                                 Py_ssize_t* klen) noexcept:
        """The key of a single-key command (put, delete, cas, either kind), or NULL:
        for prefetching, so never an error."""
        cdef uint32_t length
        cdef char op
        if n < 1:
            return NULL
        op = cmd[0]
        if n >= 5 and (op == b'P' or op == b'C' or op == b'c'):
            length = load_u32(cmd + 1)
            if 5 + <Py_ssize_t>length <= n:
                klen[0] = length
                return cmd + 5
        elif op == b'D' or op == b'd':
            klen[0] = n - 1
            return cmd + 1
        elif op == b'p' and n >= 13:
            length = load_u32(cmd + 9)
            if 13 + <Py_ssize_t>length <= n:
                klen[0] = length
                return cmd + 13
        return NULL

    cdef int apply_commands(self, const char* packed, uint32_t count,
                            ResultWriter out) except -1:
        # A put is mostly two cache misses (its slot, then its entry) when the table
        # is larger than the cache.  Looking ahead hides them: the slot of the command
        # _PREFETCH_AHEAD on is prefetched, and so is the entry in the slot of the one
        # half as far on (its slot is in the cache by then).  A slot index gone stale
        # because the table grew meanwhile only costs a useless prefetch.  The hash
        # taken for that is handed to the command (hint_*), not taken again.
        cdef uint64_t hashes[_PREFETCH_AHEAD]
        cdef const char* keys[_PREFETCH_AHEAD]
        cdef Py_ssize_t klens[_PREFETCH_AHEAD]
        cdef const char* ahead_at = packed
        cdef uint32_t ahead = 0, k, n, at
        cdef Py_ssize_t klen
        cdef const char* key
        cdef KVEntry* e
        try:
            for k in range(count):
                # Keep the slots of commands k .. k + _PREFETCH_AHEAD - 1 on their way
                # (the first pass starts them all).
                while ahead < count and ahead < k + _PREFETCH_AHEAD:
                    n = load_u32(ahead_at)
                    at = ahead % _PREFETCH_AHEAD
                    key = self.command_key(ahead_at + 4, n, &klen)
                    keys[at] = key
                    if key != NULL:
                        klens[at] = klen
                        hashes[at] = hash_bytes(key, klen, self.seed)
                        __builtin_prefetch(&self.slots[hashes[at] & self.slots_mask])
                    ahead_at += 4 + n
                    ahead += 1
                if k + _PREFETCH_AHEAD // 2 < ahead:
                    at = (k + _PREFETCH_AHEAD // 2) % _PREFETCH_AHEAD
                    if keys[at] != NULL:
                        e = self.slots[hashes[at] & self.slots_mask].entry
                        if e != NULL:
                            # Its key starts past the first line (the revisions and
                            # lease links come first), and a put writes the value
                            # after it: the first three lines.
                            __builtin_prefetch(e)
                            __builtin_prefetch(<char*>e + 64)
                            __builtin_prefetch(<char*>e + 128)
                at = k % _PREFETCH_AHEAD
                self.hint_key = keys[at]
                self.hint_klen = klens[at]
                self.hint_hash = hashes[at]
                n = load_u32(packed)
                self.apply_command(packed + 4, n, out)
                packed += 4 + n
        finally:
            self.hint_key = NULL
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

    cdef KVEntry* lookup(self, const char* key, Py_ssize_t klen) noexcept:
        cdef Py_ssize_t i = self.find(key, klen, self.key_hash(key, klen))
        return self.slots[i].entry if i >= 0 else NULL

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

    # -- changes ----------------------------------------------------------------

    cdef int set_value(self, KVEntry* e, const char* value, Py_ssize_t vlen) except -1:
        """Overwrite an entry's value.  The entry itself never moves (the tree and a
        lease's list point at it): a value that does not fit the room made at its
        creation goes to a buffer of its own, resized to fit."""
        cdef char* buf
        if vlen <= e.icap:
            value_free(e)
            e.value = e.data + e.klen
            e.vcap = e.icap
        elif vlen > e.vcap or e.vcap > 2 * vlen + 256:
            if e.value == e.data + e.klen:
                buf = <char*>PyMem_Malloc(vlen)
            else:
                buf = <char*>PyMem_Realloc(e.value, vlen)
            if buf == NULL:
                raise MemoryError()
            e.value = buf
            e.vcap = <uint32_t>vlen
        memcpy(e.value, value, vlen)
        self.entry_bytes += vlen - <Py_ssize_t>e.vlen
        e.vlen = <uint32_t>vlen
        return 0

    cdef int put(self, const char* key, Py_ssize_t klen, const char* value,
                 Py_ssize_t vlen, uint64_t lease, uint64_t rev) except -1:
        """Set key to value at revision rev, attached to `lease` (0: none; it must
        exist).  Only a new key touches the ordered index."""
        cdef uint64_t h = self.key_hash(key, klen)
        cdef Py_ssize_t i = self.find(key, klen, h)
        cdef KVEntry* e
        if i >= 0:
            e = self.slots[i].entry
            self.record(_CHANGE_PUT, rev, key, klen, value, vlen, e.value, e.vlen,
                        e.mod_revision)
            self.set_value(e, value, vlen)
            e.mod_revision = rev
            e.version += 1
            if e.lease != lease:
                self.lease_detach(e)
                if lease:
                    self.lease_attach(e, lease)
            return 0
        if 10 * (self.count + 1) > 7 * (self.slots_mask + 1):
            self.grow()
            i = self.find(key, klen, h)
        i = -1 - i
        self.record(_CHANGE_PUT, rev, key, klen, value, vlen, NULL, 0, 0)
        e = <KVEntry*>PyMem_Malloc(sizeof(KVEntry) + klen + vlen)
        if e == NULL:
            raise MemoryError()
        e.klen = <uint32_t>klen
        e.vlen = <uint32_t>vlen
        e.vcap = <uint32_t>vlen
        e.icap = <uint32_t>vlen
        e.value = e.data + klen
        e.create_revision = rev
        e.mod_revision = rev
        e.version = 1
        e.lease = 0
        e.lease_prev = NULL
        e.lease_next = NULL
        memcpy(e.data, key, klen)
        memcpy(e.value, value, vlen)
        try:
            self.tree_insert(e)
        except MemoryError:
            PyMem_Free(e)
            raise
        self.slots[i].hash = h
        self.slots[i].entry = e
        self.count += 1
        self.entry_bytes += klen + vlen
        if lease:
            self.lease_attach(e, lease)
        return 0

    cdef int remove(self, const char* key, Py_ssize_t klen, uint64_t rev) except -1:
        """Delete key at revision rev; 0 if it was absent, else 1."""
        cdef Py_ssize_t i = self.find(key, klen, self.key_hash(key, klen))
        cdef Py_ssize_t j, home
        cdef Py_ssize_t mask = self.slots_mask
        cdef KVEntry* e
        if i < 0:
            return 0
        e = self.slots[i].entry
        self.record(_CHANGE_DELETE, rev, e.data, e.klen, NULL, 0, e.value, e.vlen,
                    e.mod_revision)
        self.tree_remove(e)
        self.lease_detach(e)
        self.entry_bytes -= <Py_ssize_t>e.klen + e.vlen
        entry_free(e)
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
        return 1

    # -- the history window -----------------------------------------------------

    cdef int record(self, uint8_t kind, uint64_t rev, const char* key, Py_ssize_t klen,
                    const char* value, Py_ssize_t vlen, const char* prev,
                    Py_ssize_t pvlen, uint64_t prev_mod_revision) except -1:
        """Append a change to the history window, first dropping what would fall out
        of it (the same as appending, then dropping: the oldest go first)."""
        cdef Py_ssize_t size = _CHANGE_OVERHEAD + klen + vlen + pvlen
        cdef Py_ssize_t i, cap, need, room, head
        cdef KVChange* c
        cdef KVChange** grown
        if rev <= self.compact_revision:
            # The window already dropped part of this revision (a command larger than
            # the whole window): the rest of it is not kept either.
            return 0
        if size > self.history_bytes_max or self.history_changes_max == 0:
            # It could not stay even alone: nothing before it can either.
            while self.history_size:
                self.evict_oldest()
            self.compact_revision = rev
            return 0
        while self.history_size and (self.history_size >= self.history_changes_max
                                     or self.history_bytes + size > self.history_bytes_max):
            c = self.history[self.history_head]
            if self.history_size > 1 and self.history[
                    (self.history_head + 1) & (self.history_capacity - 1)].revision != c.revision:
                # The oldest revision is one change (the common case), inline.
                self.compact_revision = c.revision
                self.history_bytes -= _CHANGE_OVERHEAD + c.klen + c.vlen + c.pvlen
                self.history_head = (self.history_head + 1) & (self.history_capacity - 1)
                self.history_size -= 1
            else:
                self.evict_oldest()
            if rev <= self.compact_revision:
                return 0
        if self.history_size == self.history_capacity:
            cap = 2 * self.history_capacity
            grown = <KVChange**>PyMem_Malloc(cap * sizeof(KVChange*))
            if grown == NULL:
                raise MemoryError()
            for i in range(self.history_size):
                grown[i] = self.history[(self.history_head + i) & (self.history_capacity - 1)]
            PyMem_Free(self.history)
            self.history = grown
            self.history_capacity = cap
            self.history_head = 0
        need = _arena_bytes(klen + vlen + pvlen)
        room = 0
        if self.history_size:
            # Room at the tail without wrapping or growing (the common case, inline).
            head = <char*>self.history[self.history_head] - self.arena
            room = (self.arena_capacity if self.arena_tail > head else head) - self.arena_tail
        if room >= need:
            c = <KVChange*>(self.arena + self.arena_tail)
            self.arena_tail += need
        else:
            c = <KVChange*>self.arena_place(need)
        # The arena is written in order, and its lines are long out of the cache by
        # the time the ring comes back to them: ask for the next changes' lines now
        # (past the arena's end, a prefetch does nothing).
        prefetch_for_write(self.arena + self.arena_tail + 256, 1, 3)
        prefetch_for_write(self.arena + self.arena_tail + 320, 1, 3)
        c.revision = rev
        c.prev_mod_revision = prev_mod_revision
        c.klen = <uint32_t>klen
        c.vlen = <uint32_t>vlen
        c.pvlen = <uint32_t>pvlen
        c.kind = kind
        memcpy(c.data, key, klen)
        if vlen:
            memcpy(c.data + klen, value, vlen)
        if pvlen:
            memcpy(c.data + klen + vlen, prev, pvlen)
        self.history[(self.history_head + self.history_size) & (self.history_capacity - 1)] = c
        self.history_size += 1
        self.history_bytes += size
        return 0

    cdef char* arena_place(self, Py_ssize_t need) except NULL:
        """Room for a change of `need` bytes at the arena's tail: changes are laid one
        after the other in a ring of bytes and leave it oldest first, so the room the
        oldest leave is reused with no allocation per change.  A change that does
        not fit before the end goes to the start (the rest of the end is skipped); if
        it fits nowhere, the arena grows, its changes copied in order."""
        cdef Py_ssize_t head, off = -1, cap, i, used = 0, n
        cdef char* fresh
        cdef KVChange* c
        cdef Py_ssize_t mask = self.history_capacity - 1
        if self.history_size == 0:
            self.arena_tail = 0
            if need <= self.arena_capacity:
                off = 0
        else:
            head = <char*>self.history[self.history_head] - self.arena
            if self.arena_tail > head:
                if self.arena_capacity - self.arena_tail >= need:
                    off = self.arena_tail
                elif head >= need:
                    off = 0
            elif head - self.arena_tail >= need:
                off = self.arena_tail
        if off < 0:
            cap = 2 * self.arena_capacity
            if cap < 2 * need:
                cap = 2 * need
            if cap < 4096:
                cap = 4096
            fresh = <char*>PyMem_Malloc(cap)
            if fresh == NULL:
                raise MemoryError()
            for i in range(self.history_size):
                c = self.history[(self.history_head + i) & mask]
                n = _arena_bytes(c.klen + c.vlen + c.pvlen)
                memcpy(fresh + used, c, n)
                self.history[(self.history_head + i) & mask] = <KVChange*>(fresh + used)
                used += n
            PyMem_Free(self.arena)
            self.arena = fresh
            self.arena_capacity = cap
            off = used
        self.arena_tail = off + need
        return self.arena + off

    cdef void evict_oldest(self) noexcept:
        """Drop the oldest revision's changes (whole revisions: a revision partly kept
        could answer no query); compact_revision becomes it."""
        cdef KVChange* c = self.history[self.history_head]
        cdef Py_ssize_t mask = self.history_capacity - 1
        self.compact_revision = c.revision
        while True:
            self.history_bytes -= _CHANGE_OVERHEAD + c.klen + c.vlen + c.pvlen
            self.history_head = (self.history_head + 1) & mask
            self.history_size -= 1
            if not self.history_size:
                return
            c = self.history[self.history_head]
            if c.revision != self.compact_revision:
                return

    cdef void evict(self) noexcept:
        """Drop the oldest changes until the window is within its bounds."""
        while self.history_size and (self.history_size > self.history_changes_max
                                     or self.history_bytes > self.history_bytes_max):
            self.evict_oldest()

    cdef Py_ssize_t history_lower_bound(self, uint64_t rev) noexcept:
        """How many changes of the window are older than revision rev."""
        cdef Py_ssize_t lo = 0, hi = self.history_size, mid
        cdef Py_ssize_t mask = self.history_capacity - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.history[(self.history_head + mid) & mask].revision < rev:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- the ordered index ------------------------------------------------------

    cdef BTNode* tree_seek(self, const char* key, Py_ssize_t klen, int* pos) noexcept:
        """The leaf and place (*pos, maybe the leaf's count) of the first key >= key."""
        cdef BTNode* nd = self.root
        cdef uint64_t prefix = key_prefix(key, klen)
        while not nd.leaf:
            nd = nd.children[inner_child(nd, key, klen, prefix)]
        pos[0] = leaf_lower(nd, key, klen, prefix)
        return nd

    cdef int tree_insert(self, KVEntry* e) except -1:
        """Insert an entry whose key is not in the tree: O(log n)."""
        cdef BTNode* path[_BT_DEPTH_MAX]
        cdef int where[_BT_DEPTH_MAX]
        cdef int d = 0, i, pos, half
        cdef BTNode* nd = self.root
        cdef BTNode* right
        cdef BTNode* parent
        cdef char* sep
        cdef uint32_t sep_len
        cdef uint64_t prefix = key_prefix(e.data, e.klen), sep_pfx
        while not nd.leaf:
            i = inner_child(nd, e.data, e.klen, prefix)
            path[d] = nd
            where[d] = i
            d += 1
            nd = nd.children[i]
        pos = leaf_lower(nd, e.data, e.klen, prefix)
        _shift_up(nd, pos, True)
        nd.entries[pos] = e
        nd.pfx[pos] = prefix
        nd.count += 1
        if nd.count <= _BT_FANOUT:
            return 0
        # A full leaf splits in two; allocate first so that a failure changes nothing.
        half = nd.count // 2
        try:
            right = node_new(True)
            try:
                sep = key_copy(nd.entries[half].data, nd.entries[half].klen)
            except MemoryError:
                PyMem_Free(right)
                raise
        except MemoryError:
            _shift_down(nd, pos, True)
            nd.count -= 1
            raise
        sep_len = nd.entries[half].klen
        sep_pfx = nd.pfx[half]
        right.count = nd.count - half
        memcpy(right.entries, &nd.entries[half], right.count * sizeof(KVEntry*))
        memcpy(right.pfx, &nd.pfx[half], right.count * sizeof(uint64_t))
        nd.count = half
        right.next = nd.next
        nd.next = right
        # Hand (sep, right) up until a node has room.  (An allocation failure from here
        # on leaves the tree broken: the replica must stop, as on any failed apply.)
        while True:
            if d == 0:
                parent = node_new(False)
                parent.count = 2
                parent.children[0] = nd
                parent.children[1] = right
                parent.sep[1] = sep
                parent.sep_len[1] = sep_len
                parent.pfx[1] = sep_pfx
                self.root = parent
                self.depth += 1
                return 0
            d -= 1
            parent = path[d]
            i = where[d] + 1
            _shift_up(parent, i, False)
            parent.children[i] = right
            parent.sep[i] = sep
            parent.sep_len[i] = sep_len
            parent.pfx[i] = sep_pfx
            parent.count += 1
            if parent.count <= _BT_FANOUT:
                return 0
            # Split the inner node: children [half, count) move right, and the
            # separator in front of them moves up.
            nd = parent
            right = node_new(False)
            half = nd.count // 2
            right.count = nd.count - half
            memcpy(right.children, &nd.children[half], right.count * sizeof(BTNode*))
            memcpy(&right.sep[1], &nd.sep[half + 1], (right.count - 1) * sizeof(char*))
            memcpy(&right.sep_len[1], &nd.sep_len[half + 1], (right.count - 1) * sizeof(uint32_t))
            memcpy(&right.pfx[1], &nd.pfx[half + 1], (right.count - 1) * sizeof(uint64_t))
            sep = nd.sep[half]
            sep_len = nd.sep_len[half]
            sep_pfx = nd.pfx[half]
            nd.count = half

    cdef int tree_remove(self, KVEntry* e) except -1:
        """Remove an entry that is in the tree: O(log n), merging or refilling nodes
        that fall under _BT_MIN items."""
        cdef BTNode* path[_BT_DEPTH_MAX]
        cdef int where[_BT_DEPTH_MAX]
        cdef int d = 0, i, pos, li, j
        cdef BTNode* nd = self.root
        cdef BTNode* parent
        cdef BTNode* left
        cdef BTNode* right
        cdef char* sep
        cdef uint64_t prefix = key_prefix(e.data, e.klen)
        while not nd.leaf:
            i = inner_child(nd, e.data, e.klen, prefix)
            path[d] = nd
            where[d] = i
            d += 1
            nd = nd.children[i]
        pos = leaf_lower(nd, e.data, e.klen, prefix)
        assert pos < nd.count and nd.entries[pos] == e, "entry missing from the index"
        _shift_down(nd, pos, True)
        nd.count -= 1
        while d > 0 and nd.count < _BT_MIN:
            parent = path[d - 1]
            i = where[d - 1]
            if i > 0:
                left = parent.children[i - 1]
                right = nd
                li = i
            else:
                left = nd
                right = parent.children[1]
                li = 1
            if left.count + right.count <= _BT_FANOUT:
                # Merge right into left; the separator between them goes.
                if nd.leaf:
                    memcpy(&left.entries[left.count], right.entries,
                           right.count * sizeof(KVEntry*))
                    memcpy(&left.pfx[left.count], right.pfx, right.count * sizeof(uint64_t))
                    left.next = right.next
                    PyMem_Free(parent.sep[li])
                else:
                    left.children[left.count] = right.children[0]
                    left.sep[left.count] = parent.sep[li]
                    left.sep_len[left.count] = parent.sep_len[li]
                    left.pfx[left.count] = parent.pfx[li]
                    for j in range(1, right.count):
                        left.children[left.count + j] = right.children[j]
                        left.sep[left.count + j] = right.sep[j]
                        left.sep_len[left.count + j] = right.sep_len[j]
                        left.pfx[left.count + j] = right.pfx[j]
                left.count += right.count
                PyMem_Free(right)
                _shift_down(parent, li, False)
                parent.count -= 1
                nd = parent
                d -= 1
                continue
            # Refill from the sibling, which has items to spare.
            if nd.leaf:
                if nd is right:
                    _shift_up(nd, 0, True)
                    nd.entries[0] = left.entries[left.count - 1]
                    nd.pfx[0] = left.pfx[left.count - 1]
                    nd.count += 1
                    left.count -= 1
                else:
                    nd.entries[nd.count] = right.entries[0]
                    nd.pfx[nd.count] = right.pfx[0]
                    nd.count += 1
                    _shift_down(right, 0, True)
                    right.count -= 1
                sep = key_copy(right.entries[0].data, right.entries[0].klen)
                PyMem_Free(parent.sep[li])
                parent.sep[li] = sep
                parent.sep_len[li] = right.entries[0].klen
                parent.pfx[li] = right.pfx[0]
            elif nd is right:
                # The separator in the parent comes down in front of nd's children,
                # and left's last separator goes up in its place.
                _shift_up(nd, 0, False)
                nd.children[0] = left.children[left.count - 1]
                nd.sep[1] = parent.sep[li]
                nd.sep_len[1] = parent.sep_len[li]
                nd.pfx[1] = parent.pfx[li]
                parent.sep[li] = left.sep[left.count - 1]
                parent.sep_len[li] = left.sep_len[left.count - 1]
                parent.pfx[li] = left.pfx[left.count - 1]
                nd.count += 1
                left.count -= 1
            else:
                nd.children[nd.count] = right.children[0]
                nd.sep[nd.count] = parent.sep[li]
                nd.sep_len[nd.count] = parent.sep_len[li]
                nd.pfx[nd.count] = parent.pfx[li]
                nd.count += 1
                parent.sep[li] = right.sep[1]
                parent.sep_len[li] = right.sep_len[1]
                parent.pfx[li] = right.pfx[1]
                _shift_down(right, 0, False)
                right.count -= 1
            break
        if not self.root.leaf and self.root.count == 1:
            nd = self.root
            self.root = nd.children[0]
            PyMem_Free(nd)
            self.depth -= 1
        return 0

    # -- leases -----------------------------------------------------------------

    cdef KVLease* lease_find(self, uint64_t lease_id) noexcept:
        cdef Py_ssize_t i = mix64(lease_id) & self.lease_mask
        cdef KVLease* l
        while True:
            l = self.lease_slots[i]
            if l == NULL or l.id == lease_id:
                return l
            i = (i + 1) & self.lease_mask

    cdef int lease_add(self, uint64_t lease_id, uint64_t ttl_ms) except -1:
        cdef Py_ssize_t i, j, n
        cdef KVLease** fresh
        cdef KVLease* l
        if 10 * (self.lease_count + 1) > 7 * (self.lease_mask + 1):
            n = 2 * (self.lease_mask + 1)
            fresh = <KVLease**>PyMem_Calloc(n, sizeof(KVLease*))
            if fresh == NULL:
                raise MemoryError()
            for i in range(self.lease_mask + 1):
                if self.lease_slots[i] != NULL:
                    j = mix64(self.lease_slots[i].id) & (n - 1)
                    while fresh[j] != NULL:
                        j = (j + 1) & (n - 1)
                    fresh[j] = self.lease_slots[i]
            PyMem_Free(self.lease_slots)
            self.lease_slots = fresh
            self.lease_mask = n - 1
        l = <KVLease*>PyMem_Malloc(sizeof(KVLease))
        if l == NULL:
            raise MemoryError()
        l.id = lease_id
        l.ttl_ms = ttl_ms
        l.key_count = 0
        l.keys = NULL
        i = mix64(lease_id) & self.lease_mask
        while self.lease_slots[i] != NULL:
            i = (i + 1) & self.lease_mask
        self.lease_slots[i] = l
        self.lease_count += 1
        return 0

    cdef void lease_drop(self, uint64_t lease_id) noexcept:
        """Forget a lease that has no keys left."""
        cdef Py_ssize_t mask = self.lease_mask
        cdef Py_ssize_t i = mix64(lease_id) & mask
        cdef Py_ssize_t j, home
        while self.lease_slots[i] != NULL and self.lease_slots[i].id != lease_id:
            i = (i + 1) & mask
        if self.lease_slots[i] == NULL:
            return
        PyMem_Free(self.lease_slots[i])
        self.lease_count -= 1
        j = i
        while True:
            j = (j + 1) & mask
            if self.lease_slots[j] == NULL:
                break
            home = mix64(self.lease_slots[j].id) & mask
            if ((j - home) & mask) >= ((j - i) & mask):
                self.lease_slots[i] = self.lease_slots[j]
                i = j
        self.lease_slots[i] = NULL

    cdef void lease_attach(self, KVEntry* e, uint64_t lease_id) noexcept:
        cdef KVLease* l = self.lease_find(lease_id)
        e.lease = lease_id
        e.lease_prev = NULL
        e.lease_next = l.keys
        if l.keys != NULL:
            l.keys.lease_prev = e
        l.keys = e
        l.key_count += 1

    cdef void lease_detach(self, KVEntry* e) noexcept:
        cdef KVLease* l
        if e.lease == 0:
            return
        l = self.lease_find(e.lease)
        if e.lease_prev != NULL:
            e.lease_prev.lease_next = e.lease_next
        else:
            l.keys = e.lease_next
        if e.lease_next != NULL:
            e.lease_next.lease_prev = e.lease_prev
        l.key_count -= 1
        e.lease = 0
        e.lease_prev = NULL
        e.lease_next = NULL

    cdef Py_ssize_t revoke(self, uint64_t lease_id, uint64_t rev) except -1:
        """Delete every key of an existing lease at revision rev, in key order, and
        the lease; returns how many keys went."""
        cdef KVLease* l = self.lease_find(lease_id)
        cdef Py_ssize_t n = l.key_count, i
        cdef KVEntry** keys
        cdef KVEntry* e = l.keys
        if n:
            keys = <KVEntry**>PyMem_Malloc(n * sizeof(KVEntry*))
            if keys == NULL:
                raise MemoryError()
            for i in range(n):
                keys[i] = e
                e = e.lease_next
            qsort(keys, n, sizeof(KVEntry*), _entry_cmp)
            try:
                for i in range(n):
                    self.remove(keys[i].data, keys[i].klen, rev)
            finally:
                PyMem_Free(keys)
        self.lease_drop(lease_id)
        return n

    # -- commands ---------------------------------------------------------------

    cdef int write_get(self, ResultWriter out, const char* key, Py_ssize_t klen) except -1:
        """`u8 found [u64 mod_revision | u64 create_revision | u64 version | u64 lease
        | value]` for key, appended to the result being written."""
        cdef KVEntry* e = self.lookup(key, klen)
        if e == NULL:
            return out.append_u8(0)
        out.reserve(33 + e.vlen)
        out.append_u8(1)
        out.append_u64(e.mod_revision)
        out.append_u64(e.create_revision)
        out.append_u64(e.version)
        out.append_u64(e.lease)
        return out.append(e.value, e.vlen)

    cdef int apply_cas(self, const char* cmd, Py_ssize_t n, ResultWriter out,
                       bint with_revision) except -1:
        cdef uint32_t klen, elen
        cdef Py_ssize_t pos
        cdef KVEntry* found
        cdef bint matched
        cdef char answer[9]
        if n < 10:
            return out.write(RESULT_ERROR, "malformed cas", 13)
        klen = load_u32(cmd + 1)
        pos = 5 + <Py_ssize_t>klen
        if pos + 5 > n or <uint8_t>cmd[pos] > 1:
            return out.write(RESULT_ERROR, "malformed cas", 13)
        elen = load_u32(cmd + pos + 1)
        if pos + 5 + <Py_ssize_t>elen > n or (cmd[pos] == 0 and elen):
            return out.write(RESULT_ERROR, "malformed cas", 13)
        found = self.lookup(cmd + 5, klen)
        if cmd[pos] == 0:
            matched = found == NULL
        else:
            matched = (found != NULL and found.vlen == elen
                       and memcmp(found.value, cmd + pos + 5, elen) == 0)
        if matched:
            self.put(cmd + 5, klen, cmd + pos + 5 + elen, n - pos - 5 - elen, 0,
                     self.revision + 1)
            self.revision += 1
        answer[0] = 1 if matched else 0
        if not with_revision:
            return out.write(RESULT_OK, answer, 1)
        store_u64(answer + 1, self.revision)
        return out.write(RESULT_OK, answer, 9)

    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        cdef char op
        cdef uint32_t klen
        cdef uint64_t lease
        cdef char answer[17]
        cdef int removed
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
            self.put(cmd + 5, klen, cmd + 5 + klen, n - 5 - klen, 0, self.revision + 1)
            self.revision += 1
            return out.write(RESULT_OK, NULL, 0)
        if op == b'D' or op == b'd':
            removed = self.remove(cmd + 1, n - 1, self.revision + 1)
            self.revision += removed
            answer[0] = removed
            if op == b'D':
                return out.write(RESULT_OK, answer, 1)
            store_u64(answer + 1, self.revision)
            return out.write(RESULT_OK, answer, 9)
        if op == b'C' or op == b'c':
            return self.apply_cas(cmd, n, out, op == b'c')
        if op == b'p':
            if n < 13:
                return out.write(RESULT_ERROR, "malformed put", 13)
            lease = load_u64(cmd + 1)
            klen = load_u32(cmd + 9)
            if 13 + <Py_ssize_t>klen > n:
                return out.write(RESULT_ERROR, "malformed put", 13)
            if lease and self.lease_find(lease) == NULL:
                answer[0] = 0   # no such lease: nothing changed
            else:
                self.put(cmd + 13, klen, cmd + 13 + klen, n - 13 - klen, lease,
                         self.revision + 1)
                self.revision += 1
                answer[0] = 1
            store_u64(answer + 1, self.revision)
            return out.write(RESULT_OK, answer, 9)
        if op == b'T':
            return self.apply_txn(cmd, n, out)
        if op == b'L':
            if n != 9:
                return out.write(RESULT_ERROR, "malformed lease grant", 21)
            self.lease_add(self.next_lease_id, load_u64(cmd + 1))
            store_u64(answer, self.next_lease_id)
            self.next_lease_id += 1
            return out.write(RESULT_OK, answer, 8)
        if op == b'V':
            if n != 9:
                return out.write(RESULT_ERROR, "malformed lease revoke", 22)
            lease = load_u64(cmd + 1)
            if lease and self.lease_find(lease) != NULL:
                if self.revoke(lease, self.revision + 1):
                    self.revision += 1
                answer[0] = 1
            else:
                answer[0] = 0
            store_u64(answer + 1, self.revision)
            return out.write(RESULT_OK, answer, 9)
        return out.write(RESULT_ERROR, "unknown command", 15)

    cdef int apply_txn(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1:
        # Checked in full before anything is looked at, so that a malformed
        # transaction changes nothing; then the walks below need no checks.
        cdef Py_ssize_t pos = 1, at, klen, vlen
        cdef Py_ssize_t branch_at[2]
        cdef uint32_t counts[3]
        cdef uint32_t k, part
        cdef uint8_t target, cmp_op, kind
        cdef int c
        cdef bint ok = True, succeeded, changed = False
        cdef KVEntry* e
        cdef uint64_t have, want, rev, lease
        cdef Py_ssize_t result_at, ops_at
        for part in range(3):
            if pos + 4 > n:
                return out.write(RESULT_ERROR, "malformed txn", 13)
            counts[part] = load_u32(cmd + pos)
            pos += 4
            if part:
                branch_at[part - 1] = pos
            if <Py_ssize_t>counts[part] > n - pos:   # every item is > 1 byte
                return out.write(RESULT_ERROR, "malformed txn", 13)
            for k in range(counts[part]):
                if pos + (6 if part == 0 else 5) > n:
                    return out.write(RESULT_ERROR, "malformed txn", 13)
                if part == 0:
                    target = <uint8_t>cmd[pos]
                    cmp_op = <uint8_t>cmd[pos + 1]
                    klen = load_u32(cmd + pos + 2)
                    pos += 6 + klen
                    if (target >= _CMP_TARGETS or cmp_op > _OP_GT
                            or (target == _CMP_ABSENT and cmp_op != _OP_EQ) or pos > n):
                        return out.write(RESULT_ERROR, "malformed txn", 13)
                    if target == _CMP_VALUE:
                        if pos + 4 > n:
                            return out.write(RESULT_ERROR, "malformed txn", 13)
                        pos += 4 + <Py_ssize_t>load_u32(cmd + pos)
                    elif target != _CMP_ABSENT:
                        pos += 8
                else:
                    kind = <uint8_t>cmd[pos]
                    klen = load_u32(cmd + pos + 1)
                    pos += 5 + klen
                    if kind > _TXN_GET or pos > n:
                        return out.write(RESULT_ERROR, "malformed txn", 13)
                    if kind == _TXN_PUT:
                        if pos + 12 > n:
                            return out.write(RESULT_ERROR, "malformed txn", 13)
                        pos += 12 + <Py_ssize_t>load_u32(cmd + pos + 8)
                if pos > n:
                    return out.write(RESULT_ERROR, "malformed txn", 13)
        if pos != n:
            return out.write(RESULT_ERROR, "malformed txn", 13)
        # Compares.
        pos = 5
        for k in range(counts[0]):
            target = <uint8_t>cmd[pos]
            cmp_op = <uint8_t>cmd[pos + 1]
            klen = load_u32(cmd + pos + 2)
            e = self.lookup(cmd + pos + 6, klen)
            pos += 6 + klen
            if target == _CMP_ABSENT:
                ok = ok and e == NULL
                continue
            if target == _CMP_VALUE:
                vlen = load_u32(cmd + pos)
                if e == NULL:
                    ok = False   # a value compare on an absent key is false
                else:
                    c = key_cmp(e.value, e.vlen, cmd + pos + 4, vlen)
                    ok = ok and ((cmp_op == _OP_EQ and c == 0) or (cmp_op == _OP_NE and c != 0)
                                 or (cmp_op == _OP_LT and c < 0) or (cmp_op == _OP_GT and c > 0))
                pos += 4 + vlen
                continue
            want = load_u64(cmd + pos)
            pos += 8
            # An absent key's revisions and version are 0.
            if e == NULL:
                have = 0
            elif target == _CMP_MOD_REVISION:
                have = e.mod_revision
            elif target == _CMP_CREATE_REVISION:
                have = e.create_revision
            else:
                have = e.version
            ok = ok and ((cmp_op == _OP_EQ and have == want) or (cmp_op == _OP_NE and have != want)
                         or (cmp_op == _OP_LT and have < want) or (cmp_op == _OP_GT and have > want))
        succeeded = ok
        at = branch_at[0] if succeeded else branch_at[1]
        part = 1 if succeeded else 2
        # Every lease the branch puts keys under must exist, or nothing is done.
        pos = at
        for k in range(counts[part]):
            kind = <uint8_t>cmd[pos]
            klen = load_u32(cmd + pos + 1)
            pos += 5 + klen
            if kind == _TXN_PUT:
                lease = load_u64(cmd + pos)
                if lease and self.lease_find(lease) == NULL:
                    result_at = out.open_result(RESULT_OK)
                    out.append_u8(1)
                    out.append_u64(lease)
                    out.append_u64(self.revision)
                    out.close_result(result_at)
                    return 0
                pos += 12 + <Py_ssize_t>load_u32(cmd + pos + 8)
        rev = self.revision + 1
        result_at = out.open_result(RESULT_OK)
        out.append_u8(0)
        out.append_u8(succeeded)
        out.append_u64(0)   # the revision, once known
        out.append_u32(counts[part])
        pos = at
        for k in range(counts[part]):
            kind = <uint8_t>cmd[pos]
            klen = load_u32(cmd + pos + 1)
            at = pos + 5
            pos = at + klen
            out.append_u8(kind)
            ops_at = out.size
            out.append_u32(0)
            if kind == _TXN_PUT:
                lease = load_u64(cmd + pos)
                vlen = load_u32(cmd + pos + 8)
                self.put(cmd + at, klen, cmd + pos + 12, vlen, lease, rev)
                changed = True
                pos += 12 + vlen
            elif kind == _TXN_DELETE:
                c = self.remove(cmd + at, klen, rev)
                changed = changed or c
                out.append_u8(c)
            else:
                self.write_get(out, cmd + at, klen)
            store_u32(out.buf + ops_at, <uint32_t>(out.size - ops_at - 4))
        if changed:
            self.revision = rev
        store_u64(out.buf + result_at + 5 + 2, self.revision)
        out.close_result(result_at)
        return 0

    # -- queries ----------------------------------------------------------------

    cpdef bytes query(self, bytes query):
        """Answer a read-only query (docs/internals.md, "Key-value commands"); a
        malformed one raises ValueError."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(query)
        cdef Py_ssize_t slot
        cdef KVEntry* e
        cdef bytes out
        cdef ResultWriter w
        if n >= 1 and q[0] == 0x47:  # 'G'
            slot = self.find(q + 1, n - 1, self.key_hash(q + 1, n - 1))
            if slot < 0:
                return ZERO
            e = self.slots[slot].entry
            out = PyBytes_FromStringAndSize(NULL, 1 + e.vlen)
            PyBytes_AS_STRING(out)[0] = 1
            memcpy(PyBytes_AS_STRING(out) + 1, e.value, e.vlen)
            return out
        if n >= 1 and q[0] == b'g':
            w = ResultWriter()
            e = self.lookup(q + 1, n - 1)
            w.append_u8(e != NULL)
            w.append_u64(self.revision)
            if e != NULL:
                w.append_u64(e.mod_revision)
                w.append_u64(e.create_revision)
                w.append_u64(e.version)
                w.append_u64(e.lease)
                w.append(e.value, e.vlen)
            return w.take()
        if query == b"N":
            return str(self.count).encode()
        if query == b"S":
            w = ResultWriter()
            w.append_u64(self.revision)
            w.append_u64(self.compact_revision)
            w.append_u64(self.count)
            w.append_u64(self.lease_count)
            w.append_u64(self.next_lease_id)
            w.append_u64(self.history_size)
            w.append_u64(self.history_bytes)
            return w.take()
        if n >= 1 and q[0] == b'R':
            return self.query_range(query)
        if n >= 1 and q[0] == b'H':
            return self.query_history(query)
        if n >= 1 and q[0] == b'E':
            return self.query_leases(query)
        if n >= 1 and q[0] == b'K':
            return self.query_lease_keys(query)
        raise ValueError("unknown query")

    def query_range(self, bytes query):
        """A range query (`R`); see docs/internals.md."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(query)
        cdef uint64_t rev
        cdef uint32_t limit, slen, count = 0
        cdef Py_ssize_t bound, start_at, end_at, elen
        cdef bint has_end, more = False
        cdef BTNode* leaf
        cdef int pos
        cdef KVEntry* e
        cdef ResultWriter w = ResultWriter()
        if n < 22 or <uint8_t>q[17] > 1:
            raise ValueError("malformed range query")
        rev = load_u64(q + 1)
        limit = load_u32(q + 9)
        bound = _reply_bound(load_u32(q + 13))
        has_end = q[17]
        slen = load_u32(q + 18)
        start_at = 22
        end_at = start_at + slen
        if end_at > n or (not has_end and end_at != n):
            raise ValueError("malformed range query")
        elen = n - end_at
        if rev == 0:
            rev = self.revision
        w.append_u8(_QUERY_OK)
        w.append_u64(rev)
        w.append_u64(self.compact_revision)
        if rev > self.revision or rev < self.compact_revision:
            w.buf[0] = _QUERY_FUTURE_REVISION if rev > self.revision else _QUERY_COMPACTED
            store_u64(w.buf + 1, self.revision)
            w.append_u8(0)
            w.append_u32(0)
            return w.take()
        w.append_u8(0)       # more
        w.append_u32(0)      # count
        if rev < self.revision:
            return self.range_past(w, q + start_at, slen, q + end_at, elen, has_end, rev,
                                   limit, bound)
        leaf = self.tree_seek(q + start_at, slen, &pos)
        while leaf != NULL:
            if pos == leaf.count:
                leaf = leaf.next
                pos = 0
                continue
            e = leaf.entries[pos]
            if has_end and key_cmp(e.data, e.klen, q + end_at, elen) >= 0:
                break
            if not _range_item(w, e.data, e.klen, e.value, e.vlen, e.mod_revision, count,
                               limit, bound):
                more = True
                break
            count += 1
            pos += 1
        w.buf[17] = more
        store_u32(w.buf + 18, count)
        return w.take()

    cdef bytes range_past(self, ResultWriter w, const char* start, Py_ssize_t slen,
                          const char* end, Py_ssize_t elen, bint has_end, uint64_t rev,
                          uint32_t limit, Py_ssize_t bound):
        # The store as of rev: every key changed since rev in the range had, at rev,
        # the state its first change since then replaced; every other key is as now.
        cdef Py_ssize_t i, first = self.history_lower_bound(rev + 1)
        cdef Py_ssize_t mask = self.history_capacity - 1
        cdef KVChange* c
        cdef dict then = {}
        cdef list revived
        cdef Py_ssize_t ri = 0
        cdef BTNode* leaf
        cdef int pos
        cdef KVEntry* e = NULL
        cdef uint32_t count = 0
        cdef bint more = False
        cdef bytes key, value
        cdef uint64_t mod
        for i in range(first, self.history_size):
            c = self.history[(self.history_head + i) & mask]
            if not in_range(c.data, c.klen, start, slen, end, elen, has_end):
                continue
            key = PyBytes_FromStringAndSize(c.data, c.klen)
            if key not in then:
                then[key] = ((PyBytes_FromStringAndSize(c.data + c.klen + c.vlen, c.pvlen),
                              c.prev_mod_revision) if c.prev_mod_revision else None)
        # Keys present at rev, changed since: merged with the index's walk.
        revived = sorted([k for k, v in then.items() if v is not None])
        leaf = self.tree_seek(start, slen, &pos)
        while True:
            # The next key of the index in the range that did not change since rev.
            while leaf != NULL:
                if pos == leaf.count:
                    leaf = leaf.next
                    pos = 0
                    continue
                e = leaf.entries[pos]
                if has_end and key_cmp(e.data, e.klen, end, elen) >= 0:
                    leaf = NULL
                    break
                if then and PyBytes_FromStringAndSize(e.data, e.klen) in then:
                    pos += 1
                    continue
                break
            if leaf != NULL and (ri == len(revived) or key_cmp(
                    e.data, e.klen, PyBytes_AS_STRING(<bytes>revived[ri]),
                    PyBytes_GET_SIZE(<bytes>revived[ri])) < 0):
                if not _range_item(w, e.data, e.klen, e.value, e.vlen, e.mod_revision,
                                   count, limit, bound):
                    more = True
                    break
                pos += 1
            elif ri < len(revived):
                key = revived[ri]
                value, mod = then[key]
                if not _range_item(w, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                   PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), mod,
                                   count, limit, bound):
                    more = True
                    break
                ri += 1
            else:
                break
            count += 1
        w.buf[17] = more
        store_u32(w.buf + 18, count)
        return w.take()

    def query_history(self, bytes query):
        """A history query (`H`); see docs/internals.md."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(query)
        cdef uint64_t start_rev, next_rev, last_rev = 0
        cdef uint32_t skip, limit, slen, count = 0, at_last = 0, next_skip = 0
        cdef Py_ssize_t bound, start_at, end_at, elen, i, item, pvlen
        cdef Py_ssize_t mask = self.history_capacity - 1
        cdef uint8_t flags
        cdef bint has_end, with_prev, more = False
        cdef KVChange* c
        cdef ResultWriter w = ResultWriter()
        if n < 26 or <uint8_t>q[21] > 3:
            raise ValueError("malformed history query")
        start_rev = load_u64(q + 1)
        if start_rev == 0:
            start_rev = 1
        skip = load_u32(q + 9)
        limit = load_u32(q + 13)
        bound = _reply_bound(load_u32(q + 17))
        flags = <uint8_t>q[21]
        has_end = flags & 1
        with_prev = flags & 2
        slen = load_u32(q + 22)
        start_at = 26
        end_at = start_at + slen
        if end_at > n or (not has_end and end_at != n):
            raise ValueError("malformed history query")
        elen = n - end_at
        w.append_u8(_QUERY_OK)
        w.append_u64(self.revision)
        w.append_u64(self.compact_revision)
        w.append_u8(0)       # more
        w.append_u64(0)      # next revision
        w.append_u32(0)      # next skip
        w.append_u32(0)      # count
        if start_rev <= self.compact_revision:
            w.buf[0] = _QUERY_COMPACTED
            store_u64(w.buf + 18, start_rev)
            store_u32(w.buf + 26, skip)
            return w.take()
        next_rev = start_rev if start_rev > self.revision + 1 else self.revision + 1
        for i in range(self.history_lower_bound(start_rev), self.history_size):
            c = self.history[(self.history_head + i) & mask]
            if not in_range(c.data, c.klen, q + start_at, slen, q + end_at, elen, has_end):
                continue
            if c.revision != last_rev:
                last_rev = c.revision
                at_last = 0
            at_last += 1
            if c.revision == start_rev and at_last <= skip:
                continue
            pvlen = c.pvlen if with_prev else 0
            item = 29 + c.klen + c.vlen + pvlen
            if (limit and count == limit) or (count and w.size + item > bound):
                more = True
                next_rev = c.revision
                next_skip = at_last - 1
                break
            w.reserve(item)
            w.append_u64(c.revision)
            w.append_u8(c.kind)
            w.append_u64(c.prev_mod_revision)
            w.append_u32(c.klen)
            w.append_u32(c.vlen)
            # 0xffffffff: the previous value was not asked for.
            w.append_u32(c.pvlen if with_prev else 0xFFFFFFFF)
            w.append(c.data, c.klen + c.vlen)
            w.append(c.data + c.klen + c.vlen, pvlen)
            count += 1
        w.buf[17] = more
        store_u64(w.buf + 18, next_rev)
        store_u32(w.buf + 26, next_skip)
        store_u32(w.buf + 30, count)
        return w.take()

    def query_leases(self, bytes query):
        """A lease list query (`E`); see docs/internals.md."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef uint64_t start_id
        cdef Py_ssize_t bound, i, k = 0
        cdef uint64_t* ids
        cdef uint32_t count = 0
        cdef KVLease* l
        cdef ResultWriter w = ResultWriter()
        if PyBytes_GET_SIZE(query) != 13:
            raise ValueError("malformed lease list query")
        start_id = load_u64(q + 1)
        bound = _reply_bound(load_u32(q + 9))
        ids = <uint64_t*>PyMem_Malloc((self.lease_count + 1) * sizeof(uint64_t))
        if ids == NULL:
            raise MemoryError()
        try:
            for i in range(self.lease_mask + 1):
                l = self.lease_slots[i]
                if l != NULL and l.id >= start_id:
                    ids[k] = l.id
                    k += 1
            qsort(ids, k, sizeof(uint64_t), _u64_cmp)
            w.append_u8(0)
            w.append_u32(0)
            for i in range(k):
                if count and w.size + 24 > bound:
                    w.buf[0] = 1
                    break
                l = self.lease_find(ids[i])
                w.append_u64(l.id)
                w.append_u64(l.ttl_ms)
                w.append_u64(l.key_count)
                count += 1
        finally:
            PyMem_Free(ids)
        store_u32(w.buf + 1, count)
        return w.take()

    def query_lease_keys(self, bytes query):
        """A lease keys query (`K`); see docs/internals.md."""
        cdef const char* q = PyBytes_AS_STRING(query)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(query)
        cdef Py_ssize_t bound, i, k = 0, m
        cdef KVEntry** keys
        cdef KVEntry* e
        cdef uint32_t count = 0
        cdef KVLease* l
        cdef ResultWriter w = ResultWriter()
        if n < 13:
            raise ValueError("malformed lease keys query")
        l = self.lease_find(load_u64(q + 1))
        bound = _reply_bound(load_u32(q + 9))
        w.append_u8(l != NULL)
        w.append_u64(l.ttl_ms if l != NULL else 0)
        w.append_u8(0)
        w.append_u32(0)
        if l == NULL or l.key_count == 0:
            return w.take()
        m = l.key_count
        keys = <KVEntry**>PyMem_Malloc(m * sizeof(KVEntry*))
        if keys == NULL:
            raise MemoryError()
        try:
            e = l.keys
            while e != NULL:
                if key_cmp(e.data, e.klen, q + 13, n - 13) >= 0:
                    keys[k] = e
                    k += 1
                e = e.lease_next
            qsort(keys, k, sizeof(KVEntry*), _entry_cmp)
            for i in range(k):
                e = keys[i]
                if count and w.size + 4 + e.klen > bound:
                    w.buf[9] = 1
                    break
                w.append_u32(e.klen)
                w.append(e.data, e.klen)
                count += 1
        finally:
            PyMem_Free(keys)
        store_u32(w.buf + 10, count)
        return w.take()

    # -- snapshots --------------------------------------------------------------

    cpdef bytes snapshot(self):
        """The whole state, versioned (docs/internals.md, "KVStore snapshots"): keys in
        key order, leases in id order, the history window oldest first."""
        # Sized exactly from the running totals and written straight into the bytes
        # object: no pass over the entries to size it, no copy of the whole at the end
        # (a snapshot is taken every few MiB of log, so this is on the write path).
        cdef Py_ssize_t magic = PyBytes_GET_SIZE(SNAPSHOT_MAGIC)
        cdef Py_ssize_t size = (magic + 4 + 4 * 8 + self.count * 40 + self.entry_bytes
                                + 8 + self.lease_count * 16 + 8 + self.history_size * 29
                                + self.history_bytes - self.history_size * _CHANGE_OVERHEAD)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef char* p = PyBytes_AS_STRING(out)
        cdef Py_ssize_t i, k = 0, n
        cdef Py_ssize_t mask = self.history_capacity - 1
        cdef BTNode* leaf = self.root
        cdef KVEntry* e
        cdef KVChange* c
        cdef uint64_t* ids
        cdef int j
        while not leaf.leaf:
            leaf = leaf.children[0]
        memcpy(p, PyBytes_AS_STRING(SNAPSHOT_MAGIC), magic)
        p += magic
        store_u32(p, SNAPSHOT_VERSION)
        store_u64(p + 4, self.revision)
        store_u64(p + 12, self.compact_revision)
        store_u64(p + 20, self.next_lease_id)
        store_u64(p + 28, self.count)
        p += 36
        while leaf != NULL:
            for j in range(leaf.count):
                e = leaf.entries[j]
                store_u32(p, e.klen)
                store_u32(p + 4, e.vlen)
                store_u64(p + 8, e.create_revision)
                store_u64(p + 16, e.mod_revision)
                store_u64(p + 24, e.version)
                store_u64(p + 32, e.lease)
                memcpy(p + 40, e.data, e.klen)
                memcpy(p + 40 + e.klen, e.value, e.vlen)
                p += 40 + <Py_ssize_t>e.klen + e.vlen
            leaf = leaf.next
        store_u64(p, self.lease_count)
        p += 8
        ids = <uint64_t*>PyMem_Malloc((self.lease_count + 1) * sizeof(uint64_t))
        if ids == NULL:
            raise MemoryError()
        for i in range(self.lease_mask + 1):
            if self.lease_slots[i] != NULL:
                ids[k] = self.lease_slots[i].id
                k += 1
        qsort(ids, k, sizeof(uint64_t), _u64_cmp)
        for i in range(k):
            store_u64(p, ids[i])
            store_u64(p + 8, self.lease_find(ids[i]).ttl_ms)
            p += 16
        PyMem_Free(ids)
        store_u64(p, self.history_size)
        p += 8
        for i in range(self.history_size):
            c = self.history[(self.history_head + i) & mask]
            store_u64(p, c.revision)
            p[8] = <char>c.kind
            store_u64(p + 9, c.prev_mod_revision)
            store_u32(p + 17, c.klen)
            store_u32(p + 21, c.vlen)
            store_u32(p + 25, c.pvlen)
            n = <Py_ssize_t>c.klen + c.vlen + c.pvlen
            memcpy(p + 29, c.data, n)
            p += 29 + n
        if p != PyBytes_AS_STRING(out) + size:
            raise AssertionError("KVStore.snapshot: the running totals are off")
        return out

    cpdef restore(self, bytes data):
        """Replace the state with a snapshot's, of this version or of version 0 (keys
        and values only: each key is then restored as created at revision 1).  The
        snapshot is checked in full first: a bad one raises ValueError and leaves the
        state as it was."""
        if data[:len(SNAPSHOT_MAGIC)] == SNAPSHOT_MAGIC:
            self.restore_v1(data)
        else:
            self.restore_v0(data)

    cdef restore_v0(self, bytes data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0
        cdef uint32_t klen, vlen
        while pos < n:
            if pos + 8 > n:
                raise ValueError("truncated key-value snapshot")
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            if pos + 8 + <Py_ssize_t>klen + vlen > n:
                raise ValueError("truncated key-value snapshot")
            pos += 8 + klen + vlen
        self.free_all()
        self.compact_revision = _REVISION_MAX   # a restored key is no change to keep
        pos = 0
        while pos < n:
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            self.put(p + pos + 8, klen, p + pos + 8 + klen, vlen, 0, 1)
            self.revision = 1
            pos += 8 + klen + vlen
        self.compact_revision = self.revision

    cdef restore_v1(self, bytes data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = len(SNAPSHOT_MAGIC), keys_at, leases_at, history_at
        cdef uint64_t revision, compact, next_lease, count, k, lease, prev_lease = 0
        cdef uint64_t rev, prev_rev, create, mod, version
        cdef uint32_t klen, vlen, pvlen
        cdef const char* prev_key = NULL
        cdef uint32_t prev_klen = 0
        cdef dict lease_keys = {}
        cdef KVEntry* e
        cdef Py_ssize_t changes_max, bytes_max
        if n < pos + 44 or load_u32(p + pos) != SNAPSHOT_VERSION:
            raise ValueError("key-value snapshot of an unknown version")
        revision = load_u64(p + pos + 4)
        compact = load_u64(p + pos + 12)
        next_lease = load_u64(p + pos + 20)
        count = load_u64(p + pos + 28)
        pos += 36
        if compact > revision or next_lease == 0:
            raise ValueError("inconsistent key-value snapshot")
        keys_at = pos
        if count > <uint64_t>(n - pos) // 40:
            raise ValueError("truncated key-value snapshot")
        for k in range(count):
            if pos + 40 > n:
                raise ValueError("truncated key-value snapshot")
            klen = load_u32(p + pos)
            vlen = load_u32(p + pos + 4)
            create = load_u64(p + pos + 8)
            mod = load_u64(p + pos + 16)
            version = load_u64(p + pos + 24)
            lease = load_u64(p + pos + 32)
            if pos + 40 + <Py_ssize_t>klen + vlen > n:
                raise ValueError("truncated key-value snapshot")
            if (not 1 <= create <= mod <= revision or version == 0 or lease >= next_lease
                    or (k and key_cmp(prev_key, prev_klen, p + pos + 40, klen) >= 0)):
                raise ValueError("inconsistent key-value snapshot")
            if lease:
                lease_keys[lease] = lease_keys.get(lease, 0) + 1
            prev_key = p + pos + 40
            prev_klen = klen
            pos += 40 + klen + vlen
        if pos + 8 > n:
            raise ValueError("truncated key-value snapshot")
        count = load_u64(p + pos)
        pos += 8
        leases_at = pos
        if count > <uint64_t>(n - pos) // 16:
            raise ValueError("truncated key-value snapshot")
        for k in range(count):
            lease = load_u64(p + pos)
            if lease <= prev_lease or lease >= next_lease:
                raise ValueError("inconsistent key-value snapshot")
            lease_keys.pop(lease, None)
            prev_lease = lease
            pos += 16
        if lease_keys:
            raise ValueError("inconsistent key-value snapshot: a key of a missing lease")
        if pos + 8 > n:
            raise ValueError("truncated key-value snapshot")
        count = load_u64(p + pos)
        pos += 8
        history_at = pos
        prev_rev = compact + 1
        if count > <uint64_t>(n - pos) // 29:
            raise ValueError("truncated key-value snapshot")
        for k in range(count):
            if pos + 29 > n:
                raise ValueError("truncated key-value snapshot")
            rev = load_u64(p + pos)
            klen = load_u32(p + pos + 17)
            vlen = load_u32(p + pos + 21)
            pvlen = load_u32(p + pos + 25)
            if (not prev_rev <= rev <= revision or <uint8_t>p[pos + 8] > _CHANGE_DELETE
                    or load_u64(p + pos + 9) > rev
                    or (<uint8_t>p[pos + 8] == _CHANGE_DELETE and vlen)
                    or (load_u64(p + pos + 9) == 0 and pvlen)):
                raise ValueError("inconsistent key-value snapshot")
            prev_rev = rev
            pos += 29 + <Py_ssize_t>klen + vlen + pvlen
            if pos > n:
                raise ValueError("truncated key-value snapshot")
        if pos != n:
            raise ValueError("key-value snapshot has trailing bytes")
        # Checked: rebuild.
        self.free_all()
        changes_max = self.history_changes_max
        bytes_max = self.history_bytes_max
        try:
            pos = leases_at
            for k in range(<uint64_t>(history_at - 8 - leases_at) // 16):
                self.lease_add(load_u64(p + pos), load_u64(p + pos + 8))
                pos += 16
            self.compact_revision = _REVISION_MAX   # restored keys are no changes to keep
            pos = keys_at
            while pos < leases_at - 8:
                klen = load_u32(p + pos)
                vlen = load_u32(p + pos + 4)
                lease = load_u64(p + pos + 32)
                self.put(p + pos + 40, klen, p + pos + 40 + klen, vlen, lease,
                         load_u64(p + pos + 8))
                e = self.lookup(p + pos + 40, klen)
                e.mod_revision = load_u64(p + pos + 16)
                e.version = load_u64(p + pos + 24)
                pos += 40 + klen + vlen
            self.compact_revision = 0
            self.history_changes_max = PY_SSIZE_T_MAX
            self.history_bytes_max = PY_SSIZE_T_MAX
            pos = history_at
            while pos < n:
                klen = load_u32(p + pos + 17)
                vlen = load_u32(p + pos + 21)
                pvlen = load_u32(p + pos + 25)
                self.record(<uint8_t>p[pos + 8], load_u64(p + pos), p + pos + 29, klen,
                            p + pos + 29 + klen, vlen, p + pos + 29 + klen + vlen, pvlen,
                            load_u64(p + pos + 9))
                pos += 29 + <Py_ssize_t>klen + vlen + pvlen
        finally:
            self.history_changes_max = changes_max
            self.history_bytes_max = bytes_max
        self.revision = revision
        self.compact_revision = compact
        self.next_lease_id = next_lease
        # A window restored into a store with smaller bounds shrinks to them.
        self.evict()

    cpdef str state_digest(self):
        """A hash of the whole state (keys with their revisions, leases, counters and
        the history window), independent of the hash table's layout."""
        cdef uint64_t total = 0, hk, h
        cdef Py_ssize_t i
        cdef Py_ssize_t mask = self.history_capacity - 1
        cdef KVEntry* e
        cdef KVChange* c
        cdef KVLease* l
        cdef uint64_t meta[4]
        if (self.revision == 0 and self.count == 0 and self.lease_count == 0
                and self.next_lease_id == 1):
            return "0" * 16   # a new store's (as before revisions)
        for i in range(self.slots_mask + 1):
            e = self.slots[i].entry
            if e == NULL:
                continue
            meta[0] = e.create_revision
            meta[1] = e.mod_revision
            meta[2] = e.version
            meta[3] = e.lease
            hk = hash_bytes(e.data, e.klen, 0x9e3779b97f4a7c15ULL)
            hk = hash_bytes(<char*>meta, 32, hk)
            total += mix64(hk ^ hash_bytes(e.value, e.vlen, hk))
        for i in range(self.lease_mask + 1):
            l = self.lease_slots[i]
            if l != NULL:
                total += mix64(mix64(l.id ^ 0x5bd1e995) ^ l.ttl_ms)
        # The window is a sequence: folded in order.
        h = mix64(self.revision) ^ mix64(self.compact_revision + 1) ^ mix64(self.next_lease_id + 2)
        for i in range(self.history_size):
            c = self.history[(self.history_head + i) & mask]
            meta[0] = c.revision
            meta[1] = c.prev_mod_revision
            meta[2] = c.kind
            meta[3] = c.klen
            h = hash_bytes(<char*>meta, 32, h)
            h = hash_bytes(c.data, c.klen + c.vlen + c.pvlen, h)
        return "%016x" % mix64(total ^ h)

    # -- checks -----------------------------------------------------------------

    def check_invariants(self):
        """Raise AssertionError if an invariant of the table, the index, the leases or
        the history window (see the .pxd) does not hold."""
        cdef Py_ssize_t i, occupied = 0, in_tree = 0, hbytes = 0, entry_bytes = 0
        cdef Py_ssize_t mask = self.history_capacity - 1
        cdef KVEntry* e
        cdef KVEntry* prev = NULL
        cdef KVChange* c
        cdef KVLease* l
        cdef BTNode* leaf
        cdef uint64_t last_rev = 0, attached = 0, listed, k
        assert 10 * self.count <= 7 * (self.slots_mask + 1)
        for i in range(self.slots_mask + 1):
            e = self.slots[i].entry
            if e == NULL:
                continue
            occupied += 1
            entry_bytes += <Py_ssize_t>e.klen + e.vlen
            assert self.slots[i].hash == self.key_hash(e.data, e.klen)
            assert self.find(e.data, e.klen, self.slots[i].hash) == i, \
                "entry not reachable from its hash"
            assert e.vlen <= e.vcap
            if e.value == e.data + e.klen:
                assert e.vcap == e.icap
            else:
                assert e.vlen > e.icap, "a value in a buffer of its own that fits inline"
            assert 1 <= e.create_revision <= e.mod_revision <= self.revision
            assert e.version >= 1
            if e.lease:
                attached += 1
                assert self.lease_find(e.lease) != NULL, "key of a missing lease"
        assert occupied == self.count, (occupied, self.count)
        assert entry_bytes == self.entry_bytes, (entry_bytes, self.entry_bytes)
        # The index: node sizes, separators and depth, then the leaf chain.
        _check_node(self.root, self.depth, True, None, None)
        leaf = self.root
        while not leaf.leaf:
            leaf = leaf.children[0]
        while leaf != NULL:
            for i in range(leaf.count):
                e = leaf.entries[i]
                assert self.lookup(e.data, e.klen) == e, "index entry not in the table"
                assert prev == NULL or key_cmp(prev.data, prev.klen, e.data, e.klen) < 0, \
                    "index out of key order"
                prev = e
                in_tree += 1
            leaf = leaf.next
        assert in_tree == self.count, (in_tree, self.count)
        # Leases.
        listed = 0
        occupied = 0
        for i in range(self.lease_mask + 1):
            l = self.lease_slots[i]
            if l == NULL:
                continue
            occupied += 1
            assert self.lease_find(l.id) == l
            assert 1 <= l.id < self.next_lease_id
            e = l.keys
            k = 0
            while e != NULL:
                assert e.lease == l.id
                assert e.lease_next == NULL or e.lease_next.lease_prev == e
                k += 1
                e = e.lease_next
            assert k == l.key_count, "lease key count"
            listed += k
        assert occupied == self.lease_count
        assert 10 * self.lease_count <= 7 * (self.lease_mask + 1)
        assert listed == attached, "keys attached to leases"
        # History.
        assert self.compact_revision <= self.revision
        assert self.history_size <= self.history_capacity
        assert 0 <= self.arena_tail <= self.arena_capacity
        assert self.history_size <= self.history_changes_max
        for i in range(self.history_size):
            c = self.history[(self.history_head + i) & mask]
            assert self.arena <= <char*>c and (<char*>c + _arena_bytes(c.klen + c.vlen + c.pvlen)
                                               <= self.arena + self.arena_capacity), "change out of the arena"
            assert self.compact_revision < c.revision <= self.revision
            assert c.revision >= last_rev, "history out of order"
            assert c.prev_mod_revision <= c.revision   # == : a key changed twice in a txn
            assert c.kind == _CHANGE_PUT or (c.kind == _CHANGE_DELETE and c.vlen == 0)
            last_rev = c.revision
            hbytes += _CHANGE_OVERHEAD + c.klen + c.vlen + c.pvlen
        assert hbytes == self.history_bytes <= self.history_bytes_max


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
