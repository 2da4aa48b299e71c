"""The request router: Kong 3.x `traditional_compatible` route selection, compiled.

Results are identical to the pure reference `fastgate._core._pure.router`, which also compiles
the routes (ranking, split sub-routes, predicates) for us; this module only adds the index and
the per-request code.

Index: sub-routes are kept in one list ordered by Kong priority, so a sub-route's position (its
rank) is the priority and "better" means "smaller rank". They are filed into groups by host: one
per plain host name, one per `*.suffix` and per `prefix.*` wildcard, and one for routes without
hosts. A request visits only the groups its Host selects. Inside a group, prefix paths and the
literal start of anchored regexes sit in an open-addressing table keyed by a hash of the bytes;
one pass over the request path computes the running hash and probes the table only at the prefix
lengths the group has, so 10,000 prefix routes cost a handful of probes. Each table entry lists
its candidate ranks in order, and everything else (regexes without a literal start, routes
without paths) sits in a rank-ordered list. Candidates are evaluated only while their rank beats
the best hit so far, so the first passing candidate of each list ends that list.

Measured (bench/test_bench_router.py, one pinned core, request hitting the middle route): about
0.3 µs per match for 10,000 prefix or plain-host routes (the reference: 0.5-1 ms), and 0.6 µs for
10,000 regex routes, where a Python loop calling `.match` on the same patterns takes ~450 µs.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

import re
# Private, but in every Python this project supports (3.11+); only read while building, to find
# the literal start of each path regex.
from re import _constants as _sre_constants
from re import _parser as _sre_parser

from fastgate._core._pure import router as _ref

__all__ = ["Match", "Router", "normalize_path"]

cdef bytes _HTTPS = b"https"
cdef tuple _UPGRADE_HEADERS = _ref.UPGRADE_HEADERS
cdef str _HTTPS_MESSAGE = _ref.HTTPS_MESSAGE
cdef str _NO_SERVICE_MESSAGE = _ref.NO_SERVICE_MESSAGE
cdef int _HOST_EXACT = _ref.HOST_EXACT
cdef int _HOST_SUFFIX = _ref.HOST_SUFFIX

# Byte classes, filled once at import: a reserved byte stays %-encoded when normalising; an
# escaped byte becomes %XX on the way upstream; hex value of a digit, 255 when not a hex digit.
cdef unsigned char _RESERVED[256]
cdef unsigned char _ESCAPED[256]
cdef unsigned char _HEXVAL[256]
cdef const char* _HEXDIGITS = b"0123456789ABCDEF"
cdef const unsigned char* _SLASH = <const unsigned char*>b"/"


cdef void _init_tables():
    cdef int c
    for c in range(256):
        _RESERVED[c] = c in _ref.RESERVED
        _ESCAPED[c] = c not in _ref.UNESCAPED
        _HEXVAL[c] = 255
    for c in range(10):
        _HEXVAL[48 + c] = c
    for c in range(6):
        _HEXVAL[65 + c] = 10 + c
        _HEXVAL[97 + c] = 10 + c


_init_tables()


# --------------------------------------------------------------------------------------------
# Path normalisation


cdef bytes _normalize(bytes path):
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path)
    cdef Py_ssize_t i
    cdef bint pct = False
    cdef bint dots = n > 0 and s[0] == 46  # '.'
    for i in range(n):
        if s[i] == 37:  # '%'
            pct = True
        elif s[i] == 47 and i + 1 < n and (s[i + 1] == 47 or s[i + 1] == 46):  # "//" or "/."
            dots = True
    if not pct and not dots:
        return path
    cdef unsigned char* buf = <unsigned char*>PyMem_Malloc(n + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        return _normalize_slow(s, n, buf)
    finally:
        PyMem_Free(buf)


cdef bytes _normalize_slow(const unsigned char* s, Py_ssize_t n, unsigned char* buf):
    # Decoding only shrinks the path, and dot removal writes behind its read position, so both
    # work in one buffer of the input's size.
    cdef Py_ssize_t i = 0, m = 0, o = 0, j
    cdef unsigned char hi, lo, c
    while i < n:
        c = s[i]
        if c == 37 and i + 2 < n and _HEXVAL[s[i + 1]] != 255 and _HEXVAL[s[i + 2]] != 255:
            hi = _HEXVAL[s[i + 1]]
            lo = _HEXVAL[s[i + 2]]
            c = hi * 16 + lo
            if _RESERVED[c]:
                buf[m] = 37
                buf[m + 1] = _HEXDIGITS[hi]
                buf[m + 2] = _HEXDIGITS[lo]
                m += 3
            else:
                buf[m] = c
                m += 1
            i += 3
        else:
            buf[m] = c
            m += 1
            i += 1
    # Kong's dot-segment removal; the output is a run of segments that each start with '/',
    # except maybe the first, so dropping the last segment means cutting at the last '/'.
    i = 0
    n = m
    while i < n:
        if n - i == 2 and buf[i] == 47 and buf[i + 1] == 46:  # "/." -> "/"
            i = n - 1
            buf[i] = 47
        elif n - i == 3 and buf[i] == 47 and buf[i + 1] == 46 and buf[i + 2] == 46:  # "/.."
            i = n - 1
            buf[i] = 47
            o = _pop_segment(buf, o)
        elif (n - i == 1 and buf[i] == 46) or (n - i == 2 and buf[i] == 46 and buf[i + 1] == 46):
            i = n
        elif n - i >= 3 and buf[i] == 46 and buf[i + 1] == 46 and buf[i + 2] == 47:  # "../"
            i += 3
        elif n - i >= 2 and buf[i] == 46 and buf[i + 1] == 47:  # "./"
            i += 2
        elif n - i >= 3 and buf[i] == 47 and buf[i + 1] == 46 and buf[i + 2] == 47:  # "/./"
            i += 2
        elif (n - i >= 4 and buf[i] == 47 and buf[i + 1] == 46 and buf[i + 2] == 46
              and buf[i + 3] == 47):  # "/../"
            i += 3
            o = _pop_segment(buf, o)
        elif n - i >= 2 and buf[i] == 47 and buf[i + 1] == 47:  # "//"
            i += 1
        else:
            j = i + 1
            while j < n and buf[j] != 47:
                j += 1
            while i < j:
                buf[o] = buf[i]
                o += 1
                i += 1
    return PyBytes_FromStringAndSize(<char*>buf, o)


cdef inline Py_ssize_t _pop_segment(const unsigned char* buf, Py_ssize_t o):
    while o > 0:
        o -= 1
        if buf[o] == 47:
            break
    return o


def normalize_path(bytes path not None) -> bytes:
    """Decode unreserved %XX, remove dot segments, merge `//`; `path` itself when already normal."""
    return _normalize(path)


# --------------------------------------------------------------------------------------------
# Upstream path


cdef inline Py_ssize_t _count_escapes(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i, k = 0
    for i in range(n):
        k += _ESCAPED[p[i]]
    return k


cdef inline unsigned char* _put_escaped(unsigned char* out, const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if _ESCAPED[c]:
            out[0] = 37
            out[1] = _HEXDIGITS[c >> 4]
            out[2] = _HEXDIGITS[c & 15]
            out += 3
        else:
            out[0] = c
            out += 1
    return out


cdef bytes _assemble(const unsigned char* a, Py_ssize_t an, const unsigned char* b, Py_ssize_t bn,
                     const unsigned char* c, Py_ssize_t cn, const unsigned char* q, Py_ssize_t qn):
    """Escape a + b + c (the upstream path) and append the raw query q, in one allocation.

    Unused pieces are passed with length 0 and a valid pointer (memcpy must not get NULL).
    """
    cdef Py_ssize_t extra = 2 * (_count_escapes(a, an) + _count_escapes(b, bn)
                                 + _count_escapes(c, cn))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, an + bn + cn + extra + qn)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    if extra:
        w = _put_escaped(_put_escaped(_put_escaped(w, a, an), b, bn), c, cn)
    else:
        memcpy(w, a, an)
        memcpy(w + an, b, bn)
        memcpy(w + an + bn, c, cn)
        w += an + bn + cn
    memcpy(w, q, qn)
    return out


cdef bytes _upstream_path(_Sub sub, bytes path, Py_ssize_t matched, bytes target, Py_ssize_t cut):
    """utils.lua `get_upstream_uri_v0`, escaped, plus the raw query (from `cut` in `target`).

    `matched` is the length of the matched path, -1 for a route without a path predicate.
    """
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path)
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(sub.base_path)
    cdef Py_ssize_t bn = PyBytes_GET_SIZE(sub.base_path)
    cdef const unsigned char* q = <const unsigned char*>PyBytes_AS_STRING(target)
    cdef Py_ssize_t qn = 0
    cdef const unsigned char* r
    cdef Py_ssize_t rn
    cdef bint path_slash = n > 0 and p[n - 1] == 47
    if cut >= 0:
        q += cut
        qn = PyBytes_GET_SIZE(target) - cut
    if not sub.strip_path:
        if sub.base_slash:
            if bn == 1 and qn == 0 and n > 0 and p[0] == 47 and _count_escapes(p, n) == 0:
                return path  # service path "/" without strip: the request path, unchanged
            return _assemble(base, bn, p + 1, n - 1 if n > 0 else 0, _SLASH, 0, q, qn)
        if n == 1 and p[0] == 47:
            return _assemble(base, bn, _SLASH, 0, _SLASH, 0, q, qn)
        return _assemble(base, bn, p, n, _SLASH, 0, q, qn)
    # The part after the matched prefix (after the leading '/' without a path predicate),
    # without a leading "./" or "../" (utils.lua `sanitize_uri_postfix`).
    rn = matched if matched >= 0 else (1 if n > 0 else 0)
    r = p + rn
    rn = n - rn
    if (rn == 1 and r[0] == 46) or (rn == 2 and r[0] == 46 and r[1] == 46):
        rn = 0
    elif rn >= 2 and r[0] == 46 and r[1] == 47:
        r += 2
        rn -= 2
    elif rn >= 3 and r[0] == 46 and r[1] == 46 and r[2] == 47:
        r += 3
        rn -= 3
    if sub.base_slash:
        if rn == 0:
            if bn == 1 or path_slash:
                return _assemble(base, bn, _SLASH, 0, _SLASH, 0, q, qn)
            return _assemble(base, bn - 1, _SLASH, 0, _SLASH, 0, q, qn)
        if r[0] == 47:
            return _assemble(base, bn - 1, r, rn, _SLASH, 0, q, qn)
        return _assemble(base, bn, r, rn, _SLASH, 0, q, qn)
    if rn == 0:
        if n > 1 and path_slash:
            return _assemble(base, bn, _SLASH, 1, _SLASH, 0, q, qn)
        return _assemble(base, bn, _SLASH, 0, _SLASH, 0, q, qn)
    if r[0] == 47:
        return _assemble(base, bn, r, rn, _SLASH, 0, q, qn)
    return _assemble(base, bn, _SLASH, 1, r, rn, q, qn)


# --------------------------------------------------------------------------------------------
# Match and compiled sub-routes


def _literal_prefix(pattern):
    """(bytes every match starts with, whether the pattern can only match at position 0)."""
    items = _sre_parser.parse(pattern.pattern, pattern.flags).data
    if not items or items[0] != (_sre_constants.AT, _sre_constants.AT_BEGINNING):
        return b"", False
    if pattern.flags & re.IGNORECASE:
        return b"", True
    literal = bytearray()
    for op, value in items[1:]:
        if op is not _sre_constants.LITERAL:
            break
        literal.append(value)
    return bytes(literal), True


cdef class _Sub:
    """A `SubRoute` of the reference in typed attributes, with each regex's fastest call."""

    cdef object spec
    cdef object route
    cdef object service
    cdef frozenset methods
    cdef tuple hosts
    cdef tuple matchers      # pattern.match when anchored (same result, ~20 ns less), else .search
    cdef tuple literals      # literal start of each regex, b"" when it has none
    cdef tuple patterns
    cdef tuple group_names   # per regex: ((name, group index), ...)
    cdef bint has_groups     # without groups a regex match yields no captures
    cdef bint has_names
    cdef bint anchored       # every regex can only match at position 0
    cdef tuple headers
    cdef bint has_header_regex
    cdef bint strip_path
    cdef bint preserve_host
    cdef bint base_slash
    cdef int https_redirect
    cdef bytes base_path
    cdef bytes service_host

    def __init__(self, spec):
        self.spec = spec
        self.route = spec.route
        self.service = spec.service
        self.methods = spec.methods
        self.hosts = spec.hosts
        self.headers = spec.headers
        self.has_header_regex = any(
            not isinstance(value, bytes) for _, values in spec.headers or () for value in values
        )
        self.matchers = self.literals = self.patterns = self.group_names = None
        self.has_groups = self.has_names = self.anchored = False
        if spec.regexes is not None:
            self.patterns = spec.regexes
            self.group_names = tuple(tuple(p.groupindex.items()) for p in spec.regexes)
            self.has_groups = any(p.groups for p in spec.regexes)
            self.has_names = any(p.groupindex for p in spec.regexes)
            prefixes = [_literal_prefix(pattern) for pattern in spec.regexes]
            self.literals = tuple(literal for literal, _ in prefixes)
            self.anchored = all(anchored for _, anchored in prefixes)
            self.matchers = tuple(
                pattern.match if anchored else pattern.search
                for pattern, (_, anchored) in zip(spec.regexes, prefixes)
            )
        self.strip_path = spec.strip_path
        self.preserve_host = spec.preserve_host
        self.base_path = spec.base_path
        self.base_slash = spec.base_path.endswith(b"/")
        self.https_redirect = spec.https_redirect
        self.service_host = spec.service_host


cdef bint _host_ok(tuple hosts, bytes name, long port):
    cdef const char* s = PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), vn
    cdef tuple pred
    cdef bytes value
    cdef int kind
    cdef long want_port
    cdef bint hit
    for pred in hosts:
        kind = pred[0]
        value = <bytes>pred[1]
        want_port = pred[2]
        vn = PyBytes_GET_SIZE(value)
        if kind == _HOST_EXACT:
            hit = vn == n and memcmp(s, PyBytes_AS_STRING(value), n) == 0
        elif kind == _HOST_SUFFIX:
            hit = vn <= n and memcmp(s + n - vn, PyBytes_AS_STRING(value), vn) == 0
        else:
            hit = vn <= n and memcmp(s, PyBytes_AS_STRING(value), vn) == 0
        if hit and (want_port < 0 or want_port == port):
            return True
    return False


cdef inline bytes _lower(bytes value):
    if value.isascii():
        return value.lower()
    return value.decode().lower().encode()


cdef bint _headers_ok(tuple predicates, object headers) except -1:
    cdef tuple item
    cdef list values
    cdef bint ok
    for item in predicates:
        raw = headers.get(item[0]) if headers is not None else None
        if not raw:
            return False
        values = [_lower(v) for v in raw]
        ok = False
        for wanted in <tuple>item[1]:
            if type(wanted) is bytes:
                ok = wanted in values
            else:
                for value in values:
                    if wanted.search(value) is not None:
                        ok = True
                        break
            if ok:
                break
        if not ok:
            return False
    return True


cdef inline bint _accepts(_Sub sub, bytes method, bytes host, long port, object headers) except -1:
    if sub.methods is not None and method not in sub.methods:
        return False
    if sub.hosts is not None and not _host_ok(sub.hosts, host, port):
        return False
    if sub.headers is not None and not _headers_ok(sub.headers, headers):
        return False
    return True


cdef object _regex_hit(_Sub sub, bytes path):
    for matcher in sub.matchers:
        m = matcher(path)
        if m is not None:
            return m
    return None


cdef object _build_captures(_Sub sub, object regex, object header_captures):
    """Numbered then named path groups that took part, then the header ones, as the ATC
    interpreter stores them; None unless there is more than the whole match (atc.lua)."""
    cdef dict out = {}
    cdef tuple spans
    cdef const char* path
    cdef Py_ssize_t i, start, end
    if regex is not None:
        # Decoded straight from the path by their spans: no bytes object per group.
        spans = regex.regs
        path = PyBytes_AS_STRING(<bytes>regex.string)
        for i in range(len(spans)):
            start = (<tuple>spans[i])[0]
            end = (<tuple>spans[i])[1]
            if start >= 0:
                out[i] = PyUnicode_DecodeUTF8(path + start, end - start, "surrogateescape")
        if sub.has_names:
            for i in range(len(sub.patterns)):
                if sub.patterns[i] is regex.re:
                    for name, index in <tuple>sub.group_names[i]:
                        if index in out:
                            out[name] = out[index]
                    break
    if header_captures:
        out.update(header_captures)
    return out if len(out) > 1 else None


cdef class Match:
    """The outcome of `Router.match`: what to proxy to, or which error to answer."""

    cdef readonly object route
    cdef readonly object service
    cdef readonly bytes upstream_path
    cdef readonly bytes upstream_host
    cdef readonly bytes stripped_prefix
    cdef readonly int error_status
    cdef readonly object error_message
    cdef readonly tuple error_headers
    # Captures are built on first read: most requests never read them, and the dict of decoded
    # groups is ~40% of a regex match (~400 of ~1,000 ns with one named group).
    cdef object _captures       # the value; the header captures while `_pending`
    cdef object _regex          # the path's re.Match while `_pending`
    cdef _Sub _sub
    cdef bint _pending

    @property
    def captures(self):
        if self._pending:
            self._captures = _build_captures(self._sub, self._regex, self._captures)
            self._regex = self._sub = None
            self._pending = False
        return self._captures

    def __repr__(self):
        return (
            f"<Match route={getattr(self.route, 'id', None)} upstream_path={self.upstream_path!r}"
            f" upstream_host={self.upstream_host!r} error_status={self.error_status}>"
        )


# --------------------------------------------------------------------------------------------
# Groups


ctypedef struct _Entry:
    uint64_t hash
    Py_ssize_t length
    const unsigned char* data
    int32_t start       # first candidate in _Group.cands
    int32_t count


# FNV-1a: one xor and one multiply per byte, and its running value after n bytes is the hash of
# the n-byte prefix, so one pass over the path yields the hash of every prefix length.
cdef uint64_t _FNV_OFFSET = 14695981039346656037ULL
cdef uint64_t _FNV_PRIME = 1099511628211ULL

# Matched prefixes are collected to visit the longest (usually best ranked) first; more than this
# many matched lengths in one group is legal but absurd, so they are flushed in batches.
cdef enum:
    _MAX_HITS = 32


cdef inline uint64_t _hash(const unsigned char* p, Py_ssize_t n):
    cdef uint64_t h = _FNV_OFFSET
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * _FNV_PRIME
    return h


cdef class _Group:
    """The sub-routes that one Host selects: a prefix table plus a rank-ordered rest."""

    cdef Py_ssize_t* lens       # distinct prefix lengths, ascending
    cdef Py_ssize_t nlens
    cdef int32_t* slots         # open addressing, entry index + 1, 0 = empty
    cdef uint64_t mask
    cdef _Entry* entries
    cdef int32_t* cands
    cdef int32_t* others
    cdef Py_ssize_t nothers
    cdef list keys              # the prefix bytes objects the entries point into

    def __init__(self, dict prefixes, list others):
        cdef Py_ssize_t nentries = len(prefixes), ncands = 0, i = 0, c = 0, size = 4
        cdef uint64_t slot
        cdef bytes key
        cdef _Entry* entry
        self.keys = list(prefixes)
        lengths = sorted({len(key) for key in self.keys})
        while size < 2 * nentries:
            size *= 2
        self.mask = size - 1
        for ranks in prefixes.values():
            ncands += len(ranks)
        self.lens = <Py_ssize_t*>PyMem_Malloc((len(lengths) + 1) * sizeof(Py_ssize_t))
        self.slots = <int32_t*>PyMem_Calloc(size, sizeof(int32_t))
        self.entries = <_Entry*>PyMem_Malloc((nentries + 1) * sizeof(_Entry))
        self.cands = <int32_t*>PyMem_Malloc((ncands + 1) * sizeof(int32_t))
        self.others = <int32_t*>PyMem_Malloc((len(others) + 1) * sizeof(int32_t))
        if not (self.lens and self.slots and self.entries and self.cands and self.others):
            raise MemoryError()
        self.nlens = len(lengths)
        for i in range(self.nlens):
            self.lens[i] = lengths[i]
        for i, (key, ranks) in enumerate(prefixes.items()):
            entry = &self.entries[i]
            entry.data = <const unsigned char*>PyBytes_AS_STRING(key)
            entry.length = PyBytes_GET_SIZE(key)
            entry.hash = _hash(entry.data, entry.length)
            entry.start = c
            entry.count = len(ranks)
            for rank in ranks:
                self.cands[c] = rank
                c += 1
            slot = (entry.hash ^ (entry.hash >> 32)) & self.mask
            while self.slots[slot]:
                slot = (slot + 1) & self.mask
            self.slots[slot] = i + 1
        self.nothers = len(others)
        for i in range(self.nothers):
            self.others[i] = others[i]

    def __dealloc__(self):
        PyMem_Free(self.lens)
        PyMem_Free(self.slots)
        PyMem_Free(self.entries)
        PyMem_Free(self.cands)
        PyMem_Free(self.others)

    cdef inline Py_ssize_t find(self, uint64_t h, const unsigned char* p, Py_ssize_t n):
        cdef uint64_t slot = (h ^ (h >> 32)) & self.mask
        cdef int32_t index
        cdef _Entry* entry
        while True:
            index = self.slots[slot]
            if index == 0:
                return -1
            entry = &self.entries[index - 1]
            if entry.hash == h and entry.length == n and memcmp(entry.data, p, n) == 0:
                return index - 1
            slot = (slot + 1) & self.mask


class _GroupBuilder:
    """Collects a group's sub-routes in rank order (each once), then builds the `_Group`."""

    __slots__ = ("prefixes", "others", "members")

    def __init__(self):
        self.prefixes = {}
        self.others = []
        self.members = set()

    def add(self, _Sub sub, int rank):
        if rank in self.members:
            return
        self.members.add(rank)
        spec = sub.spec
        if spec.prefixes is not None:
            keys = spec.prefixes
        elif sub.literals is not None and all(sub.literals):
            keys = sub.literals
        else:
            self.others.append(rank)
            return
        for key in dict.fromkeys(keys):
            self.prefixes.setdefault(key, []).append(rank)

    def build(self):
        return _Group(self.prefixes, self.others)


# --------------------------------------------------------------------------------------------
# Router


cdef class Router:
    """Kong `traditional_compatible` route selection over a fixed set of routes."""

    cdef readonly frozenset header_names
    cdef list _subs
    cdef Py_ssize_t _nsubs
    cdef dict _exact
    cdef dict _suffix
    cdef dict _prefix
    cdef _Group _any
    cdef bint _uses_path
    cdef bint _uses_host
    cdef bint _uses_method
    cdef tuple _header_list

    def __init__(self, routes):
        cdef _Sub sub
        specs = _ref.compile_routes(routes)
        self._subs = [_Sub(spec) for spec in specs]
        self._nsubs = len(self._subs)
        self.header_names = frozenset(name for s in specs for name, _ in s.headers or ())
        self._header_list = tuple(self.header_names)
        self._uses_path = any(s.prefixes or s.regexes for s in specs)
        self._uses_host = any(s.hosts for s in specs)
        self._uses_method = any(s.methods for s in specs)
        exact, suffix, prefix = {}, {}, {}
        anyhost = _GroupBuilder()
        for rank, sub in enumerate(self._subs):
            if sub.hosts is None:
                anyhost.add(sub, rank)
                continue
            for kind, name, _ in sub.hosts:
                if kind == _HOST_EXACT:
                    table = exact
                elif kind == _HOST_SUFFIX and name.startswith(b"."):
                    table = suffix
                elif kind != _HOST_SUFFIX and name.endswith(b"."):
                    table = prefix
                else:
                    # Not a whole-label wildcard (the config schema refuses those): no dot to
                    # look it up at, so it is tried for every Host.
                    anyhost.add(sub, rank)
                    continue
                builder = table.get(name)
                if builder is None:
                    builder = table[name] = _GroupBuilder()
                builder.add(sub, rank)
        self._exact = {name: b.build() for name, b in exact.items()}
        self._suffix = {name: b.build() for name, b in suffix.items()}
        self._prefix = {name: b.build() for name, b in prefix.items()}
        self._any = anyhost.build() if anyhost.members else None

    cdef bint _valid_utf8(self, bytes method, bytes host, bytes path, object headers) except -1:
        # ATC refuses a request whose value for a field some route uses is not UTF-8 (404).
        if self._uses_path and not _is_utf8(path):
            return False
        if self._uses_host and not _is_utf8(host):
            return False
        if self._uses_method and not _is_utf8(method):
            return False
        if headers:
            for name in self._header_list:
                for value in headers.get(name) or ():
                    if not _is_utf8(value):
                        return False
        return True

    cdef object _scan(self, _Group g, bytes path, bytes method, bytes host, long port,
                      object headers, Py_ssize_t* best, object hit):
        """Improve `best` (a rank) from group `g`; returns the hit of the best rank so far.

        A hit is the matched prefix (bytes), the regex match, or None for a route without paths.
        """
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(path)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(path)
        cdef Py_ssize_t hits[_MAX_HITS]
        cdef Py_ssize_t nhits = 0, li = 0, i = 0, length, k, c
        cdef uint64_t h = _FNV_OFFSET
        cdef Py_ssize_t entry_index
        cdef _Entry* entry
        cdef int32_t rank
        cdef _Sub sub
        while li < g.nlens:
            length = g.lens[li]
            if length > n:
                break
            while i < length:
                h = (h ^ p[i]) * _FNV_PRIME
                i += 1
            entry_index = g.find(h, p, length)
            if entry_index >= 0:
                hits[nhits] = entry_index
                nhits += 1
            li += 1
            if nhits == _MAX_HITS or li == g.nlens or (li < g.nlens and g.lens[li] > n):
                for k in range(nhits - 1, -1, -1):
                    entry = &g.entries[hits[k]]
                    for c in range(entry.start, entry.start + entry.count):
                        rank = g.cands[c]
                        if rank >= best[0]:
                            break
                        sub = <_Sub>self._subs[rank]
                        if not _accepts(sub, method, host, port, headers):
                            continue
                        if sub.matchers is None:
                            best[0] = rank
                            hit = g.keys[hits[k]]
                            break
                        m = _regex_hit(sub, path)
                        if m is not None:
                            best[0] = rank
                            hit = m
                            break
                nhits = 0
        for c in range(g.nothers):
            rank = g.others[c]
            if rank >= best[0]:
                break
            sub = <_Sub>self._subs[rank]
            if not _accepts(sub, method, host, port, headers):
                continue
            if sub.matchers is None:
                best[0] = rank
                return None
            m = _regex_hit(sub, path)
            if m is not None:
                best[0] = rank
                return m
        return hit

    def match(self, bytes method not None, bytes host not None, bytes target not None,
              object headers=None, long port=0, bytes scheme not None=b"http"):
        """The best route for this request, or None (the proxy answers 404)."""
        cdef const char* t = PyBytes_AS_STRING(target)
        cdef Py_ssize_t tn = PyBytes_GET_SIZE(target)
        cdef Py_ssize_t cut = -1
        cdef const char* q
        cdef Py_ssize_t best = self._nsubs
        cdef bytes path, name
        cdef _Group g
        # utils.lua `strip_uri_args`: the query starts at the first `?` after the first byte.
        if tn > 1:
            q = <const char*>memchr(t + 1, 63, tn - 1)
            if q != NULL:
                cut = q - t
        path = _normalize(target if cut < 0 else PyBytes_FromStringAndSize(t, cut))
        name = _host_name(host)
        if not self._valid_utf8(method, name, path, headers):
            return None
        hit = None
        if self._exact:
            g = self._exact.get(name)
            if g is not None:
                hit = self._scan(g, path, method, name, port, headers, &best, hit)
        if self._suffix or self._prefix:
            hit = self._scan_wildcards(path, method, name, port, headers, &best, hit)
        if self._any is not None:
            hit = self._scan(self._any, path, method, name, port, headers, &best, hit)
        if best == self._nsubs:
            return None
        return self._result(<_Sub>self._subs[best], hit, path, target, cut, host, name,
                            headers, scheme)

    cdef object _scan_wildcards(self, bytes path, bytes method, bytes name, long port,
                                object headers, Py_ssize_t* best, object hit):
        # `*.a.com` is stored as ".a.com" and `a.*` as "a.": both end or start at a dot of the
        # Host, so only the Host's dots need a lookup.
        cdef const char* s = PyBytes_AS_STRING(name)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i
        cdef _Group g
        for i in range(n):
            if s[i] != 46:
                continue
            if self._suffix:
                g = self._suffix.get(PyBytes_FromStringAndSize(s + i, n - i))
                if g is not None:
                    hit = self._scan(g, path, method, name, port, headers, best, hit)
            if self._prefix:
                g = self._prefix.get(PyBytes_FromStringAndSize(s, i + 1))
                if g is not None:
                    hit = self._scan(g, path, method, name, port, headers, best, hit)
        return hit

    cdef Match _result(self, _Sub sub, object hit, bytes path, bytes target, Py_ssize_t cut,
                       bytes host, bytes name, object headers, bytes scheme):
        cdef Match m = Match.__new__(Match)
        cdef Py_ssize_t matched = -1, start = 0
        m.stripped_prefix = b""
        if sub.matchers is not None:
            # An anchored regex starts at 0 and end() makes no tuple; only `~/a|/b` style
            # patterns (searched) can start later.
            if not sub.anchored:
                start = hit.start()
            matched = <Py_ssize_t>hit.end() - start
            if sub.strip_path:
                m.stripped_prefix = PyBytes_FromStringAndSize(PyBytes_AS_STRING(path) + start, matched)
            if sub.has_groups:
                m._regex = hit
                m._pending = True
        elif hit is not None:
            matched = PyBytes_GET_SIZE(<bytes>hit)
            if sub.strip_path:
                m.stripped_prefix = hit
        if sub.has_header_regex:
            # The request headers may change before captures are read: take them now.
            m._captures = _ref.match_headers(sub.spec, headers)
            m._pending = True
        if m._pending:
            m._sub = sub
        m.route = sub.route
        m.service = sub.service
        m.upstream_path = _upstream_path(sub, path, matched, target, cut)
        m.upstream_host = host if sub.preserve_host and PyBytes_GET_SIZE(host) else sub.service_host
        if sub.https_redirect and scheme != _HTTPS:
            m.error_status = sub.https_redirect
            m.error_message = _HTTPS_MESSAGE
            if sub.https_redirect == 426:
                m.error_headers = _UPGRADE_HEADERS
            else:
                # "https://" .. $host .. $request_uri; nginx's $host is lowercase, without port.
                m.error_headers = ((b"Location", b"https://" + name.lower() + target),)
        elif sub.service is None:
            m.error_status = 503
            m.error_message = _NO_SERVICE_MESSAGE
            m.error_headers = ()
        else:
            m.error_headers = ()
        return m


cdef inline bint _all_digits(const char* s, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return False
    return n > 0


cdef bytes _host_name(bytes host):
    """The Host without its `:port` (`split_host` of the reference, without the port)."""
    cdef const char* s = PyBytes_AS_STRING(host)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(host), cut
    cdef const char* at
    if n and s[0] == 91:  # '[': an IPv6 literal, its port follows "]:"
        at = <const char*>memchr(s, 93, n)
        if at == NULL or at + 1 >= s + n or at[1] != 58:
            return host
        cut = at - s + 1
    else:
        at = <const char*>memchr(s, 58, n)
        if at == NULL:
            return host
        cut = at - s
    if not _all_digits(s + cut + 1, n - cut - 1):
        return host
    return PyBytes_FromStringAndSize(s, cut)


cdef bint _is_utf8(bytes value) except -1:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    for i in range(n):
        if p[i] >= 128:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return False
            return True
    return True
