# Declarations of fastgate/_core/limiter.pyx, so that the compiled plugins call a check as C.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef struct Header:
    uint64_t magic
    uint64_t slots
    uint32_t lock

cdef struct Slot:
    uint64_t key_hash
    int64_t start
    uint64_t count
    uint64_t previous
    int64_t expiry
    uint64_t spare


cdef class SharedCounters:
    cdef object memory
    cdef unsigned char* base
    cdef Header* header
    cdef Slot* table
    cdef uint64_t nslots
    cdef uint32_t pid
    cdef public int fd
    cdef public Py_ssize_t slots

    cdef void _lock(self) noexcept nogil
    cdef void _unlock(self) noexcept nogil
    cdef Slot* _slot(self, bytes key, int64_t start, int64_t window) noexcept
    cpdef bytes decimal(self, long long value)
    cpdef double hit(self, bytes key, int64_t start, int64_t window, double limit, double weight, bint penalty)
