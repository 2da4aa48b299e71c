"""Config pieces the two rate-limiting plugins share (behavior.md 6)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str | None = None
    port: Annotated[int, Meta(ge=0, le=65535)] = 6379
    timeout: Annotated[int, Meta(ge=0)] = 2000
    username: str | None = None
    password: str | None = None
    database: Annotated[int, Meta(ge=0)] = 0
    ssl: bool = False
    ssl_verify: bool = False
    server_name: str | None = None


def check_identifier(identifier: str, header_name: str | None, path: str | None) -> None:
    if identifier == "header" and not header_name:
        raise ValueError("No header name provided")
    if identifier == "path" and not path:
        raise ValueError("No path provided")


def check_store(field: str, value: str, redis: RedisConfig) -> None:
    """Counters live in the node's shared memory (local) or in Redis; Kong's database has no
    counterpart here."""
    if value == "cluster":
        raise ValueError(f"{field}: 'cluster' keeps counters in Kong's database and fastgate has none; "
                         f"use 'local' or 'redis'")
    if value == "redis" and not redis.host:
        raise ValueError(f"redis.host is required when {field} is 'redis'")


def check_sync_rate(sync_rate: float | None, per_request: float) -> None:
    """`per_request` (-1 for rate-limiting, 0 for rate-limiting-advanced) checks in Redis on
    every request; a positive rate syncs that often, no more than every 0.02 s (Kong)."""
    if sync_rate is not None and sync_rate != per_request and sync_rate != -1 and sync_rate < 0.02:
        memory_only = "" if per_request == -1 else ", -1 (counters in memory only)"
        raise ValueError(f"sync_rate: {per_request:g} (a check in Redis per request){memory_only} or at least 0.02 "
                         f"(seconds between syncs)")
