# cython: language_level=3
"""Declarations of the state machine protocol the core applies batches to."""
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from cypaxos.protocol cimport RESULT_ERROR, RESULT_OK, RESULT_RETRY, RESULT_SESSION_EXPIRED


cdef class ResultWriter:
    """A growable byte buffer of packed results (u8 status | u32 len | bytes)."""
    # Invariant: 0 <= size <= capacity; buf owns capacity bytes (or is NULL when 0).
    cdef char* buf
    cdef Py_ssize_t size
    cdef Py_ssize_t capacity

    cdef int reserve(self, Py_ssize_t extra) except -1
    cdef int write(self, uint8_t status, const char* data, Py_ssize_t n) except -1
    cdef int write_object(self, uint8_t status, bytes data) except -1
    cdef bytes take(self)
    cdef int append(self, const void* data, Py_ssize_t n) except -1
    cdef int append_u64(self, uint64_t v) except -1
    cdef int append_u32(self, uint32_t v) except -1
    cdef int append_u8(self, uint8_t v) except -1
    cdef Py_ssize_t open_result(self, uint8_t status) except -1
    cdef void close_result(self, Py_ssize_t at) noexcept


cdef class StateMachine:
    """Base of every state machine the core can apply commands to."""
    cdef int apply_command(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1
    cdef int apply_commands(self, const char* packed, uint32_t count,
                            ResultWriter out) except -1
    cpdef bytes query(self, bytes query)
    cpdef bytes snapshot(self)
    cpdef restore(self, bytes data)
    cpdef str state_digest(self)


ctypedef struct KVEntry:
    uint64_t create_revision  # the revision that created it (since it was last absent)
    uint64_t mod_revision     # the revision of its last change
    uint64_t version          # changes since it was created (1 after the create)
    uint64_t lease            # the lease it is attached to, 0 for none
    # The keys of one lease: a doubly linked list through the entries, in no
    # particular order (queries and revokes sort them by key).
    KVEntry* lease_prev
    KVEntry* lease_next
    char* value               # data + klen (room made at creation) or a separate buffer
    uint32_t klen
    uint32_t vlen
    uint32_t vcap             # bytes of room at `value` (vlen <= vcap)
    uint32_t icap             # bytes of room after the key inside the entry itself
    char data[1]              # key bytes, then icap bytes of room for the value


ctypedef struct KVSlot:
    uint64_t hash
    KVEntry* entry        # NULL: empty slot


# The ordered index: a B+tree over the entry pointers.  Leaves hold entries in key
# order and are chained; inner nodes hold children and their own copies of the
# separator keys, so deleting an entry never leaves a dangling separator.
# Invariants (checked by check_invariants()): every leaf is at the same depth; a node
# other than the root holds between _BT_MIN and _BT_FANOUT items; in an inner node,
# every key under child i is >= sep[i] (i >= 1) and < sep[i + 1].
cdef enum:
    _BT_FANOUT = 32
    _BT_MIN = 8


ctypedef struct BTNode:
    int count             # entries (leaf) or children (inner)
    int leaf
    BTNode* next          # leaves: the next leaf in key order (NULL for the last)
    # A leaf uses `entries` and `pfx`; an inner node `pfx`, `children`, `sep` and
    # `sep_len` (sep[0] unused).  One spare place each, so that a node can overflow by one before it
    # splits.
    KVEntry* entries[_BT_FANOUT + 1]
    # key_prefix() of entries[i] (leaf) or of sep[i] (inner): most comparisons of a
    # descent end there, without reading another cache line.
    uint64_t pfx[_BT_FANOUT + 1]
    BTNode* children[_BT_FANOUT + 1]
    char* sep[_BT_FANOUT + 1]
    uint32_t sep_len[_BT_FANOUT + 1]


# One change in the history window.
ctypedef struct KVChange:
    uint64_t revision
    uint64_t prev_mod_revision  # the key's mod revision before, 0 if it was absent
    uint32_t klen
    uint32_t vlen               # the new value (0 for a delete)
    uint32_t pvlen              # the value before (0 if the key was absent)
    uint8_t kind                # CHANGE_PUT or CHANGE_DELETE
    char data[1]                # key, new value, previous value


ctypedef struct KVLease:
    uint64_t id
    uint64_t ttl_ms
    uint64_t key_count
    KVEntry* keys             # head of its keys' list


cdef class KVStore(StateMachine):
    """The built-in key-value store: ordered and revisioned keys, a change history,
    transactions and leases (docs/internals.md, "Key-value commands")."""
    # A hash table of its own rather than a dict: a put then costs one probe and an
    # in-place copy, with no key or value object to create or free (about 4x less
    # time, and the store was most of a replica's CPU time under load).
    # Open addressing with linear probing over `slots` (a power of two of them).
    # Invariants (checked by check_invariants()): count == occupied slots == entries
    # in the tree; 10 * count <= 7 * (slots_mask + 1); every entry is found from its
    # slot's hash without crossing an empty slot.
    cdef KVSlot* slots
    cdef Py_ssize_t slots_mask
    cdef Py_ssize_t count
    # The keys' and values' bytes of every entry (so that a snapshot is sized without
    # a pass over the entries).  Invariant: the sum of klen + vlen over the entries.
    cdef Py_ssize_t entry_bytes
    cdef uint64_t seed
    cdef readonly uint64_t applied_commands
    # The hash of the key at hint_key (hint_klen bytes) while apply_commands applies
    # the command it is in; NULL otherwise.
    cdef const char* hint_key
    cdef Py_ssize_t hint_klen
    cdef uint64_t hint_hash
    cdef BTNode* root         # never NULL; a leaf while the store is small
    cdef int depth            # levels of inner nodes above the leaves
    # Invariants: compact_revision <= revision; every entry's mod_revision <= revision.
    cdef readonly uint64_t revision           # changes applied (one per write command)
    # Every change with a revision > compact_revision is in the history, and no other.
    cdef readonly uint64_t compact_revision
    # The history window, oldest first: a ring of history_size of history_capacity
    # places (a power of two) from history_head.  Invariants: history_size <=
    # history_changes_max; history_bytes <= history_bytes_max (CHANGE_OVERHEAD_BYTES
    # plus the key and values of every change); revisions are non-decreasing.
    cdef KVChange** history
    # The changes themselves: laid in a ring of bytes (see arena_place).  Invariant:
    # every history pointer is into it, arena_tail <= arena_capacity.
    cdef char* arena
    cdef Py_ssize_t arena_capacity
    cdef Py_ssize_t arena_tail
    cdef Py_ssize_t history_head
    cdef Py_ssize_t history_size
    cdef Py_ssize_t history_capacity
    cdef Py_ssize_t history_bytes
    cdef readonly Py_ssize_t history_changes_max
    cdef readonly Py_ssize_t history_bytes_max
    # Leases: open addressing by id over lease_slots (a power of two, at most 70%
    # full); next_lease_id is the id the next grant gets (ids are never reused).
    cdef KVLease** lease_slots
    cdef Py_ssize_t lease_mask
    cdef Py_ssize_t lease_count
    cdef readonly uint64_t next_lease_id

    cdef uint64_t key_hash(self, const char* key, Py_ssize_t klen) noexcept
    cdef const char* command_key(self, const char* cmd, Py_ssize_t n,
                                 Py_ssize_t* klen) noexcept
    cdef Py_ssize_t find(self, const char* key, Py_ssize_t klen, uint64_t h) noexcept
    cdef KVEntry* lookup(self, const char* key, Py_ssize_t klen) noexcept
    cdef int put(self, const char* key, Py_ssize_t klen, const char* value,
                 Py_ssize_t vlen, uint64_t lease, uint64_t rev) except -1
    cdef int remove(self, const char* key, Py_ssize_t klen, uint64_t rev) except -1
    cdef int set_value(self, KVEntry* e, const char* value, Py_ssize_t vlen) except -1
    cdef int grow(self) except -1
    cdef void free_all(self) noexcept
    cdef int record(self, uint8_t kind, uint64_t rev, const char* key, Py_ssize_t klen,
                    const char* value, Py_ssize_t vlen, const char* prev,
                    Py_ssize_t pvlen, uint64_t prev_mod_revision) except -1
    cdef void evict(self) noexcept
    cdef void evict_oldest(self) noexcept
    cdef char* arena_place(self, Py_ssize_t need) except NULL
    cdef Py_ssize_t history_lower_bound(self, uint64_t rev) noexcept
    cdef int tree_insert(self, KVEntry* e) except -1
    cdef int tree_remove(self, KVEntry* e) except -1
    cdef BTNode* tree_seek(self, const char* key, Py_ssize_t klen, int* pos) noexcept
    cdef KVLease* lease_find(self, uint64_t lease_id) noexcept
    cdef int lease_add(self, uint64_t lease_id, uint64_t ttl_ms) except -1
    cdef void lease_drop(self, uint64_t lease_id) noexcept
    cdef void lease_attach(self, KVEntry* e, uint64_t lease_id) noexcept
    cdef void lease_detach(self, KVEntry* e) noexcept
    cdef int apply_txn(self, const char* cmd, Py_ssize_t n, ResultWriter out) except -1
    cdef Py_ssize_t revoke(self, uint64_t lease_id, uint64_t rev) except -1
    cdef int apply_cas(self, const char* cmd, Py_ssize_t n, ResultWriter out,
                       bint with_revision) except -1
    cdef int write_get(self, ResultWriter out, const char* key, Py_ssize_t klen) except -1
    cdef bytes range_past(self, ResultWriter w, const char* start, Py_ssize_t slen,
                          const char* end, Py_ssize_t elen, bint has_end, uint64_t rev,
                          uint32_t limit, Py_ssize_t bound)
    cdef restore_v0(self, bytes data)
    cdef restore_v1(self, bytes data)


cdef class PyStateMachine(StateMachine):
    """Adapts a user class with apply/query/snapshot/restore to the core."""
    cdef object obj
    cdef object apply_method
