"""Pure-Python reference of the API-key index (`fastgate._core.keys`).

This is the test oracle for the compiled index and the fallback when FASTGATE_NO_EXTENSIONS=1, so
it is written to be read. A key-auth credential's key is written in the config either plainly or
as `sha256:<64 lowercase hex digits>`, the SHA-256 of the key. Both forms become the 32-byte
digest at build time, and the index keeps only digests: no plain key stays referenced by it.
A presented key is hashed once and looked up by its digest.

Building checks every entry first (type, `sha256:` form, empty key) and then looks for
duplicates, so the first bad entry in config order is reported before any duplicate. Messages
name entries by position, never by key: configuration errors end up in logs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["SHA256_SOURCE", "KeyIndex"]

# Also used by the compiled index, so both build with the same prefix and messages.
SHA256_PREFIX = "sha256:"
# Where the lookup's SHA-256 comes from; the compiled index says "openssl" when it calls libcrypto
# directly.
SHA256_SOURCE = "hashlib"
HEX_MESSAGE = f"expected '{SHA256_PREFIX}' followed by 64 lowercase hexadecimal digits"
EMPTY_MESSAGE = "empty key, which never matches"

_HEX64 = re.compile("[0-9a-f]{64}")
_EMPTY_DIGEST = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def _config_digest(key: Any, i: int) -> bytes:
    """The SHA-256 digest of entry `i`'s key, written plainly or as `sha256:<hex>`."""
    if not isinstance(key, str):
        raise TypeError(f"entries[{i}]: key must be str, not {type(key).__name__}")
    if key.startswith(SHA256_PREFIX):
        hexdigest = key[len(SHA256_PREFIX):]
        if not _HEX64.fullmatch(hexdigest):
            raise ValueError(f"entries[{i}]: {HEX_MESSAGE}")
        digest = bytes.fromhex(hexdigest)
    else:
        digest = _sha256(key.encode()).digest()
    # Also catches the `sha256:` form of the empty key: lookup refuses an empty key.
    if digest == _EMPTY_DIGEST:
        raise ValueError(f"entries[{i}]: {EMPTY_MESSAGE}")
    return digest


class KeyIndex:
    """Maps a presented API key to the value stored with its credential."""

    __slots__ = ("_values",)

    def __init__(self, entries: Iterable[tuple[str, Any]]) -> None:
        digests: list[bytes] = []
        values: list[Any] = []
        for i, (key, value) in enumerate(entries):
            digests.append(_config_digest(key, i))
            values.append(value)
        first: dict[bytes, int] = {}
        for j, digest in enumerate(digests):
            i = first.setdefault(digest, j)
            if i != j:
                raise ValueError(f"entries[{j}]: same key as entries[{i}]")
        self._values: dict[bytes, Any] = dict(zip(digests, values))

    def lookup(self, key: bytes) -> Any | None:
        """The value stored for `key`, or None (always for an empty key)."""
        if type(key) is not bytes:
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if not key:
            return None
        # No hmac.compare_digest needed: the dict compares two digests byte by byte only when
        # their 64-bit hashes are equal, in practice only when the digests are, so the time does
        # not grow with a shared prefix the way a memcmp over near-misses would.
        return self._values.get(_sha256(key).digest())

    def __len__(self) -> int:
        return len(self._values)
