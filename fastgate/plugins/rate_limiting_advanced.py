"""rate-limiting-advanced (behavior.md 6.2): sliding or fixed windows of any size; scoped to a
consumer group, every member gets that group's limits (an AI API's tiers)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core
from fastgate.plugins.rate_limit_shared import RedisConfig, check_identifier, check_store, check_sync_rate

# One check counts in every window under one lock: the limiter takes at most 16 (limiter.py).
Windows = Annotated[list[Annotated[int, Meta(gt=0)]], Meta(min_length=1, max_length=16)]
Limits = Annotated[list[Annotated[float, Meta(gt=0)]], Meta(min_length=1, max_length=16)]


class RateLimitingAdvancedConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Limits
    window_size: Windows
    window_type: Literal["sliding", "fixed"] = "sliding"
    identifier: Literal["ip", "credential", "consumer", "service", "header", "path", "consumer-group"] = "consumer"
    header_name: str | None = None
    path: str | None = None
    strategy: Literal["local", "cluster", "redis"] = "local"
    sync_rate: float | None = None
    namespace: str | None = None
    dictionary_name: str = "kong_rate_limiting_counters"
    hide_client_headers: bool = False
    retry_after_jitter_max: Annotated[int, Meta(ge=0)] = 0
    error_code: Annotated[int, Meta(ge=100, le=599)] = 429
    error_message: str = core.MSG_RATE_LIMITED
    disable_penalty: bool = False
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)

    def __post_init__(self) -> None:
        if len(self.limit) != len(self.window_size):
            raise ValueError("You must provide the same number of windows and limits")
        check_identifier(self.identifier, self.header_name, self.path)
        check_store("strategy", self.strategy, self.redis)
        if self.strategy == "redis":
            # Kong: 0 checks in Redis on every request, -1 keeps the counters in memory only.
            if self.sync_rate is None:
                raise ValueError("sync_rate is required when strategy is 'redis'")
            check_sync_rate(self.sync_rate, 0)


class RateLimitingAdvanced(core.RateLimitingAdvancedHandler):
    NAME = "rate-limiting-advanced"
    PRIORITY = 910
    Config = RateLimitingAdvancedConfig
    CONSUMER_SCOPED = True
