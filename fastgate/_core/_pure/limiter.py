"""Rate-limit counters shared by every worker of a node: the pure-Python reference of
fastgate/_core/limiter.pyx (same interface, same memory layout, same results).

The counters live in one shared memory segment (a memfd the supervisor creates and every worker
maps), so the workers of a node count together: with limit L, exactly L requests pass however
many workers take them. A check and its increment are one step under the segment's lock.

Layout (native byte order): a 64-byte header (magic, slot count, lock word), then `slots`
slots of 48 bytes: key hash (FNV-1a 64 of the key, never 0), window start (ms), count in that
window, count in the window before it, expiry (ms), spare. A key's slot is found by linear
probing from its hash, at most MAX_PROBE slots; an expired slot (two windows old) is reused, and
when every probed slot is live the one expiring first is taken over, so the segment never grows
(a key evicted that way starts again from zero: size the segment for the live keys).

The reference takes the lock with flock(2) on the segment's fd (released by the kernel if its
holder dies); the compiled module spins on the header's lock word, for a check under 1 us.
"""

import fcntl
import mmap
import os
import struct

MAGIC = 0x66676C696D697431  # "fglimit1"
HEADER_BYTES = 64
SLOT_BYTES = 48
MAX_PROBE = 64
# Windows one check may count in (rate-limiting has six periods; the advanced plugin's list is
# bounded the same way by its config).
MAX_WINDOWS = 16
_HEADER = struct.Struct("=QQI")
_SLOT = struct.Struct("=QqQQq")
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF


def segment_bytes(slots):
    """The size of a segment of `slots` slots."""
    return HEADER_BYTES + slots * SLOT_BYTES


def key_hash(key):
    """FNV-1a 64 of `key`; 0 marks an empty slot, so a key hashing to 0 uses 1."""
    value = _FNV_OFFSET
    for byte in key:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK64
    return value or 1


def initialise(fd, slots):
    """Size the segment behind `fd` for `slots` slots and write its header (the supervisor does
    this once; workers only map it)."""
    os.ftruncate(fd, segment_bytes(slots))
    with mmap.mmap(fd, segment_bytes(slots)) as memory:
        _HEADER.pack_into(memory, 0, MAGIC, slots, 0)


class SharedCounters:
    """The counters of one node, mapped from the segment behind `fd`."""

    def __init__(self, fd, slots):
        if slots < 1:
            raise ValueError("a counter segment needs at least one slot")
        self.fd = fd
        self.slots = slots
        if os.fstat(fd).st_size != segment_bytes(slots):
            raise ValueError("not a counter segment of this size (initialise() it first)")
        self.memory = mmap.mmap(fd, segment_bytes(slots))
        magic, stored_slots, _ = _HEADER.unpack_from(self.memory, 0)
        if magic != MAGIC or stored_slots != slots:
            raise ValueError("not a counter segment of this size (initialise() it first)")
        # flock(2) locks belong to an open file description, and the workers inherit one
        # description of the segment: each opens its own, or they would all hold the lock at once.
        self.lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    def _slot(self, key, start, window):
        """The offset of `key`'s slot, rotated to the window starting at `start`."""
        memory = self.memory
        wanted = key_hash(key)
        first = wanted % self.slots
        free = -1
        oldest = -1
        oldest_expiry = 0
        for probe in range(min(MAX_PROBE, self.slots)):
            offset = HEADER_BYTES + ((first + probe) % self.slots) * SLOT_BYTES
            stored, slot_start, count, previous, expiry = _SLOT.unpack_from(memory, offset)
            if stored == wanted:
                # Rotate forward only: a worker whose clock read is a hair behind another's
                # counts in the newer window rather than wiping it.
                if start > slot_start:
                    # The old count is the previous window's only when the two are adjacent.
                    previous = count if slot_start == start - window else 0
                    _SLOT.pack_into(memory, offset, wanted, start, 0, previous, start + 2 * window)
                return offset
            if stored == 0:
                if free < 0:
                    free = offset
                break  # a key's probe sequence ends at the first empty slot
            if expiry <= start:
                if free < 0:
                    free = offset
            elif oldest < 0 or expiry < oldest_expiry:
                oldest, oldest_expiry = offset, expiry
        offset = free if free >= 0 else oldest
        _SLOT.pack_into(memory, offset, wanted, start, 0, 0, start + 2 * window)
        return offset

    def _lock(self):
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def _unlock(self):
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def _check_count(self, keys):
        if len(keys) > MAX_WINDOWS:
            raise ValueError(f"at most {MAX_WINDOWS} windows per check")

    def decimal(self, value):
        """`value` in decimal, as bytes (the compiled one formats it in C, for the rate-limit
        headers of every request)."""
        return b"%d" % value

    def hit(self, key, start, window, limit, weight, penalty):
        """take_sliding for one window, as a plugin with one window calls it (compiled, without
        tuples): the rate with this request, denied when over `limit`."""
        self._lock()
        try:
            offset = self._slot(key, start, window)
            stored, slot_start, count, previous, expiry = _SLOT.unpack_from(self.memory, offset)
            count += 1
            rate = count + previous * weight
            if rate > limit and not penalty:
                count -= 1
            _SLOT.pack_into(self.memory, offset, stored, slot_start, count, previous, expiry)
            return rate
        finally:
            self._unlock()

    def take_fixed(self, keys, starts, windows, limits):
        """Kong's rate-limiting (behavior.md 6.1): `usage` is each window's count before this
        request; the request is denied when a window has no room left (the first such index
        is returned, -1 when allowed) and then counts nowhere; allowed, it counts in every
        window. Returns (denied_index, usages)."""
        self._check_count(keys)
        self._lock()
        try:
            offsets = [self._slot(keys[i], starts[i], windows[i]) for i in range(len(keys))]
            usages = [_SLOT.unpack_from(self.memory, offset)[2] for offset in offsets]
            for i in range(len(keys)):
                if limits[i] - usages[i] <= 0:
                    return i, usages
            for offset in offsets:
                stored, start, count, previous, expiry = _SLOT.unpack_from(self.memory, offset)
                _SLOT.pack_into(self.memory, offset, stored, start, count + 1, previous, expiry)
            return -1, usages
        finally:
            self._unlock()

    def take_sliding(self, keys, starts, windows, limits, weights, penalty):
        """rate-limiting-advanced (behavior.md 6.2): in order, each window counts the request
        (until one denies; later ones are only read) and its rate is the count plus the previous
        window's count times `weights[i]` (0 for fixed windows); a rate over the limit denies.
        Without `penalty` (disable_penalty) a denied request's counts are taken back. Returns
        (denied_index or -1, rates)."""
        self._check_count(keys)
        self._lock()
        try:
            memory = self.memory
            denied = -1
            rates = []
            counted = []
            for i in range(len(keys)):
                offset = self._slot(keys[i], starts[i], windows[i])
                stored, start, count, previous, expiry = _SLOT.unpack_from(memory, offset)
                if denied < 0:
                    count += 1
                    _SLOT.pack_into(memory, offset, stored, start, count, previous, expiry)
                    counted.append(offset)
                rate = count + previous * weights[i]
                rates.append(rate)
                if denied < 0 and rate > limits[i]:
                    denied = i
            if denied >= 0 and not penalty:
                for offset in counted:
                    stored, start, count, previous, expiry = _SLOT.unpack_from(memory, offset)
                    _SLOT.pack_into(memory, offset, stored, start, count - 1, previous, expiry)
            return denied, rates
        finally:
            self._unlock()

    def close(self):
        self.memory.close()
        os.close(self.lock_fd)
