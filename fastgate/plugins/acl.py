"""acl (behavior.md 5): the consumer's groups decide whether it may use the route."""

from __future__ import annotations

import msgspec

from fastgate._core import plugin_core as core


class AclConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    allow: list[str] | None = None
    deny: list[str] | None = None
    hide_groups_header: bool = False
    always_use_authenticated_groups: bool = False
    # Kong Enterprise: consumer-group names count as ACL groups.
    include_consumer_groups: bool = False

    def __post_init__(self) -> None:
        if not self.allow and not self.deny:
            raise ValueError("at least one of these fields must be non-empty: 'config.allow', 'config.deny'")
        if self.allow and self.deny:
            raise ValueError("only one of these fields must be non-empty: 'config.allow', 'config.deny'")
        if not self.allow:
            self.allow = None
        if not self.deny:
            self.deny = None


class Acl(core.AclHandler):
    NAME = "acl"
    PRIORITY = 950
    Config = AclConfig
    CONSUMER_SCOPED = False
