"""correlation-id (behavior.md 7.3): a request id header towards the upstream (and back)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core


class CorrelationIdConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header_name: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]+$")] = "Kong-Request-ID"
    generator: Literal["uuid", "uuid#counter", "tracker"] = "uuid#counter"
    echo_downstream: bool = False


class CorrelationId(core.CorrelationIdHandler):
    NAME = "correlation-id"
    PRIORITY = 100001
    Config = CorrelationIdConfig
    CONSUMER_SCOPED = True
