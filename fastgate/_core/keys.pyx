"""The API-key index: a presented key to its key-auth credential, compiled.

Results are identical to the pure reference `fastgate._core._pure.keys`, which also supplies
the error messages.

Only SHA-256 digests are kept: a plain key from the config is hashed while building, a
`sha256:<hex>` key is decoded, and no key text stays referenced. Layout, for n keys: a
directory of 2**k bucket starts (the smallest 2**k >= n, at least 2), indexed by the top k bits
of a digest's first 8 bytes, and the digests stored bucket after bucket in one C array, so a
bucket's digests are adjacent; a digest's position is also its value's position in a Python
list. A lookup hashes the key once, reads two directory words and compares the presented digest
with each digest of its bucket (0.5-1 on average, a handful at most) over all 32 bytes, without
an early exit. Per key: 32 bytes of digest, 4-8 of directory, 8 of list slot.

Prototyped on 1,000,000 keys with cold caches (200,000 random digests looked up in a C loop,
one pinned core), this beat open addressing over the same digest array (a 2n-slot table of
indices: 8-16 bytes a key, and a digest read for every occupied slot probed): ~90 vs ~115 ns a
present digest, ~75 vs ~90 an absent one.

The SHA-256 is OpenSSL's SHA256_Init/Update/Final, called directly in the libcrypto that
Python's `_hashlib` is linked against (nothing new is loaded or linked): ~55 ns for a 40-byte
key, where calling `hashlib.sha256(key).digest()` costs ~330 ns, and OpenSSL 3's one-shot
SHA256() ~320 ns (it fetches the algorithm by name on every call). A whole lookup is ~100 ns
(bench/test_bench_keys.py). Without those symbols (a Python without OpenSSL, or with libcrypto
linked in statically and hidden) the index uses hashlib; `SHA256_SOURCE` says which.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from posix.dlfcn cimport RTLD_NOW, dlopen, dlsym

import hashlib
import os

from fastgate._core._pure import keys as _ref

cdef extern from "<dlfcn.h>":
    enum:
        RTLD_NOLOAD

__all__ = ["SHA256_SOURCE", "KeyIndex"]


ctypedef struct Digest:
    uint64_t w[4]


ctypedef int (*_InitFn)(void* ctx) noexcept nogil
ctypedef int (*_UpdateFn)(void* ctx, const void* data, size_t n) noexcept nogil
ctypedef int (*_FinalFn)(unsigned char* md, void* ctx) noexcept nogil

cdef _InitFn _sha256_init = NULL
cdef _UpdateFn _sha256_update = NULL
cdef _FinalFn _sha256_final = NULL
cdef object _hashlib_sha256 = hashlib.sha256

cdef str _HEX_MESSAGE = _ref.HEX_MESSAGE
cdef str _EMPTY_MESSAGE = _ref.EMPTY_MESSAGE
cdef bytes _PREFIX = _ref.SHA256_PREFIX.encode()
cdef Py_ssize_t _PREFIX_LEN = len(_PREFIX)
cdef Digest _EMPTY_DIGEST
# Value of a lowercase hex digit, -1 for any other byte (the config loader lowercases the form).
cdef int _HEXVAL[256]


cdef inline bint _equal(const Digest* a, const Digest* b) noexcept nogil:
    # OR of XORs over all 32 bytes: the time does not depend on where two digests differ.
    return ((a.w[0] ^ b.w[0]) | (a.w[1] ^ b.w[1]) | (a.w[2] ^ b.w[2]) | (a.w[3] ^ b.w[3])) == 0


cdef int _sha256(bytes data, Digest* out) except -1:
    # OpenSSL's SHA256_CTX is 112 bytes in 1.1.1 and 3.x (it is public, in openssl/sha.h, but
    # this module is built without OpenSSL's headers); 256 leaves room for any other layout.
    cdef uint64_t ctx[32]
    cdef bytes digest
    if _sha256_init != NULL:
        _sha256_init(ctx)
        _sha256_update(ctx, PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
        _sha256_final(<unsigned char*>out, ctx)
    else:
        digest = _hashlib_sha256(data).digest()
        memcpy(out, PyBytes_AS_STRING(digest), sizeof(Digest))
    return 0


cdef bytes _digest_bytes(bytes data):
    cdef Digest digest
    _sha256(data, &digest)
    return PyBytes_FromStringAndSize(<char*>&digest, sizeof(Digest))


cdef void _bind_openssl() except *:
    global _sha256_init, _sha256_update, _sha256_final
    cdef void* handle
    cdef void* init
    cdef void* update
    cdef void* final
    try:
        import _hashlib
    except ImportError:
        return
    path = getattr(_hashlib, "__file__", None)
    if path is None:
        return
    # RTLD_NOLOAD: only a handle on the already loaded `_hashlib`. dlsym on it searches its
    # dependencies too, which is where libcrypto's symbols are.
    handle = dlopen(os.fsencode(path), RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        return
    init = dlsym(handle, b"SHA256_Init")
    update = dlsym(handle, b"SHA256_Update")
    final = dlsym(handle, b"SHA256_Final")
    if init == NULL or update == NULL or final == NULL:
        return
    _sha256_init = <_InitFn>init
    _sha256_update = <_UpdateFn>update
    _sha256_final = <_FinalFn>final
    # Another library's SHA256_* (BSD libmd in the same search order, say) must not be trusted
    # on its name alone. The inputs cover one block, a padding block and many blocks.
    for probe in (b"abc", b"x" * 56, bytes(range(256)) * 5):
        if _digest_bytes(probe) != hashlib.sha256(probe).digest():
            _sha256_init = NULL
            return


cdef void _init_tables():
    cdef int c
    cdef bytes empty = hashlib.sha256(b"").digest()
    for c in range(256):
        _HEXVAL[c] = -1
    for c in range(10):
        _HEXVAL[48 + c] = c
    for c in range(6):
        _HEXVAL[97 + c] = 10 + c
    memcpy(&_EMPTY_DIGEST, PyBytes_AS_STRING(empty), sizeof(Digest))


_init_tables()
_bind_openssl()

SHA256_SOURCE = "openssl" if _sha256_init != NULL else "hashlib"


cdef int _config_digest(object key, Py_ssize_t i, Digest* out) except -1:
    cdef bytes data
    cdef const unsigned char* s
    cdef unsigned char* o = <unsigned char*>out
    cdef Py_ssize_t n, j
    cdef int hi, lo
    if not isinstance(key, str):
        raise TypeError(f"entries[{i}]: key must be str, not {type(key).__name__}")
    data = (<str>key).encode()
    s = <const unsigned char*>PyBytes_AS_STRING(data)
    n = PyBytes_GET_SIZE(data)
    if n >= _PREFIX_LEN and memcmp(s, PyBytes_AS_STRING(_PREFIX), _PREFIX_LEN) == 0:
        if n != _PREFIX_LEN + 64:
            raise ValueError(f"entries[{i}]: {_HEX_MESSAGE}")
        s += _PREFIX_LEN
        for j in range(32):
            hi = _HEXVAL[s[2 * j]]
            lo = _HEXVAL[s[2 * j + 1]]
            if hi < 0 or lo < 0:
                raise ValueError(f"entries[{i}]: {_HEX_MESSAGE}")
            o[j] = <unsigned char>(hi * 16 + lo)
    else:
        _sha256(data, out)
    if _equal(out, &_EMPTY_DIGEST):
        raise ValueError(f"entries[{i}]: {_EMPTY_MESSAGE}")
    return 0


cdef int _raise_duplicate(const Digest* staged, Py_ssize_t j) except -1:
    cdef Py_ssize_t i
    for i in range(j):
        if _equal(&staged[i], &staged[j]):
            raise ValueError(f"entries[{j}]: same key as entries[{i}]")
    return 0


# The values list can hold a cycle back to this index (a credential's snapshot); the list's own
# clear breaks it, and keeping `values` set means a lookup during collection cannot crash.
@cython.no_gc_clear
cdef class KeyIndex:
    """Maps a presented API key to the value stored with its credential."""

    cdef Digest* digests
    cdef uint32_t* starts       # bucket b holds digests[starts[b]:starts[b + 1]]
    cdef int shift              # 64 - k: a bucket is the top k bits of a digest's first word
    cdef list values

    def __cinit__(self):
        # The empty index until __init__ runs: two empty buckets.
        self.starts = <uint32_t*>PyMem_Calloc(3, sizeof(uint32_t))
        if self.starts == NULL:
            raise MemoryError()
        self.shift = 63
        self.values = []

    def __init__(self, entries):
        cdef list items = list(entries)
        cdef Py_ssize_t n = len(items), i, j
        cdef size_t nbuckets = 2, b
        cdef int k = 1
        cdef uint32_t p
        cdef Digest* staged = NULL
        cdef Digest* digests = NULL
        cdef uint32_t* starts = NULL
        cdef uint32_t* ends = NULL
        cdef list values
        # Positions are 32-bit: 4,294,967,295 keys would need 137 GB of digests alone.
        if n > 0xFFFFFFFF:
            raise OverflowError("a KeyIndex holds at most 4294967295 keys")
        while nbuckets < <size_t>n:
            nbuckets <<= 1
            k += 1
        try:
            # Config order first: every entry is checked before any duplicate is looked for,
            # as the reference does.
            staged = <Digest*>PyMem_Malloc((n + 1) * sizeof(Digest))
            if staged == NULL:
                raise MemoryError()
            ordered = [None] * n
            for i in range(n):
                key, value = items[i]
                _config_digest(key, i, &staged[i])
                ordered[i] = value
            # A counting sort by bucket. It is stable, so a bucket lists its keys in config
            # order and the first duplicate found is the first in config order.
            starts = <uint32_t*>PyMem_Calloc(nbuckets + 1, sizeof(uint32_t))
            ends = <uint32_t*>PyMem_Malloc(nbuckets * sizeof(uint32_t))
            digests = <Digest*>PyMem_Malloc((n + 1) * sizeof(Digest))
            if starts == NULL or ends == NULL or digests == NULL:
                raise MemoryError()
            for i in range(n):
                starts[(staged[i].w[0] >> (64 - k)) + 1] += 1
            for b in range(nbuckets):
                starts[b + 1] += starts[b]
            memcpy(ends, starts, nbuckets * sizeof(uint32_t))
            values = [None] * n
            for j in range(n):
                b = staged[j].w[0] >> (64 - k)
                for p in range(starts[b], ends[b]):
                    if _equal(&digests[p], &staged[j]):
                        _raise_duplicate(staged, j)
                p = ends[b]
                ends[b] += 1
                digests[p] = staged[j]
                values[p] = ordered[j]
            PyMem_Free(self.digests)
            PyMem_Free(self.starts)
            self.digests = digests
            self.starts = starts
            digests = NULL
            starts = NULL
            self.shift = 64 - k
            self.values = values
        finally:
            PyMem_Free(staged)
            PyMem_Free(ends)
            PyMem_Free(digests)
            PyMem_Free(starts)

    def __dealloc__(self):
        PyMem_Free(self.digests)
        PyMem_Free(self.starts)

    def lookup(self, bytes key not None):
        """The value stored for `key`, or None (always for an empty key)."""
        cdef Digest digest
        cdef uint32_t p, end
        cdef Py_ssize_t found = -1
        cdef size_t b
        if PyBytes_GET_SIZE(key) == 0:
            return None
        _sha256(key, &digest)
        b = digest.w[0] >> self.shift
        p = self.starts[b]
        end = self.starts[b + 1]
        # The whole bucket is compared even after a hit, so the time does not tell where in its
        # bucket a digest sits.
        while p < end:
            if _equal(&self.digests[p], &digest):
                found = p
            p += 1
        if found < 0:
            return None
        return <object>PyList_GET_ITEM(self.values, found)

    def __len__(self):
        return len(self.values)
