"""request-transformer (behavior.md 7.1): rewrite the request on its way upstream."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core
from fastgate.plugins.transformers import Names, NameValues, Renames, Template

# Body edits apply to form, JSON and multipart bodies (buffered up to 1 MiB; larger ones are
# answered 413); any other body streams through untouched.


class RemoveOrRename(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    headers: Names = []
    querystring: Names = []
    body: Names = []


class Remove(RemoveOrRename, kw_only=True):
    pass


class Rename(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    headers: Renames = []
    querystring: Renames = []
    body: Renames = []


class AddOrAppend(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
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
