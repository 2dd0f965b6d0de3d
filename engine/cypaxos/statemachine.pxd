# cython: language_level=3
"""Declarations of the state machine protocol the core applies batches to."""
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum ResultStatus:
    RESULT_OK = 0
    RESULT_ERROR = 1
    RESULT_SESSION_EXPIRED = 2
    RESULT_RETRY = 3


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
    cpdef bytes query(self, bytes query)
    cpdef bytes snapshot(self)
    cpdef restore(self, bytes data)
    cpdef str state_digest(self)


cdef class KVStore(StateMachine):
    """The built-in key-value store: put, get, delete, cas on bytes."""
    cdef dict data
    cdef readonly uint64_t applied_commands


cdef class PyStateMachine(StateMachine):
    """Adapts a user class with apply/query/snapshot/restore to the core."""
    cdef object obj
    cdef object apply_method
