"""Rate-limit counters shared by every worker of a node, compiled.

Same interface, memory layout and results as the pure reference `fastgate._core._pure.limiter`,
whose docstring describes the segment. The difference is the lock: the reference uses flock(2)
(two syscalls a check); here a check spins on the header's lock word with an atomic
compare-and-swap holding the owner's pid, so an uncontended check stays in user space. A
holder that died while holding it (a killed worker) is detected after 10 ms of spinning, by its
pid no longer existing, and the lock is taken over.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t

import mmap
import os

from fastgate._core._pure import limiter as _ref

HEADER_BYTES = _ref.HEADER_BYTES
SLOT_BYTES = _ref.SLOT_BYTES
MAX_PROBE = _ref.MAX_PROBE
MAGIC = _ref.MAGIC
MAX_WINDOWS = _ref.MAX_WINDOWS
cdef enum:
    MAX_WINDOWS_C = 16
    HEADER_BYTES_C = 64
assert MAX_WINDOWS == MAX_WINDOWS_C and HEADER_BYTES == HEADER_BYTES_C
segment_bytes = _ref.segment_bytes
initialise = _ref.initialise

cdef extern from *:
    """
    #include <sched.h>
    #include <signal.h>
    #include <errno.h>
    #include <time.h>
    static inline int fg_try_lock(uint32_t *lock, uint32_t owner) {
        uint32_t expected = 0;
        return __atomic_compare_exchange_n(lock, &expected, owner, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    static inline void fg_unlock(uint32_t *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }
    static inline uint32_t fg_owner(uint32_t *lock) { return __atomic_load_n(lock, __ATOMIC_RELAXED); }
    static inline int fg_steal(uint32_t *lock, uint32_t dead, uint32_t owner) {
        return __atomic_compare_exchange_n(lock, &dead, owner, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    static inline int fg_alive(uint32_t pid) { return kill((pid_t)pid, 0) == 0 || errno == EPERM; }
    static inline double fg_monotonic(void) {
        struct timespec now; clock_gettime(CLOCK_MONOTONIC, &now);
        return now.tv_sec + now.tv_nsec * 1e-9;
    }
    """
    int fg_try_lock(uint32_t *lock, uint32_t owner) nogil
    void fg_unlock(uint32_t *lock) nogil
    uint32_t fg_owner(uint32_t *lock) nogil
    int fg_steal(uint32_t *lock, uint32_t dead, uint32_t owner) nogil
    int fg_alive(uint32_t pid) nogil
    double fg_monotonic() nogil
    int sched_yield() nogil

# The layout is the reference's: a 64-byte header, 48-byte slots (struct "=QqQQq" + spare).
assert sizeof(Slot) == 48

# A lock held this long by a process that no longer exists is taken over.
cdef double DEAD_HOLDER_SECONDS = 0.01


cdef inline uint64_t _hash(bytes key):
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(key)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(key)
    cdef uint64_t value = 0xCBF29CE484222325ULL
    for i in range(n):
        value = (value ^ data[i]) * 0x100000001B3ULL
    return value if value != 0 else 1


@cython.final
cdef class SharedCounters:
    """The counters of one node, mapped from the segment behind `fd` (attributes and C methods:
    limiter.pxd, so the plugins call `hit` without a Python call)."""

    def __init__(self, int fd, Py_ssize_t slots):
        cdef unsigned char[::1] view
        if slots < 1:
            raise ValueError("a counter segment needs at least one slot")
        self.fd = fd
        self.slots = slots
        if os.fstat(fd).st_size != segment_bytes(slots):
            raise ValueError("not a counter segment of this size (initialise() it first)")
        self.memory = mmap.mmap(fd, segment_bytes(slots))
        view = self.memory
        self.base = &view[0]
        self.header = <Header*>self.base
        self.table = <Slot*>(self.base + HEADER_BYTES_C)
        self.nslots = slots
        if self.header.magic != MAGIC or self.header.slots != <uint64_t>slots:
            raise ValueError("not a counter segment of this size (initialise() it first)")
        self.pid = os.getpid()

    cdef void _lock(self) noexcept nogil:
        cdef int spins = 0
        cdef double since = 0.0
        cdef uint32_t holder
        while not fg_try_lock(&self.header.lock, self.pid):
            spins += 1
            if spins < 64:
                continue
            sched_yield()
            if since == 0.0:
                since = fg_monotonic()
            elif fg_monotonic() - since > DEAD_HOLDER_SECONDS:
                holder = fg_owner(&self.header.lock)
                if holder != 0 and not fg_alive(holder) and fg_steal(&self.header.lock, holder, self.pid):
                    return
                since = fg_monotonic()

    cdef void _unlock(self) noexcept nogil:
        fg_unlock(&self.header.lock)

    cdef Slot* _slot(self, bytes key, int64_t start, int64_t window) noexcept:
        cdef uint64_t wanted = _hash(key)
        cdef uint64_t first = wanted % self.nslots
        cdef uint64_t probe, probes = MAX_PROBE if <uint64_t>MAX_PROBE < self.nslots else self.nslots
        cdef Slot* slot
        cdef Slot* free = NULL
        cdef Slot* oldest = NULL
        for probe in range(probes):
            slot = &self.table[(first + probe) % self.nslots]
            if slot.key_hash == wanted:
                if start > slot.start:
                    slot.previous = slot.count if slot.start == start - window else 0
                    slot.count = 0
                    slot.start = start
                    slot.expiry = start + 2 * window
                return slot
            if slot.key_hash == 0:
                if free == NULL:
                    free = slot
                break
            if slot.expiry <= start:
                if free == NULL:
                    free = slot
            elif oldest == NULL or slot.expiry < oldest.expiry:
                oldest = slot
        slot = free if free != NULL else oldest
        slot.key_hash = wanted
        slot.start = start
        slot.count = 0
        slot.previous = 0
        slot.expiry = start + 2 * window
        return slot

    cpdef double hit(self, bytes key, int64_t start, int64_t window, double limit, double weight, bint penalty):
        """See the reference: one sliding (or, weight 0, fixed) window, the rate with this request."""
        cdef Slot* slot
        cdef double rate
        self._lock()
        slot = self._slot(key, start, window)
        slot.count += 1
        rate = <double>slot.count + <double>slot.previous * weight
        if rate > limit and not penalty:
            slot.count -= 1
        self._unlock()
        return rate

    cpdef bytes decimal(self, long long value):
        """`value` in decimal, as bytes: for the rate-limit headers of every request, where
        bytes formatting (b"%d" % value) cost ~800 instructions a number (callgrind)."""
        cdef char digits[24]
        cdef int start = 24
        cdef bint negative = value < 0
        # Negated in unsigned arithmetic: -value overflows for the smallest long long.
        cdef unsigned long long rest = (0ULL - <unsigned long long>value) if negative else <unsigned long long>value
        while True:
            start -= 1
            digits[start] = <char>(48 + rest % 10)
            rest //= 10
            if rest == 0:
                break
        if negative:
            start -= 1
            digits[start] = 45
        return PyBytes_FromStringAndSize(digits + start, 24 - start)

    def take_fixed(self, tuple keys, tuple starts, tuple windows, tuple limits):
        """See the reference: (denied_index or -1, usages before this request)."""
        cdef Py_ssize_t i, n = len(keys)
        cdef Slot* slots[MAX_WINDOWS_C]
        cdef list usages = [0] * n
        cdef Py_ssize_t denied = -1
        if n > MAX_WINDOWS:
            raise ValueError(f"at most {MAX_WINDOWS} windows per check")
        self._lock()
        try:
            for i in range(n):
                slots[i] = self._slot(<bytes?>keys[i], <int64_t>starts[i], <int64_t>windows[i])
                usages[i] = slots[i].count
            for i in range(n):
                if <double>limits[i] - <double>slots[i].count <= 0:
                    denied = i
                    break
            if denied < 0:
                for i in range(n):
                    slots[i].count += 1
        finally:
            self._unlock()
        return denied, usages

    def take_sliding(self, tuple keys, tuple starts, tuple windows, tuple limits, tuple weights, bint penalty):
        """See the reference: (denied_index or -1, rates)."""
        cdef Py_ssize_t i, n = len(keys), counted = 0
        cdef Slot* slots[MAX_WINDOWS_C]
        cdef list rates = [0.0] * n
        cdef Py_ssize_t denied = -1
        cdef double rate
        if n > MAX_WINDOWS:
            raise ValueError(f"at most {MAX_WINDOWS} windows per check")
        self._lock()
        try:
            for i in range(n):
                slots[i] = self._slot(<bytes?>keys[i], <int64_t>starts[i], <int64_t>windows[i])
                if denied < 0:
                    slots[i].count += 1
                    counted = i + 1
                rate = <double>slots[i].count + <double>slots[i].previous * <double>weights[i]
                rates[i] = rate
                if denied < 0 and rate > <double>limits[i]:
                    denied = i
            if denied >= 0 and not penalty:
                for i in range(counted):
                    slots[i].count -= 1
        finally:
            self._unlock()
        return denied, rates

    def close(self):
        self.base = NULL
        self.header = NULL
        self.table = NULL
        self.memory.close()
