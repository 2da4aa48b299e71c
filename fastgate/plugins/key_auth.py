"""key-auth (behavior.md 4): the request must carry a known API key."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from fastgate._core import plugin_core as core

HeaderName = Annotated[str, Meta(pattern="^[A-Za-z0-9_-]+$")]


class KeyAuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key_names: Annotated[list[HeaderName], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["apikey"])
    key_in_header: bool = True
    key_in_query: bool = True
    # Form, JSON or multipart bodies, buffered up to 1 MiB (larger ones are answered 413).
    key_in_body: bool = False
    hide_credentials: bool = False
    anonymous: str | None = None
    run_on_preflight: bool = True
    realm: str | None = None


class KeyAuth(core.KeyAuthHandler):
    NAME = "key-auth"
    PRIORITY = 1250
    Config = KeyAuthConfig
    # Kong's `consumer = typedefs.no_consumer`: an auth plugin cannot depend on the consumer.
    CONSUMER_SCOPED = False
