"""rate-limiting (behavior.md 6.1): fixed calendar windows per second ... year."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core
from fastgate.plugins.rate_limit_shared import RedisConfig, check_identifier, check_store, check_sync_rate

Limit = Annotated[float, Meta(gt=0)] | None


class RateLimitingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    second: Limit = None
    minute: Limit = None
    hour: Limit = None
    day: Limit = None
    month: Limit = None
    year: Limit = None
    limit_by: Literal["consumer", "credential", "ip", "service", "header", "path"] = "consumer"
    header_name: str | None = None
    path: str | None = None
    policy: Literal["local", "cluster", "redis"] = "local"
    fault_tolerant: bool = True
    hide_client_headers: bool = False
    error_code: Annotated[int, Meta(ge=100, le=599)] = 429
    error_message: str = core.MSG_RATE_LIMITED
    sync_rate: float = -1
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)

    def __post_init__(self) -> None:
        periods = [(name, getattr(self, name)) for name, _ in core.PERIODS if getattr(self, name) is not None]
        if not periods:
            raise ValueError(
                "at least one of these fields must be non-empty: 'config.second', 'config.minute', 'config.hour', "
                "'config.day', 'config.month', 'config.year'"
            )
        # Kong's check: a longer period may not allow less than a shorter one.
        for (short, short_limit), (long, long_limit) in zip(periods, periods[1:]):
            if long_limit < short_limit:
                raise ValueError(f"The limit for {long}({long_limit:.1f}) cannot be lower than the limit for "
                                 f"{short}({short_limit:.1f})")
        check_identifier(self.limit_by, self.header_name, self.path)
        check_store("policy", self.policy, self.redis)
        if self.policy == "redis":
            check_sync_rate(self.sync_rate, -1)


class RateLimiting(core.RateLimitingHandler):
    NAME = "rate-limiting"
    PRIORITY = 910
    Config = RateLimitingConfig
    CONSUMER_SCOPED = True
