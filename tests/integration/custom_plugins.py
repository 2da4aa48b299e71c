"""A team's own plugin, plain Python, loaded with FASTGATE_PLUGINS (tests/integration/test_plugins.py)."""

from __future__ import annotations

import asyncio

import msgspec

from fastgate._core import plugin_core


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Wait this long in the access phase (as a Redis round trip would), without a Task.
    delay_ms: int = 0
    # Answer 418 after the wait when the request has this query argument.
    refuse_arg: str | None = None
    upper_case_body: bool = False
    log_path: str | None = None
    fail_in_access: bool = False


class Audit:
    NAME = "team-audit"
    PRIORITY = 1000
    Config = AuditConfig

    def __init__(self, config, context):
        self.config = config

    def access(self, exchange):
        if self.config.fail_in_access:
            raise RuntimeError("the plugin broke")
        if self.config.delay_ms <= 0:
            return None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        refuse = self.config.refuse_arg is not None and self.config.refuse_arg.encode() in exchange.url
        result = plugin_core.Exit(418, "I'm a teapot") if refuse else None
        loop.call_later(self.config.delay_ms / 1000.0, future.set_result, result)
        return future

    def response(self, exchange, status, parts):
        parts.extend((b"X-Audit", b": ", b"seen %d" % status, b"\r\n"))

    def body(self, exchange, chunk):
        return chunk.upper() if self.config.upper_case_body else chunk

    def log(self, exchange, status):
        if self.config.log_path:
            with open(self.config.log_path, "a") as log:
                log.write(f"{exchange.method.decode()} {exchange.url.decode()} {status}\n")


class DirectoryGroupsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str = "x-directory-groups"


class DirectoryGroups:
    """Stands for an LDAP/OIDC plugin: it sets the groups a directory authenticated, as Kong's
    ldap-auth sets authenticated_groups, for acl's always_use_authenticated_groups."""

    NAME = "team-directory"
    PRIORITY = 1200  # after key-auth (1250), before acl (950)
    Config = DirectoryGroupsConfig

    def __init__(self, config, context):
        self.header = config.header.lower().encode()
        self.watched_headers = (self.header,)

    def access(self, exchange):
        values = exchange.headers.get(self.header) if exchange.headers is not None else None
        if values:
            exchange.authenticated_groups = [group.strip() for group in values[0].decode().split(",")]
        return None
