"""cors (behavior.md 7.4): answers preflights and adds the CORS headers to responses."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core

CorsMethod = Literal["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


def check_origin(value: str) -> str | None:
    if value == "*" or core._PLAIN_ORIGIN.fullmatch(value):
        return None
    try:
        re.compile(value)
    except re.error as exc:
        return f"'{value}' is not a valid regex: {exc}"
    return None


class CorsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    origins: list[Annotated[str, Meta(extra={"check": check_origin})]] | None = None
    headers: list[str] | None = None
    exposed_headers: list[str] | None = None
    methods: list[CorsMethod] = msgspec.field(
        default_factory=lambda: ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
    )
    max_age: Annotated[int, Meta(ge=0)] | None = None
    credentials: bool = False
    private_network: bool = False
    preflight_continue: bool = False
    allow_origin_absent: bool = True


class Cors(core.CorsHandler):
    NAME = "cors"
    PRIORITY = 2000
    Config = CorsConfig
    CONSUMER_SCOPED = False
