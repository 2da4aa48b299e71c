"""request-transformer (behavior.md 7.1): rewrite the request on its way upstream."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core
from fastgate.plugins.transformers import Names, NameValues, Renames, Template

BODY_UNSUPPORTED = "transforming the request body is not supported by fastgate yet"


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def __post_init__(self) -> None:
        if getattr(self, "body", None):
            raise ValueError(BODY_UNSUPPORTED)


class RemoveOrRename(_Body, kw_only=True):
    headers: Names = []
    querystring: Names = []
    body: Names = []


class Remove(RemoveOrRename, kw_only=True):
    pass


class Rename(_Body, kw_only=True):
    headers: Renames = []
    querystring: Renames = []
    body: Renames = []


class AddOrAppend(_Body, kw_only=True):
    headers: NameValues = []
    querystring: NameValues = []
    body: NameValues = []


class Replace(AddOrAppend, kw_only=True):
    uri: Template | None = None


class RequestTransformerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    http_method: Annotated[str, Meta(pattern="^[A-Z]+$")] | None = None
    remove: Remove = msgspec.field(default_factory=Remove)
    rename: Rename = msgspec.field(default_factory=Rename)
    replace: Replace = msgspec.field(default_factory=Replace)
    add: AddOrAppend = msgspec.field(default_factory=AddOrAppend)
    append: AddOrAppend = msgspec.field(default_factory=AddOrAppend)


class RequestTransformer(core.RequestTransformerHandler):
    NAME = "request-transformer"
    PRIORITY = 801
    Config = RequestTransformerConfig
    CONSUMER_SCOPED = True
