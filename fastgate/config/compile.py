"""Config -> Snapshot: the immutable, compiled form a worker serves from.

A reload builds a new Snapshot off to the side and swaps one reference, so a request keeps
the snapshot it started with.
"""

from __future__ import annotations

import hashlib

import msgspec

from fastgate import _core
from fastgate.config.model import Config


class Snapshot(msgspec.Struct, frozen=True):
    config: Config
    router: object  # fastgate._core.Router (compiled or reference)
    # md5 of the canonical JSON of the normalised config: Kong's DB-less `configuration_hash` (32 hex).
    configuration_hash: str


def compile_snapshot(config: Config) -> Snapshot:
    services = {service.id: service for service in config.services}
    routable = []
    for route in config.routes:
        service = services.get(route.service) if route.service else None
        # Kong leaves the routes of a disabled service out of the router (they answer 404).
        if service is not None and not service.enabled:
            continue
        routable.append((route, service))
    canonical = msgspec.json.encode(config, order="sorted")
    return Snapshot(
        config=config,
        router=_core.Router(routable),
        configuration_hash=hashlib.md5(canonical, usedforsecurity=False).hexdigest(),
    )
