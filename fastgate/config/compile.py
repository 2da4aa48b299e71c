"""Config -> Snapshot: the immutable, compiled form a worker serves from.

A reload builds a new Snapshot off to the side and swaps one reference, so a request keeps
the snapshot it started with.

Plugins are resolved here, not per request: for every route, one `Slot` per plugin name that
can apply to it, in execution order (descending PRIORITY, then name), each with Kong's
precedence already decided among the instances that do not depend on the consumer; the
consumer- and consumer-group-scoped instances are kept in per-slot maps that the request
consults once it has a consumer (behavior.md 3.1).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import defaultdict

import msgspec

from fastgate import _core
from fastgate.config.model import Config, Plugin
from fastgate.plugins import PLUGINS

core = _core.plugin_core

# Kong's precedence (behavior.md 3.1, Enterprise order with consumer groups), by which of
# (consumer, consumer group, route, service) a plugin instance is scoped to: 1 wins.
LEVELS = {
    (True, False, True, True): 1,
    (False, True, True, True): 2,
    (True, False, True, False): 3,
    (True, False, False, True): 4,
    (False, True, True, False): 5,
    (False, True, False, True): 6,
    (False, False, True, True): 7,
    (True, False, False, False): 8,
    (False, True, False, False): 9,
    (False, False, True, False): 10,
    (False, False, False, True): 11,
    (False, False, False, False): 12,
}


class Snapshot(msgspec.Struct, frozen=True):
    config: Config
    router: object  # fastgate._core.Router (compiled or reference)
    # md5 of the canonical JSON of the normalised config: Kong's DB-less `configuration_hash` (32 hex).
    configuration_hash: str
    # Request headers read by name (routes and plugins), canonical: the proxy keeps only these.
    watched_headers: frozenset
    # Bit n (n < 63) set when a watched name of n bytes has a `-`, bit 63 for one of 63 bytes or
    # more: only a header name of such a length can be a `_` spelling of a watched one, so the
    # proxy rewrites `_` to `-` for those alone (a replace per header cost ~1,000 instructions).
    dashed_lengths: int
    # route id -> tuple of plugin Slots in execution order; routes without plugins are absent.
    chains: dict
    context: object  # plugin_core.PluginContext: consumers and the key index


def level(plugin: Plugin) -> int:
    return LEVELS[(plugin.consumer is not None, plugin.consumer_group is not None,
                   plugin.route is not None, plugin.service is not None)]


# The rate-limit counters every worker of this node shares (fastgate/_core/_pure/limiter.py):
# the worker maps the supervisor's segment (use_node_counters); any other process that compiles
# a snapshot (validation, tests, benchmarks) gets a segment of its own on first use.
# 12 MiB (48-byte slots) of shared memory, touched only as it fills: room for 262,144 live
# (identifier, window) pairs, so 100,000 consumers with two windows each stay under 80% full.
COUNTER_SLOTS = 262_144
_node_counters = None


def use_node_counters(counters) -> None:
    global _node_counters
    _node_counters = counters


def node_counters():
    global _node_counters
    if _node_counters is None:
        fd = os.memfd_create("fastgate-counters", os.MFD_CLOEXEC)
        _core.initialise_counters(fd, COUNTER_SLOTS)
        _node_counters = _core.SharedCounters(fd, COUNTER_SLOTS)
    return _node_counters


def build_context(config: Config) -> object:
    """Consumers as the hot path needs them, and the key index of every key-auth credential."""
    groups_by_id = {group.id: group for group in config.consumer_groups}
    acl_groups = defaultdict(list)
    for acl in config.acls:
        # One string object per group name, shared by its consumers: the acl check reads it on
        # every request, and 100,000 copies would each be a cache miss.
        acl_groups[acl.consumer].append(sys.intern(acl.group))
    memberships = defaultdict(list)
    for group_id, consumer_id in config.consumer_group_members:
        memberships[consumer_id].append(groups_by_id[group_id])
    consumers = {}
    by_username = {}
    for consumer in config.consumers:
        groups = sorted(memberships.get(consumer.id, ()), key=lambda group: group.name)
        info = core.ConsumerInfo(
            consumer.id, consumer.username, consumer.custom_id, acl_groups.get(consumer.id, ()),
            [group.id for group in groups], [group.name for group in groups],
        )
        consumers[consumer.id] = info
        if consumer.username is not None:
            by_username[consumer.username] = info
    # Kong counts a credential's ttl from its creation; a file has no creation time, so it counts
    # from the load.
    loaded_at = time.time()
    entries = [
        (credential.key, core.CredentialInfo(
            credential.id, consumers[credential.consumer],
            loaded_at + credential.ttl if credential.ttl else 0.0,
        ))
        for credential in config.keyauth_credentials
    ]
    return core.PluginContext(consumers, by_username, _core.KeyIndex(entries), node_counters())


def build_chains(config: Config, routable: list, context: object) -> tuple[dict, set]:
    """route id -> tuple of Slots; and the header names the plugins read."""
    runs = {}
    watched: set[bytes] = set()
    for plugin in config.plugins:
        if not plugin.enabled:
            continue  # Kong leaves disabled instances out: a broader enabled one applies
        plugin_class = PLUGINS[plugin.name]
        instance = plugin_class(
            plugin.config, context.scoped(plugin.id, plugin.route, plugin.service, plugin.consumer_group),
        )
        watched.update(getattr(instance, "watched_headers", ()))
        runs[plugin.id] = _core.PluginRun(plugin.name, plugin_class.PRIORITY, instance, plugin.protocols)
    enabled = [plugin for plugin in config.plugins if plugin.id in runs]

    # Instances scoped to a consumer or group alone (levels 8, 9) apply to every route: one map
    # per plugin name, shared by all the routes' slots.
    shared_consumer: dict[str, dict] = {}
    shared_group: dict[str, dict] = {}
    unscoped: list[Plugin] = []
    by_route: dict[str, list[Plugin]] = defaultdict(list)
    by_service: dict[str, list[Plugin]] = defaultdict(list)
    for plugin in enabled:
        if plugin.route is not None:
            by_route[plugin.route].append(plugin)
        elif plugin.service is not None:
            by_service[plugin.service].append(plugin)
        elif plugin.consumer is not None:
            shared_consumer.setdefault(plugin.name, {})[plugin.consumer] = (8, runs[plugin.id])
        elif plugin.consumer_group is not None:
            shared_group.setdefault(plugin.name, {})[plugin.consumer_group] = (9, runs[plugin.id])
        else:
            unscoped.append(plugin)

    chains = {}
    for route, service in routable:
        service_id = service.id if service is not None else None
        candidates = [plugin for plugin in by_route.get(route.id, ()) if plugin.service in (None, service_id)]
        if service_id is not None:
            candidates += by_service.get(service_id, ())
        candidates += unscoped
        names = set(shared_consumer) | set(shared_group) | {plugin.name for plugin in candidates}
        slots = []
        for name in names:
            static, static_level = None, 13
            # The shared maps serve as they are unless this route has its own consumer- or
            # group-scoped instances of the plugin; then a merged copy.
            by_consumer = shared_consumer.get(name)
            by_group = shared_group.get(name)
            own_consumer = own_group = False
            for plugin in candidates:
                if plugin.name != name:
                    continue
                rank, run = level(plugin), runs[plugin.id]
                if plugin.consumer is not None:
                    if not own_consumer:
                        by_consumer, own_consumer = dict(by_consumer or {}), True
                    if plugin.consumer not in by_consumer or rank < by_consumer[plugin.consumer][0]:
                        by_consumer[plugin.consumer] = (rank, run)
                elif plugin.consumer_group is not None:
                    if not own_group:
                        by_group, own_group = dict(by_group or {}), True
                    if plugin.consumer_group not in by_group or rank < by_group[plugin.consumer_group][0]:
                        by_group[plugin.consumer_group] = (rank, run)
                elif rank < static_level:
                    static, static_level = run, rank
            slots.append((-PLUGINS[name].PRIORITY, name, _core.Slot(static, static_level, by_consumer, by_group)))
        if slots:
            slots.sort(key=lambda item: item[:2])
            chains[route.id] = tuple(slot for _, _, slot in slots)
    return chains, watched


def dashed_lengths(names: frozenset) -> int:
    mask = 0
    for name in names:
        if b"-" in name:
            mask |= 1 << min(len(name), 63)
    return mask


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
    router = _core.Router(routable)
    context = build_context(config)
    chains, watched = build_chains(config, routable, context)
    watched_headers = frozenset(router.header_names) | frozenset(watched)
    return Snapshot(
        config=config,
        router=router,
        configuration_hash=hashlib.md5(canonical, usedforsecurity=False).hexdigest(),
        watched_headers=watched_headers,
        dashed_lengths=dashed_lengths(watched_headers),
        chains=chains,
        context=context,
    )
