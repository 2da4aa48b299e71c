"""request-termination (behavior.md 7.2): answer with a fixed response, never proxy."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core


class RequestTerminationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status_code: Annotated[int, Meta(ge=100, le=599)] = 503
    message: str | None = None
    content_type: str | None = None
    body: str | None = None
    echo: bool = False
    trigger: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]+$")] | None = None

    def __post_init__(self) -> None:
        if self.message is not None and (self.content_type is not None or self.body is not None):
            raise ValueError("message cannot be used with content_type or body")
        if self.content_type is not None and self.body is None:
            raise ValueError("content_type requires a body")
        if self.echo and (self.content_type is not None or self.body is not None):
            raise ValueError("echo cannot be used with content_type and body")


class RequestTermination(core.RequestTerminationHandler):
    NAME = "request-termination"
    PRIORITY = 2
    Config = RequestTerminationConfig
    CONSUMER_SCOPED = True
