"""Type stub of fastgate/_core/keys.pyx; the interface of fastgate/_core/_pure/keys.py."""

from collections.abc import Iterable
from typing import Any

__all__ = ["SHA256_SOURCE", "KeyIndex"]

# "openssl" (libcrypto called directly) or "hashlib".
SHA256_SOURCE: str

class KeyIndex:
    def __init__(self, entries: Iterable[tuple[str, Any]]) -> None: ...
    def lookup(self, key: bytes) -> Any | None: ...
    def __len__(self) -> int: ...
