"""A team's own plugin in plain Python whose access phase does nothing: bench/auth.py measures
what the plugin interface costs interpreted code."""

from __future__ import annotations

import msgspec


class NoopConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Noop:
    NAME = "bench-noop"
    PRIORITY = 1000
    Config = NoopConfig

    def __init__(self, config, context):
        self.config = config

    def access(self, exchange):
        return None
