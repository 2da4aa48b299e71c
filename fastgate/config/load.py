"""Load a Kong 3.x declarative configuration into fastgate's normalised `Config`.

Three steps, each reporting every problem it finds, with its path:

1. parse YAML or JSON (a repeated mapping key is an error, not a silent overwrite);
2. walk the document with the entry types of `fastgate.config.model` (`_Decoder`): types,
   constraints and value checks, unknown and unsupported keys, required fields;
3. normalise (`_Normaliser`): expand the `url` shorthand, give ids, flatten nesting, resolve
   references, and check what spans fields or entities (uniqueness, references, plugins).

A configuration with any problem is refused whole (`ConfigError`), so that a running gateway
keeps its current configuration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml

from fastgate.config.model import (
    KEY_SHA256_PREFIX,
    SUPPORTED_PROTOCOLS,
    Acl,
    AclEntry,
    Config,
    Consumer,
    ConsumerEntry,
    ConsumerGroup,
    ConsumerGroupEntry,
    Document,
    GroupReference,
    KeyAuthCredential,
    KeyAuthCredentialEntry,
    Normalised,
    Plugin,
    PluginEntry,
    Route,
    RouteEntry,
    Service,
    ServiceEntry,
    check_port_text,
    check_protocol,
    check_service_host,
    check_service_path,
    split_host_port,
)
from fastgate.plugins import KONG_PLUGIN_NAMES, PLUGINS

__all__ = ["ConfigError", "Problem", "entity_id", "load_config", "parse_config"]

# Generated ids are UUIDv5 in this namespace. Never change it: every generated id would change.
ID_NAMESPACE = uuid.UUID("80ec0656-d0e7-459d-81c3-f6fe537f3b48")

# A plugin's scope fields and the entities they reference.
_PLUGIN_SCOPES = {
    "route": "routes", "service": "services", "consumer": "consumers", "consumer_group": "consumer_groups",
}
_ROUTE_MATCHERS = ("methods", "hosts", "headers", "paths")


class Problem(msgspec.Struct, frozen=True):
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """A refused configuration: `problems` holds every reason, `str()` has one line each."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def read_source(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a config file; ConfigError (path = the file name) when it cannot be read."""
    name = os.fspath(path)
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(name, f"cannot read the file: {exc.strerror or exc}")]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    return parse_config(read_source(path), source=os.fspath(path))


def parse_config(data: bytes | str, source: str = "<config>") -> Config:
    """YAML or JSON text -> the normalised Config. Problems with the text as a whole (syntax,
    encoding) have `source` as their path."""
    document = _parse(data, source)
    if not isinstance(document, dict):
        message = "the configuration is empty" if document is None else "expected a mapping at the top level"
        raise ConfigError([Problem(source, message)])
    decoder = _Decoder()
    config = _Normaliser(decoder).run(decoder.decode(document, _type_info(Document), ""))
    if decoder.problems:
        raise ConfigError(decoder.problems)
    return config


def entity_id(entity: str, *key: str) -> str:
    """The id of an entity the file gives none: a UUIDv5 of its type and endpoint key.

    The keys: a service's or route's name (a nameless route: its service id and its position
    in the file; a nameless service: its position), a consumer's username (else "custom_id" and
    the custom_id), a consumer group's name, a key-auth credential's key SHA-256, an acl's
    consumer id and group, a plugin's name and scope ids (Kong's cache key).
    """
    return str(uuid.uuid5(ID_NAMESPACE, json.dumps([entity, *key])))


# ---------------------------------------------------------------------------------------------
# 1. Parsing


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a repeated mapping key (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            # `<<` merges may legitimately be overridden by the mapping's own keys.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if (key_node.tag, key_node.value) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                )
            seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise _DuplicateKey(f"duplicate key '{key}'")
        mapping[key] = value
    return mapping


def _parse(data: bytes | str, source: str) -> Any:
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(source, f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    if text.lstrip().startswith("{"):
        # JSON is YAML, but PyYAML refuses the tab indentation JSON files often have.
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except _DuplicateKey as exc:
            raise ConfigError([Problem(source, str(exc))]) from None
        except json.JSONDecodeError:
            pass  # perhaps a YAML flow mapping; if not, YAML reports the error
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([Problem(source, f"{where}{exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, str(exc))]) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# 2. Walking the document with the model's types

# Stands for a value that failed to decode.
_INVALID: Any = object()
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_type_info = functools.cache(mi.type_info)
_COLLECTIONS: dict[type, Any] = {mi.SetType: set, mi.FrozenSetType: frozenset, mi.VarTupleType: tuple}


def _join(path: str, key: object) -> str:
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key) if isinstance(key, str) else key}]"


class _Decoder:
    """Checks a parsed YAML/JSON value against a type (msgspec's `type_info`) and builds it,
    recording every problem in Kong's wording.

    A value that fails is left out: its Struct field keeps its default (None when required),
    a list keeps None in its place so that later paths keep their indexes. The path of every
    Struct field with a problem is kept in `invalid`, so that checks spanning fields skip it.
    """

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.invalid: set[str] = set()

    def fail(self, path: str, message: str) -> Any:
        self.problems.append(Problem(path, message))
        return _INVALID

    def decode(self, value: Any, info: mi.Type, path: str) -> Any:
        match info:
            case mi.Metadata():
                result = self.decode(value, info.type, path)
                check = (info.extra or {}).get("check")
                if result is _INVALID or check is None or (message := check(result)) is None:
                    return result
                return self.fail(path, message)
            case mi.UnionType():
                if value is None and any(isinstance(member, mi.NoneType) for member in info.types):
                    return None
                others = [member for member in info.types if not isinstance(member, mi.NoneType)]
                if len(others) != 1:
                    raise TypeError(f"configuration types support `T | None` unions only, not {info}")
                return self.decode(value, others[0], path)
            case mi.StructType():
                return self._decode_struct(value, info, path)
            case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
                return self._decode_array(value, info, path)
            case mi.DictType():
                return self._decode_map(value, info, path)
            case mi.AnyType():
                return value
            case mi.FloatType() if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        message = _scalar_problem(value, info)
        return value if message is None else self.fail(path, message)

    def _decode_array(self, value: Any, info: Any, path: str) -> Any:
        if not isinstance(value, list):
            return self.fail(path, "expected an array")
        if message := _length_problem(len(value), info.min_length, info.max_length):
            return self.fail(path, message)
        items = [self.decode(item, info.item_type, f"{path}[{i}]") for i, item in enumerate(value)]
        items = [None if item is _INVALID else item for item in items]
        return items if isinstance(info, mi.ListType) else _COLLECTIONS[type(info)](items)

    def _decode_map(self, value: Any, info: mi.DictType, path: str) -> Any:
        if not isinstance(value, dict):
            return self.fail(path, "expected a map")
        if message := _length_problem(len(value), info.min_length, info.max_length):
            return self.fail(path, message)
        mapping = {}
        for key, item in value.items():
            item_path = _join(path, key)
            decoded_key = self.decode(key, info.key_type, item_path)
            decoded = self.decode(item, info.value_type, item_path)
            if decoded_key is not _INVALID and decoded is not _INVALID:
                mapping[decoded_key] = decoded
        return mapping

    def _decode_struct(self, value: Any, info: mi.StructType, path: str) -> Any:
        if not isinstance(value, dict):
            return self.fail(path, "expected a record")
        start = len(self.problems)
        fields = {field.encode_name: field for field in info.fields}
        values: dict[str, Any] = {}
        for key, item in value.items():
            item_path = _join(path, key)
            field = fields.get(key)
            if field is None:
                self._unexpected_key(info, key, item, item_path)
            elif item is not None:  # null leaves a field unset, as decK reads it
                before = len(self.problems)
                decoded = self.decode(item, field.type, item_path)
                if len(self.problems) > before:
                    self.invalid.add(item_path)
                if decoded is not _INVALID:
                    values[field.name] = decoded
        for field in info.fields:
            if field.required and field.name not in values:
                if value.get(field.encode_name) is None:  # a bad value is reported already
                    field_path = _join(path, field.encode_name)
                    self.fail(field_path, "required field missing")
                    self.invalid.add(field_path)
                values[field.name] = None  # a placeholder: the configuration is refused anyway
        try:
            return info.cls(**values)
        except (TypeError, ValueError) as exc:
            # A Struct's __post_init__ refusing a combination: news only when the fields are fine.
            return self.fail(path, str(exc)) if len(self.problems) == start else _INVALID

    def _unexpected_key(self, info: mi.StructType, key: Any, item: Any, path: str) -> None:
        if key in getattr(info.cls, "IGNORED_FIELDS", ()):
            return
        if key in getattr(info.cls, "UNSUPPORTED_FIELDS", ()):
            if item not in (None, "", [], {}):
                self.fail(path, f"'{key}' is not supported by fastgate")
        elif info.forbid_unknown_fields:
            self.fail(path, "unknown field")


def _scalar_problem(value: Any, info: mi.Type) -> str | None:
    match info:
        case mi.StrType():
            if not isinstance(value, str):
                return "expected a string"
            # Kong's strings are non-empty unless a schema says otherwise.
            minimum = 1 if info.min_length is None else info.min_length
            if message := _length_problem(len(value), minimum, info.max_length):
                return message
            if info.pattern is not None and not re.search(info.pattern, value):
                return f"invalid value: {value}"
            return None
        case mi.BoolType():
            return None if isinstance(value, bool) else "expected a boolean"
        case mi.IntType():
            if not isinstance(value, int) or isinstance(value, bool):
                return "expected an integer"
            return _bounds_problem(value, info)
        case mi.FloatType():
            return "expected a number" if not isinstance(value, float) else _bounds_problem(value, info)
        case mi.LiteralType():
            if value in info.values and not isinstance(value, bool):
                return None
            if all(isinstance(option, str) for option in info.values) and not isinstance(value, str):
                return "expected a string"
            if all(isinstance(option, int) for option in info.values) and (
                not isinstance(value, int) or isinstance(value, bool)
            ):
                return "expected an integer"
            return "expected one of: " + ", ".join(map(str, info.values))
        case mi.NoneType():
            return None if value is None else "expected null"
    raise TypeError(f"{info} is not supported in configuration types")


def _length_problem(length: int, minimum: int | None, maximum: int | None) -> str | None:
    if minimum is not None and length < minimum:
        return f"length must be at least {minimum}"
    if maximum is not None and length > maximum:
        return f"length must be at most {maximum}"
    return None


def _bounds_problem(value: float, info: mi.IntType | mi.FloatType) -> str | None:
    low, high = info.ge, info.le
    if low is not None and high is not None:
        if not low <= value <= high:
            return f"value should be between {low} and {high}"
    elif low is not None and value < low:
        return f"value must be at least {low}"
    elif high is not None and value > high:
        return f"value must be at most {high}"
    if info.gt is not None and value <= info.gt:
        return f"value must be greater than {info.gt}"
    if info.lt is not None and value >= info.lt:
        return f"value must be less than {info.lt}"
    if info.multiple_of is not None and value % info.multiple_of:
        return f"value must be a multiple of {info.multiple_of}"
    return None


# ---------------------------------------------------------------------------------------------
# 3. Normalising

_T = TypeVar("_T", bound=Normalised)
_Item = TypeVar("_Item")


def _normalised(cls: type[_T], entry: msgspec.Struct, **values: Any) -> _T:
    """`cls` built from the fields it shares with `entry`, `values` taking precedence."""
    shared = {name: getattr(entry, name) for name in cls.__struct_fields__ if name not in values}
    return cls(**shared, **values)


def _present(items: Iterable[_Item | None]) -> Iterator[tuple[int, _Item]]:
    """(index, item) for the list items that decoded."""
    return ((index, item) for index, item in enumerate(items) if item is not None)


def _uniqueness(entity: str, field: str, value: str, scope: str = "") -> str:
    return f"uniqueness violation: '{entity}' entity with {field} set to '{value}' already declared{scope}"


def _expand_url(url: str) -> tuple[str, str, int, str | None]:
    """Kong's service `url` shorthand, `scheme://host[:port][/path]` -> (protocol, host, port,
    path); the port defaults to 443 for https, else 80. Raises ValueError with the problem."""
    scheme, separator, rest = url.partition("://")
    authority, slash, path_rest = rest.partition("/")
    if not (scheme and separator and authority):
        raise ValueError("invalid url: expected scheme://host[:port][/path]")
    # Kong drops these silently; a dropped query or credential would change what is proxied.
    if "?" in rest or "#" in rest or "@" in authority:
        raise ValueError("must not have a query string, fragment or user info")
    host, port = split_host_port(authority)
    path = "/" + path_rest if slash else None
    problem = (check_protocol(scheme) or check_service_host(host)
               or (port is not None and check_port_text(port))
               or (path is not None and check_service_path(path)))
    if problem:
        raise ValueError(problem)
    default_port = 443 if scheme == "https" else 80
    return scheme, host, default_port if port is None else int(port), path


class _Normaliser:
    """Builds the normalised Config from decoded entries, adding its problems to the decoder's.

    Entities are registered parents first, so that children can use their parent's id; plugins
    come last because a top-level plugin may reference any other entity.
    """

    def __init__(self, decoder: _Decoder) -> None:
        self.decoder = decoder
        self.by_id: dict[str, set[str]] = defaultdict(set)
        self.by_key: dict[str, dict[str, str]] = defaultdict(dict)  # entity -> endpoint key -> id
        self.seen: set[tuple[object, ...]] = set()
        self.key_paths: dict[str, str] = {}  # SHA-256 of a key -> where it was first declared
        self.services: list[Service] = []
        self.routes: list[Route] = []
        self.consumers: list[Consumer] = []
        self.credentials: list[KeyAuthCredential] = []
        self.acls: list[Acl] = []
        self.consumer_groups: list[ConsumerGroup] = []
        self.members: list[tuple[str, str]] = []
        self.plugins: list[Plugin] = []
        # (entry, path, parent scope field or None when top-level, scope ids)
        self.pending_plugins: list[tuple[PluginEntry, str, str | None, dict[str, str | None]]] = []
        self.pending_groups: list[tuple[str, GroupReference, str]] = []  # (consumer id, reference, path)

    def fail(self, path: str, message: str) -> None:
        self.decoder.fail(path, message)

    def valid(self, path: str) -> bool:
        return path not in self.decoder.invalid

    def run(self, document: Document) -> Config:
        if document.format_version not in (None, "3.0"):
            self.fail("_format_version",
                      f"format version '{document.format_version}' is not supported by fastgate, use \"3.0\"")
        for i, service in _present(document.services):
            self.service(service, f"services[{i}]")
        for i, route in _present(document.routes):
            self.route(route, f"routes[{i}]", parent_service=None)
        for i, consumer in _present(document.consumers):
            self.consumer(consumer, f"consumers[{i}]")
        for i, group in _present(document.consumer_groups):
            self.consumer_group(group, f"consumer_groups[{i}]")
        for consumer_id, reference, path in self.pending_groups:
            group_id = self.resolve_mapping(
                "consumer_groups", "consumer_group", {"id": reference.id, "name": reference.name}, path
            )
            if group_id is not None:
                self.members.append((group_id, consumer_id))
        for i, credential in _present(document.keyauth_credentials):
            self.credential(credential, f"keyauth_credentials[{i}]", parent_consumer=None)
        for i, acl in _present(document.acls):
            self.acl(acl, f"acls[{i}]", parent_consumer=None)
        for i, plugin in _present(document.plugins):
            self.pending_plugins.append((plugin, f"plugins[{i}]", None, {}))
        for plugin, path, parent, scope in self.pending_plugins:
            self.plugin(plugin, path, parent, scope)
        return Config(
            format_version=document.format_version,
            services=self.services,
            routes=self.routes,
            consumers=self.consumers,
            keyauth_credentials=self.credentials,
            acls=self.acls,
            consumer_groups=self.consumer_groups,
            consumer_group_members=list(dict.fromkeys(self.members)),
            plugins=self.plugins,
        )

    # -- identity, uniqueness and references

    def register(self, entity: str, given_id: str | None, key: tuple[str, ...], path: str) -> str:
        """The entity's id: the one given, else generated from its endpoint `key`. A generated id
        repeats only when the key does, which the caller reports in better words."""
        identifier = given_id or entity_id(entity, *key)
        if given_id and identifier in self.by_id[entity]:
            self.fail(f"{path}.id", _uniqueness(entity, "primary key", identifier))
        self.by_id[entity].add(identifier)
        return identifier

    def unique(self, key: tuple[object, ...], path: str, message: str) -> bool:
        if key in self.seen:
            self.fail(path, message)
            return False
        self.seen.add(key)
        return True

    def endpoint(self, entity: str, field: str, value: str, identifier: str, path: str) -> None:
        """Claim the endpoint key (name, username) that other entities may reference."""
        if self.unique((entity, field, value), path, _uniqueness(entity, field, value)):
            self.by_key[entity][value] = identifier

    def resolve(self, entity: str, field: str, reference: str | None, path: str) -> str | None:
        """A reference by endpoint key or id, as Kong resolves it -> the id."""
        if reference is None:
            return None
        found = self.by_key[entity].get(reference)
        if found is None and reference in self.by_id[entity]:
            found = reference
        if found is None:
            self.fail(path, f"invalid reference '{field}: {reference}' (no such entry in '{entity}')")
        return found

    def resolve_mapping(self, entity: str, field: str, given: dict[str, str | None], path: str) -> str | None:
        """A reference written as a mapping (decK's group membership): `{name: x}` or `{id: y}`."""
        written = {name: value for name, value in given.items() if value is not None}
        if not written:
            if all(self.valid(f"{path}.{name}") for name in given):
                self.fail(path, "at least one of these fields must be non-empty: "
                          + ", ".join(f"'{name}'" for name in given))
            return None
        found = {self.resolve(entity, field, value, f"{path}.{name}") for name, value in written.items()}
        if len(found) > 1 and None not in found:
            self.fail(path, " and ".join(f"'{name}'" for name in written) + f" refer to different {entity}")
        return found.pop() if len(found) == 1 else None

    # -- entities

    def service(self, entry: ServiceEntry, path: str) -> None:
        location = self.service_location(entry, path)
        service_id = self.register("services", entry.id, (entry.name or path,), path)
        if entry.name is not None:
            self.endpoint("services", "name", entry.name, service_id, f"{path}.name")
        if location is not None:
            protocol, host, port, service_path = location
            self.services.append(_normalised(
                Service, entry, id=service_id, protocol=protocol, host=host, port=port, path=service_path
            ))
        for k, plugin in _present(entry.plugins):
            self.pending_plugins.append((plugin, f"{path}.plugins[{k}]", "service", {"service": service_id}))
        for k, route in _present(entry.routes):
            self.route(route, f"{path}.routes[{k}]", parent_service=service_id)

    def service_location(self, entry: ServiceEntry, path: str) -> tuple[str, str, int, str | None] | None:
        if entry.url is None:
            if entry.host is None:
                if self.valid(f"{path}.host"):
                    self.fail(f"{path}.host", "required field missing")
                return None
            return entry.protocol or "http", entry.host, 80 if entry.port is None else entry.port, entry.path
        clashes = [f"'{name}'" for name in ("protocol", "host", "port", "path")
                   if getattr(entry, name) is not None]
        try:
            if clashes:
                raise ValueError("cannot be set together with " + ", ".join(clashes))
            return _expand_url(entry.url)
        except ValueError as exc:
            self.fail(f"{path}.url", str(exc))
            return None

    def route(self, entry: RouteEntry, path: str, parent_service: str | None) -> None:
        if parent_service is None:
            service_id = self.resolve("services", "service", entry.service, f"{path}.service")
        else:
            service_id = parent_service
            if entry.service is not None:
                self.fail(f"{path}.service", "value must be null")
        if not any(getattr(entry, field) for field in _ROUTE_MATCHERS) and all(
            self.valid(f"{path}.{field}") for field in _ROUTE_MATCHERS
        ):
            first = entry.protocols[0] if entry.protocols else None
            protocol = first if first in SUPPORTED_PROTOCOLS else "http"
            self.fail(path, "must set one of " + ", ".join(f"'{field}'" for field in _ROUTE_MATCHERS)
                      + f" when 'protocols' is '{protocol}'")
        # A nameless route has no endpoint key: its service and position stand in.
        key = (entry.name,) if entry.name else (service_id or "", path)
        route_id = self.register("routes", entry.id, key, path)
        if entry.name is not None:
            self.endpoint("routes", "name", entry.name, route_id, f"{path}.name")
        self.routes.append(_normalised(
            Route, entry, id=route_id, service=service_id, methods=entry.methods or [],
            hosts=entry.hosts or [], paths=entry.paths or [], headers=entry.headers or {},
        ))
        for k, plugin in _present(entry.plugins):
            self.pending_plugins.append((plugin, f"{path}.plugins[{k}]", "route", {"route": route_id}))

    def consumer(self, entry: ConsumerEntry, path: str) -> None:
        if entry.username is None and entry.custom_id is None and self.valid(f"{path}.username") \
                and self.valid(f"{path}.custom_id"):
            self.fail(path, "at least one of these fields must be non-empty: 'custom_id', 'username'")
        if entry.username is not None:
            key: tuple[str, ...] = (entry.username,)
        else:
            key = ("custom_id", entry.custom_id or path)
        consumer_id = self.register("consumers", entry.id, key, path)
        if entry.username is not None:
            self.endpoint("consumers", "username", entry.username, consumer_id, f"{path}.username")
        if entry.custom_id is not None:
            self.unique(("consumers", "custom_id", entry.custom_id), f"{path}.custom_id",
                        _uniqueness("consumers", "custom_id", entry.custom_id))
        self.consumers.append(_normalised(Consumer, entry, id=consumer_id))
        for k, credential in _present(entry.keyauth_credentials):
            self.credential(credential, f"{path}.keyauth_credentials[{k}]", parent_consumer=consumer_id)
        for k, acl in _present(entry.acls):
            self.acl(acl, f"{path}.acls[{k}]", parent_consumer=consumer_id)
        for k, plugin in _present(entry.plugins):
            self.pending_plugins.append(
                (plugin, f"{path}.plugins[{k}]", "consumer", {"consumer": consumer_id})
            )
        for k, group in _present(entry.groups):
            self.pending_groups.append((consumer_id, group, f"{path}.groups[{k}]"))

    def owner(self, reference: str | None, path: str, parent_consumer: str | None) -> str | None:
        """The consumer id of a credential or acl: its parent's when nested, else its reference."""
        field_path = f"{path}.consumer"
        if parent_consumer is not None:
            if reference is not None:
                self.fail(field_path, "value must be null")
            return parent_consumer
        if reference is None:
            if self.valid(field_path):
                self.fail(field_path, "required field missing")
            return None
        return self.resolve("consumers", "consumer", reference, field_path)

    def credential(self, entry: KeyAuthCredentialEntry, path: str, parent_consumer: str | None) -> None:
        consumer_id = self.owner(entry.consumer, path, parent_consumer)
        if entry.key is None:
            return
        if entry.key.startswith(KEY_SHA256_PREFIX):
            digest = entry.key[len(KEY_SHA256_PREFIX):].lower()
        else:
            digest = hashlib.sha256(entry.key.encode()).hexdigest()
        # Only the digest is kept: no plain key stays in the running configuration.
        key = KEY_SHA256_PREFIX + digest
        # Compared by digest, so a key given plainly and as its hash is one key. The key stays out
        # of the message: configuration errors end up in logs.
        first = self.key_paths.setdefault(digest, path)
        if first != path:
            self.fail(f"{path}.key", "uniqueness violation: 'keyauth_credentials' entity with the same key "
                      f"already declared at {first}")
        credential_id = self.register("keyauth_credentials", entry.id, (digest,), path)
        if consumer_id is not None:
            self.credentials.append(_normalised(
                KeyAuthCredential, entry, id=credential_id, consumer=consumer_id, key=key
            ))

    def acl(self, entry: AclEntry, path: str, parent_consumer: str | None) -> None:
        consumer_id = self.owner(entry.consumer, path, parent_consumer)
        if consumer_id is None or entry.group is None:
            return
        self.unique(("acls", consumer_id, entry.group), f"{path}.group",
                    _uniqueness("acls", "group", entry.group, " for this consumer"))
        acl_id = self.register("acls", entry.id, (consumer_id, entry.group), path)
        self.acls.append(_normalised(Acl, entry, id=acl_id, consumer=consumer_id))

    def consumer_group(self, entry: ConsumerGroupEntry, path: str) -> None:
        group_id = self.register("consumer_groups", entry.id, (entry.name or path,), path)
        if entry.name is not None:
            self.endpoint("consumer_groups", "name", entry.name, group_id, f"{path}.name")
            self.consumer_groups.append(ConsumerGroup(id=group_id, name=entry.name, tags=entry.tags))
        for k, member in _present(entry.consumers):
            member_path = f"{path}.consumers[{k}]"
            consumer_id = self.resolve_mapping(
                "consumers", "consumer", {"id": member.id, "username": member.username}, member_path
            )
            if consumer_id is not None:
                self.members.append((group_id, consumer_id))
        for k, plugin in _present(entry.plugins):
            self.pending_plugins.append(
                (plugin, f"{path}.plugins[{k}]", "consumer_group", {"consumer_group": group_id})
            )

    def plugin(self, entry: PluginEntry, path: str, parent: str | None, scope: dict[str, str | None]) -> None:
        unresolved = False
        for field, entity in _PLUGIN_SCOPES.items():
            reference = getattr(entry, field)
            if parent is not None:
                # As in Kong, a nested plugin is scoped by its parent alone.
                if reference is not None:
                    self.fail(f"{path}.{field}", "value must be null")
            else:
                scope[field] = self.resolve(entity, field, reference, f"{path}.{field}")
                unresolved |= reference is not None and scope[field] is None
        if entry.name is None:
            return
        config = self.plugin_config(entry, path)
        plugin_class = PLUGINS.get(entry.name)
        consumer_scoped = [field for field in ("consumer", "consumer_group") if scope.get(field) is not None]
        if len(consumer_scoped) == 2:
            self.fail(f"{path}.consumer_group", "a plugin is scoped to a consumer or to a consumer group, not both")
        elif consumer_scoped and plugin_class is not None and not getattr(plugin_class, "CONSUMER_SCOPED", True):
            self.fail(f"{path}.{consumer_scoped[0]}",
                      f"value must be null (plugin '{entry.name}' cannot be scoped to a {consumer_scoped[0]})")
        if unresolved:
            return
        scope_ids = tuple(scope.get(field) or "" for field in _PLUGIN_SCOPES)
        self.unique(("plugins", entry.name, scope_ids), f"{path}.name", _uniqueness(
            "plugins", "name", entry.name, " for the same route, service, consumer and consumer_group"
        ))
        if entry.instance_name is not None:
            self.unique(("plugins", "instance_name", entry.instance_name), f"{path}.instance_name",
                        _uniqueness("plugins", "instance_name", entry.instance_name))
        plugin_id = self.register("plugins", entry.id, (entry.name, *scope_ids), path)
        if config is not None:
            scope_fields = {field: scope.get(field) for field in _PLUGIN_SCOPES}
            self.plugins.append(_normalised(Plugin, entry, id=plugin_id, config=config, **scope_fields))

    def plugin_config(self, entry: PluginEntry, path: str) -> msgspec.Struct | None:
        plugin_class = PLUGINS.get(entry.name)
        if plugin_class is None:
            self.fail(f"{path}.name", f"plugin '{entry.name}' is not supported yet"
                      if entry.name in KONG_PLUGIN_NAMES else f"unknown plugin '{entry.name}'")
            return None
        if not self.valid(f"{path}.config"):
            return None
        config = self.decoder.decode(entry.config, _type_info(plugin_class.Config), f"{path}.config")
        return None if config is _INVALID else config
