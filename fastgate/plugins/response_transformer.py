"""response-transformer (behavior.md 7.1), headers only: the response head is rewritten and the
body streams through untouched (a JSON body transform would have to buffer a stream)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core
from fastgate.plugins.transformers import check_name_value, check_rename

JSON_UNSUPPORTED = "transforming the response body is not supported by fastgate (it would buffer streams)"


def _framing(name: str) -> str | None:
    if core.canonical_header(name.encode()) in core.FRAMING_HEADERS:
        return f"'{name}' is set by the proxy (message framing) and cannot be transformed"
    return None


def check_header_name(value: str) -> str | None:
    return _framing(value)


def check_header_rename(value: str) -> str | None:
    return check_rename(value) or _framing(value.partition(":")[0]) or _framing(value.partition(":")[2])


def check_header_value(value: str) -> str | None:
    return check_name_value(value) or _framing(value.partition(":")[0])


Names = list[Annotated[str, Meta(extra={"check": check_header_name})]]
Renames = list[Annotated[str, Meta(extra={"check": check_header_rename})]]
NameValues = list[Annotated[str, Meta(extra={"check": check_header_value})]]


class _Json(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    json: list[str] = []
    json_types: list[Any] = []

    def __post_init__(self) -> None:
        if self.json or self.json_types:
            raise ValueError(JSON_UNSUPPORTED)


class Remove(_Json, kw_only=True):
    headers: Names = []


class Rename(_Json, kw_only=True):
    headers: Renames = []


class Change(_Json, kw_only=True):
    headers: NameValues = []


class ResponseTransformerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    remove: Remove = msgspec.field(default_factory=Remove)
    rename: Rename = msgspec.field(default_factory=Rename)
    replace: Change = msgspec.field(default_factory=Change)
    add: Change = msgspec.field(default_factory=Change)
    append: Change = msgspec.field(default_factory=Change)


class ResponseTransformer(core.ResponseTransformerHandler):
    NAME = "response-transformer"
    PRIORITY = 800
    Config = ResponseTransformerConfig
    CONSUMER_SCOPED = True
