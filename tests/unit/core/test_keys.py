"""The API-key index, run against both implementations.

Every test takes the `impl` fixture: `compiled` is fastgate._core.keys (an import failure is an
error, never a skip) and `pure` is the reference fastgate._core._pure.keys. The differential tests
build both from the same seeded random entries and compare every answer.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
from typing import Any

import pytest

MODULES = {"compiled": "fastgate._core.keys", "pure": "fastgate._core._pure.keys"}
HEX_ERROR = "expected 'sha256:' followed by 64 lowercase hexadecimal digits"
EMPTY_ERROR = "empty key, which never matches"


@pytest.fixture
def impl(core_module) -> Any:
    return core_module("keys")


def hashed(key: bytes) -> str:
    return "sha256:" + hashlib.sha256(key).hexdigest()


def hashed_digest(digest: bytes) -> str:
    return "sha256:" + digest.hex()


# ------------------------------------------------------------------------------------------
# Lookups


def test_plain_and_hashed_keys_match(impl):
    alice, bob = object(), object()
    index = impl.KeyIndex([("alice-key", alice), (hashed(b"bob-key"), bob)])
    assert len(index) == 2
    assert index.lookup(b"alice-key") is alice
    assert index.lookup(b"bob-key") is bob


@pytest.mark.parametrize("presented", [
    b"alice-ke", b"alice-key ", b" alice-key", b"alice-keY", b"ALICE-KEY", b"alice-kez", b"blice-key",
    b"alice-key\x00", b"bob-ke", b"bob-keyy", hashlib.sha256(b"bob-key").hexdigest().encode(),
    hashed(b"bob-key").encode(), b"unknown",
])
def test_near_misses_do_not_match(impl, presented):
    index = impl.KeyIndex([("alice-key", 1), (hashed(b"bob-key"), 2)])
    assert index.lookup(presented) is None


def test_the_empty_key_never_matches(impl):
    assert impl.KeyIndex([("k", 1)]).lookup(b"") is None
    assert impl.KeyIndex([]).lookup(b"") is None


def test_empty_index(impl):
    index = impl.KeyIndex(iter([]))
    assert len(index) == 0
    assert index.lookup(b"anything") is None


def test_keys_are_any_bytes(impl):
    raw = [b"\x00", b"\xff\xfe\x00\x01", b"nul\x00inside", bytes(range(256)), b"\x80" * 3]
    index = impl.KeyIndex([(hashed(key), i) for i, key in enumerate(raw)])
    assert [index.lookup(key) for key in raw] == list(range(len(raw)))
    assert index.lookup(b"\x00\x00") is None


def test_plain_keys_are_utf8(impl):
    index = impl.KeyIndex([("clé-🔑", 1)])
    assert index.lookup("clé-🔑".encode()) == 1
    assert index.lookup("clé-".encode("latin-1")) is None
    assert index.lookup("clé-🔑".encode("utf-16")) is None


@pytest.mark.parametrize("length", [*range(1, 130), 1000, 100_000])
def test_sha256_agrees_with_hashlib_at_every_block_boundary(impl, length):
    # SHA-256 pads in 64-byte blocks, and a key of 56-63 bytes needs a second block for its
    # length. The presented and the plain key are hashed by the index, the `sha256:` form by
    # hashlib.
    key = bytes((i * 7 + length) % 127 + 1 for i in range(length))
    index = impl.KeyIndex([(hashed(key), "hashed")])
    assert index.lookup(key) == "hashed"
    assert index.lookup(key[:-1] or b"?") is None
    with pytest.raises(ValueError, match=r"^entries\[1\]: same key as entries\[0\]$"):
        impl.KeyIndex([(hashed(key), 0), (key.decode(), 1)])


def test_the_prefix_is_lowercase_only(impl):
    # As in the config loader: `SHA256:…` is a plain key that happens to start that way.
    key = "SHA256:" + hashlib.sha256(b"k").hexdigest()
    index = impl.KeyIndex([(key, 1)])
    assert index.lookup(key.encode()) == 1
    assert index.lookup(b"k") is None


def test_values_are_any_object(impl):
    shared = {"consumer": "c1"}
    index = impl.KeyIndex([("a", shared), ("b", shared), ("c", None), ("d", 0)])
    assert index.lookup(b"a") is shared
    assert index.lookup(b"b") is shared
    assert index.lookup(b"c") is None
    assert index.lookup(b"d") == 0


def test_digests_sharing_a_prefix_stay_apart(impl):
    # Hashed keys can be written with any digest, so these neighbours of alpha's digest share its
    # first 8 or 31 bytes (its bucket); they sit before and after it and never match it.
    digest = hashlib.sha256(b"alpha").digest()
    neighbours = [
        digest[:31] + bytes([digest[31] ^ 1]),
        digest[:8] + bytes(24),
        digest[:8] + bytes(b ^ 0xFF for b in digest[8:]),
        bytes([digest[0] ^ 0x80]) + digest[1:],
    ]
    entries = [(hashed_digest(d), f"n{i}") for i, d in enumerate(neighbours[:2])]
    entries += [("alpha", "alpha")]
    entries += [(hashed_digest(d), f"n{i + 2}") for i, d in enumerate(neighbours[2:])]
    index = impl.KeyIndex(entries)
    assert len(index) == 5
    assert index.lookup(b"alpha") == "alpha"
    assert index.lookup(b"alphb") is None


@pytest.mark.parametrize("presented", ["alpha", bytearray(b"alpha"), memoryview(b"alpha"), None, 1])
def test_lookup_takes_bytes_only(impl, presented):
    index = impl.KeyIndex([("alpha", 1)])
    with pytest.raises(TypeError):
        index.lookup(presented)


def test_lookup_refuses_bytes_subclasses(impl):
    class Key(bytes):
        pass

    with pytest.raises(TypeError):
        impl.KeyIndex([("alpha", 1)]).lookup(Key(b"alpha"))


def test_rebuilding_replaces_the_keys(impl):
    index = impl.KeyIndex([("a", 1), ("b", 2)])
    index.__init__([("c", 3)])
    assert len(index) == 1
    assert [index.lookup(k) for k in (b"a", b"b", b"c")] == [None, None, 3]


# ------------------------------------------------------------------------------------------
# Building: bad entries and duplicates (messages name positions, never keys)


@pytest.mark.parametrize(("entries", "message"), [
    ([("k", 1), ("k", 2)], "entries[1]: same key as entries[0]"),
    ([("k", 1), (hashed(b"k"), 2)], "entries[1]: same key as entries[0]"),
    ([(hashed(b"k"), 1), ("x", 2), ("k", 3)], "entries[2]: same key as entries[0]"),
    ([("a", 1), ("b", 2), ("b", 3), ("a", 4)], "entries[2]: same key as entries[1]"),
    ([("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)], "entries[2]: same key as entries[0]"),
    # Every entry is checked before duplicates are looked for.
    ([("a", 1), ("a", 2), ("sha256:00", 3)], f"entries[2]: {HEX_ERROR}"),
    ([("a", 1), ("a", 2), ("", 3)], f"entries[2]: {EMPTY_ERROR}"),
])
def test_duplicates(impl, entries, message):
    with pytest.raises(ValueError) as raised:
        impl.KeyIndex(entries)
    assert str(raised.value) == message


@pytest.mark.parametrize("key", [
    "sha256:",
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63 + "g",
    "sha256: " + "0" * 63,
    "sha256:" + "0" * 63 + "٣",  # an Arabic-Indic digit three
    "sha256:" + "0" * 62 + "é",  # 64 bytes of UTF-8, 63 characters
])
def test_malformed_hashed_keys(impl, key):
    with pytest.raises(ValueError) as raised:
        impl.KeyIndex([("ok", 1), (key, 2)])
    assert str(raised.value) == f"entries[1]: {HEX_ERROR}"


@pytest.mark.parametrize("key", ["", hashed(b"")])
def test_the_empty_key_is_refused(impl, key):
    with pytest.raises(ValueError) as raised:
        impl.KeyIndex([(key, 1)])
    assert str(raised.value) == f"entries[0]: {EMPTY_ERROR}"


@pytest.mark.parametrize(("key", "name"), [(b"bytes-key", "bytes"), (None, "NoneType"), (7, "int")])
def test_keys_must_be_text(impl, key, name):
    with pytest.raises(TypeError) as raised:
        impl.KeyIndex([("ok", 1), (key, 2)])
    assert str(raised.value) == f"entries[1]: key must be str, not {name}"


@pytest.mark.parametrize("entry", [("only-key",), ("k", 1, 2)])
def test_entries_are_pairs(impl, entry):
    with pytest.raises(ValueError, match="to unpack"):
        impl.KeyIndex([entry])


def test_unencodable_keys(impl):
    with pytest.raises(UnicodeEncodeError):
        impl.KeyIndex([("\ud800", 1)])


# ------------------------------------------------------------------------------------------
# No secret kept; memory


def test_no_plain_key_is_referenced(impl):
    secrets = [f"secret-{i:04d}-key" for i in range(100)]
    index = impl.KeyIndex([(s, i) for i, s in enumerate(secrets)])
    reachable, frontier = [], [index]
    for _ in range(4):
        frontier = [r for o in frontier for r in gc.get_referents(o) if not isinstance(r, type)]
        reachable += frontier
    assert set(range(100)) <= {o for o in reachable if type(o) is int}  # the walk reached the values
    texts = [o for o in reachable if isinstance(o, (str, bytes))]
    assert not [t for t in texts if (b"secret" if isinstance(t, bytes) else "secret") in t]


# Bytes per key the index keeps, measured with tracemalloc on 100,000 keys (131,072 buckets).
# compiled: 32 digest + 5.2 directory + 8 list slot = 45.2; pure: a dict of 100,000 digest bytes
# objects, 117.
MAX_BYTES_PER_KEY = {"fastgate._core.keys": 46, "fastgate._core._pure.keys": 125}


def test_memory_per_key(impl):
    n = 100_000
    entries = [(f"sk-{i:010d}", i) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = impl.KeyIndex(entries)
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(index) == n
    assert per_key <= MAX_BYTES_PER_KEY[impl.__name__]


# ------------------------------------------------------------------------------------------
# Where the SHA-256 comes from


def _libcrypto_is_mapped() -> bool:
    import _hashlib  # noqa: F401  (loads libcrypto when Python links it as a shared library)

    with open("/proc/self/maps") as maps:
        return "/libcrypto" in maps.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_openssl_is_called_directly_when_libcrypto_is_shared(impl):
    expected = "openssl" if impl.__name__ == MODULES["compiled"] and _libcrypto_is_mapped() else "hashlib"
    assert impl.SHA256_SOURCE == expected


def test_falls_back_to_hashlib_without_openssl(impl):
    # A Python without `_hashlib` (hashlib then uses its built-in SHA-256): same answers.
    code = textwrap.dedent(f"""
        import hashlib, importlib, sys
        sys.modules["_hashlib"] = None
        keys = importlib.import_module({impl.__name__!r})
        assert keys.__file__.endswith({os.path.splitext(impl.__file__)[1]!r}), keys.__file__
        assert keys.SHA256_SOURCE == "hashlib"
        index = keys.KeyIndex([("alpha", 1), ("sha256:" + hashlib.sha256(b"beta").hexdigest(), 2)])
        print(index.lookup(b"alpha"), index.lookup(b"beta"), index.lookup(b"gamma"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "None"]


# ------------------------------------------------------------------------------------------
# Differential: compiled and pure give the same answers


def _random_keys(rng: random.Random, n: int) -> list[bytes]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~é🔑"
    keys: set[bytes] = set()
    while len(keys) < n:
        if rng.random() < 0.1:
            keys.add(rng.randbytes(rng.randint(1, 80)))
        else:
            keys.add("".join(rng.choices(alphabet, k=rng.randint(1, 64))).encode())
    return sorted(keys)


def _written(rng: random.Random, key: bytes) -> str:
    # Half the keys written plainly (when they are text), the others as `sha256:` digests.
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return hashed(key)
    return text if rng.random() < 0.5 else hashed(key)


def _near_misses(rng: random.Random, key: bytes) -> list[bytes]:
    i = rng.randrange(len(key))
    flipped = key[:i] + bytes([key[i] ^ (1 << rng.randrange(8))]) + key[i + 1:]
    return [key[:-1], key + b"x", b"x" + key, flipped, key.upper(), key[: len(key) // 2]]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 1000, 20_000])
def test_differential(n):
    rng = random.Random(20261215 + n)
    keys = _random_keys(rng, n + 200)
    present, absent = keys[:n], keys[n:]
    values = [object() for _ in present]
    entries = [(_written(rng, k), v) for k, v in zip(present, values)]
    indexes = [importlib.import_module(m).KeyIndex(entries) for m in MODULES.values()]
    expected = dict(zip(present, values))
    queries = present + absent + [b""] + [m for k in present for m in _near_misses(rng, k)]
    for query in queries:
        answers = [index.lookup(query) for index in indexes]
        assert answers[0] is answers[1] is expected.get(query), query
    assert [len(index) for index in indexes] == [n, n]


@pytest.mark.parametrize("seed", range(20))
def test_differential_errors(seed):
    # Seeded entry lists with duplicates (plain or hashed copies) and bad entries mixed in.
    rng = random.Random(seed)
    keys = _random_keys(rng, 50)
    entries: list[Any] = [(_written(rng, k), i) for i, k in enumerate(keys)]
    for _ in range(rng.randint(1, 3)):
        j = rng.randrange(len(keys))
        copy = rng.choice([keys[j].decode(errors="replace"), hashed(keys[j])])
        entries.insert(rng.randrange(len(entries) + 1), (copy, "copy"))
    if rng.random() < 0.5:
        bad = rng.choice(["", "sha256:xyz", hashed(b""), b"bytes", None])
        entries.insert(rng.randrange(len(entries) + 1), (bad, "bad"))
    outcomes = []
    for module in MODULES.values():
        try:
            index = importlib.import_module(module).KeyIndex(entries)
        except (TypeError, ValueError) as exc:
            outcomes.append((type(exc), str(exc)))
        else:
            outcomes.append([index.lookup(k) for k in keys])
    assert outcomes[0] == outcomes[1]
