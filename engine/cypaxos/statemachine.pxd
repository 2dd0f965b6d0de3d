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
    Py_ssize_t order      # its index in KVStore.entries
    uint32_t klen
    uint32_t vlen
    uint32_t vcap         # bytes allocated for the value (vlen <= vcap)
    char data[1]          # key bytes, then value bytes (allocated to fit)


ctypedef struct KVSlot:
    uint64_t hash
    KVEntry* entry        # NULL: empty slot


cdef class KVStore(StateMachine):
    """The built-in key-value store: put, get, delete, cas on bytes."""
    # A hash table of its own rather than a dict: a put then costs one probe and an
    # in-place copy, with no key or value object to create or free (about 4x less
    # time, and the store was most of a replica's CPU time under load).
    # Open addressing with linear probing over `slots` (a power of two of them);
    # `entries` lists the entries in insertion order (NULL where one was deleted) so
    # that snapshots list keys in the order a dict would.
    # Invariants (checked by check_invariants()): count == occupied slots == non-NULL
    # entries; 10 * count <= 7 * (slots_mask + 1); entries[e.order] == e for every
    # entry e; count <= entries_size <= entries_capacity; every entry is found from
    # its slot's hash without crossing an empty slot.
    cdef KVSlot* slots
    cdef Py_ssize_t slots_mask
    cdef KVEntry** entries
    cdef Py_ssize_t entries_size
    cdef Py_ssize_t entries_capacity
    cdef Py_ssize_t count
    cdef uint64_t seed
    cdef readonly uint64_t applied_commands

    cdef uint64_t key_hash(self, const char* key, Py_ssize_t klen) noexcept
    cdef Py_ssize_t home_slot(self, const char* cmd, Py_ssize_t n) noexcept
    cdef Py_ssize_t find(self, const char* key, Py_ssize_t klen, uint64_t h) noexcept
    cdef int put(self, const char* key, Py_ssize_t klen, const char* value,
                 Py_ssize_t vlen) except -1
    cdef bint remove(self, const char* key, Py_ssize_t klen) noexcept
    cdef int grow(self) except -1
    cdef int append_entry(self, KVEntry* e) except -1
    cdef void free_all(self) noexcept


cdef class PyStateMachine(StateMachine):
    """Adapts a user class with apply/query/snapshot/restore to the core."""
    cdef object obj
    cdef object apply_method
