"""Kong 3.x declarative configuration: as the file says it, and as fastgate runs it.

Two families of msgspec Structs live here.

**Entries** (`Document`, `ServiceEntry`, `RouteEntry`, ...) mirror Kong's declarative file field
for field, with Kong's names, defaults and constraints (`kong/db/schema/entities/*.lua`,
`typedefs.lua`). They allow what the file allows: nesting (`services[].routes`), the service
`url` shorthand, references by name, ids left out. `fastgate.config.load` walks a document
with these types, so every constraint declared here is checked and reported with its path.
A check that a type cannot express is attached as `Meta(extra={"check": fn})`: `fn(value)`
returns an error message or None, like Kong's `custom_validator`.

**The normalised `Config`** (`Service`, `Route`, ...) is what the rest of fastgate compiles:

* flat lists: routes, credentials, acls and plugins nested in the file are moved to the
  top-level lists, in file order (each parent's children right after the parent's own);
* every entity has an `id`: the UUID given in the file, else a UUIDv5 from the entity type
  and its endpoint key (`load.entity_id`), so the same file always yields the same ids;
* every reference is an id: `Route.service`, `KeyAuthCredential.consumer`, `Acl.consumer`,
  `Plugin.route/service/consumer/consumer_group`; `None` means no service / not scoped;
* Kong's defaults are applied, a service `url` is expanded into protocol/host/port/path, and
  unset route match fields (`methods`, `hosts`, `paths`, `headers`) are empty;
* consumer-group membership from both file forms is `consumer_group_members`, a list of
  (group id, consumer id) pairs without duplicates;
* `Plugin.config` is an instance of the plugin's own `Config` Struct.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal, get_args

import msgspec
from msgspec import Meta

# The router's reference implementations: a prefix path is valid when the router would leave it
# as it is, and a path regex when the router can compile it.
from fastgate._core._pure.router import normalize_path as _router_normalize_path
from fastgate._core._pure.router import python_regex

# ---------------------------------------------------------------------------------------------
# Value checks (Kong's custom validators). Each returns an error message, or None when fine.

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
# Kong's utf8_name: any non-ASCII character, and these ASCII ones.
_NAME = re.compile(r"[A-Za-z0-9._~\-\u0080-\U0010ffff]+")
# Kong's tag: printable ASCII except ',' and '/', or any non-ASCII character.
_TAG = re.compile(r"[ !-+\-.0-~\u0080-\U0010ffff]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_SERVICE_PATH_CHARS = re.compile(r"/[A-Za-z0-9._~/%:@!$&'()*+,;=\-]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

KongProtocol = Literal["grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp"]
KONG_PROTOCOLS: tuple[str, ...] = get_args(KongProtocol)
SUPPORTED_PROTOCOLS = ("http", "https")
KEY_SHA256_PREFIX = "sha256:"


def check_uuid(value: str) -> str | None:
    return None if _UUID.fullmatch(value) else "expected a valid UUID"


def check_name(value: str) -> str | None:
    if _NAME.fullmatch(value):
        return None
    return (f"invalid value '{value}': the only accepted ascii characters are alphanumerics "
            "or ., -, _, and ~")


def check_tag(value: str) -> str | None:
    if _TAG.fullmatch(value):
        return None
    return f"invalid tag '{value}': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"


def check_protocol(value: str) -> str | None:
    if value in SUPPORTED_PROTOCOLS:
        return None
    if value in KONG_PROTOCOLS:
        return f"protocol '{value}' is not supported by fastgate"
    return "expected one of: " + ", ".join(SUPPORTED_PROTOCOLS)


def split_host_port(value: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port text)."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if bracket and rest.startswith(":"):
            return host, rest[1:]
        return (host, None) if bracket and not rest else (value, None)
    if value.count(":") > 1:
        return value, None
    host, colon, port = value.partition(":")
    return host, port if colon else None


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(value))
    return True


def check_port_text(port: str) -> str | None:
    # isdigit() alone accepts digits such as '²' that int() refuses.
    return None if port.isascii() and port.isdigit() and int(port) <= 65535 else "invalid port number"


def check_service_host(value: str) -> str | None:
    host, port = split_host_port(value)
    if not _is_host(host):
        return f"invalid value: {value}"
    return None if port is None else "must not have a port"


def check_route_host(value: str) -> str | None:
    if value.count("*") > 1:
        return "invalid wildcard: must have at most one wildcard"
    if "*" in value and not (value.startswith("*.") or value.endswith(".*")):
        return "invalid wildcard: must be placed at leftmost or rightmost label"
    host, port = split_host_port(value.replace("*", "wildcard"))
    if not _is_host(host):
        return f"invalid value: {value}"
    return None if port is None else check_port_text(port)


def _percent_problem(path: str) -> str | None:
    bad = _BAD_PERCENT.search(path)
    return None if bad is None else f"invalid url-encoded value: '{path[bad.start():bad.start() + 3]}'"


def check_service_path(value: str) -> str | None:
    if not value.startswith("/"):
        return "should start with: /"
    if "//" in value:
        return "must not have empty segments"
    if not _SERVICE_PATH_CHARS.fullmatch(value):
        return f"invalid path: '{value}' (characters outside of the reserved list of RFC 3986 found)"
    return _percent_problem(value)


def normalize_path(path: str) -> str:
    """Kong's `normalize(uri, merge_slashes=true)`, as the router applies it to requests."""
    return _router_normalize_path(path.encode()).decode(errors="backslashreplace")


def check_regex(kong_regex: str) -> str | None:
    try:
        re.compile(python_regex(kong_regex))
    except re.error as exc:
        return f"invalid regex: {exc}"
    return None


def check_router_path(value: str) -> str | None:
    if not value.startswith(("/", "~/")):
        return "must start with / or ~/"
    if "//" in value:
        return "must not have empty segments"
    if value.startswith("~"):
        # Regex paths are not normalised (nor in Kong): they match the normalised request path.
        return check_regex(value[1:])
    problem = _percent_problem(value)
    if problem is None and (normalized := normalize_path(value)) != value:
        # The router matches normalised request paths, so a non-normalised prefix never matches.
        problem = f"non-normalized path, consider use '{normalized}' instead"
    return problem


def check_route_header_name(value: str) -> str | None:
    if value.lower() == "host":
        return "cannot contain 'host' header, which must be specified in the 'hosts' attribute"
    if not _HEADER_NAME.fullmatch(value):
        return f"bad header name '{value}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
    return None


def check_route_header_value(value: str) -> str | None:
    return check_regex(value[2:]) if value.startswith("~*") else None


# SHA-256 of the empty string: an empty key is never accepted, so its digest would never match.
_EMPTY_KEY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def check_key(value: str) -> str | None:
    if value.startswith(KEY_SHA256_PREFIX):
        digest = value[len(KEY_SHA256_PREFIX):]
        if not _SHA256_HEX.fullmatch(digest):
            return f"expected '{KEY_SHA256_PREFIX}' followed by 64 hexadecimal digits"
        if digest.lower() == _EMPTY_KEY_SHA256:
            return "the SHA-256 of the empty key: an empty key is never accepted"
    return None


# ---------------------------------------------------------------------------------------------
# Field types (Kong's typedefs). Strings are non-empty unless a type says `min_length=0`.

Uuid = Annotated[str, Meta(extra={"check": check_uuid})]
Name = Annotated[str, Meta(extra={"check": check_name})]
Tags = list[Annotated[str, Meta(extra={"check": check_tag})]]
Protocol = Annotated[str, Meta(extra={"check": check_protocol})]
Port = Annotated[int, Meta(ge=0, le=65535)]
Timeout = Annotated[int, Meta(ge=1, le=2**31 - 2)]
ServiceHost = Annotated[str, Meta(extra={"check": check_service_host})]
ServicePath = Annotated[str, Meta(extra={"check": check_service_path})]
Method = Annotated[str, Meta(pattern="^[A-Z]+$")]
RouteHost = Annotated[str, Meta(extra={"check": check_route_host})]
RouterPath = Annotated[str, Meta(extra={"check": check_router_path})]
RouteHeaderName = Annotated[str, Meta(extra={"check": check_route_header_name})]
RouteHeaderValue = Annotated[str, Meta(extra={"check": check_route_header_value})]
# A plain key, or `sha256:<64 hex digits>`: the SHA-256 of the key, so the file holds no secret.
Key = Annotated[str, Meta(extra={"check": check_key})]


# ---------------------------------------------------------------------------------------------
# The file, as written.


class Record(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Keys accepted and dropped.
    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Kong's keys that fastgate lacks: reported as unsupported (when not empty), not as unknown.
    UNSUPPORTED_FIELDS: ClassVar[frozenset[str]] = frozenset()


class Entry(Record, kw_only=True):
    # Kong exports carry timestamps; fastgate orders nothing by them (routes tie on id, as in
    # Kong's traditional_compatible router).
    IGNORED_FIELDS = frozenset({"_comment", "_ignore", "created_at", "updated_at"})


class PluginEntry(Entry, kw_only=True):
    UNSUPPORTED_FIELDS = frozenset({"ordering"})

    id: Uuid | None = None
    name: str
    instance_name: Name | None = None
    # Checked against the plugin's own Config Struct once the name is known.
    config: dict[str, Any] = {}
    enabled: bool = True
    protocols: list[KongProtocol] = msgspec.field(
        default_factory=lambda: ["grpc", "grpcs", "http", "https"]
    )
    # References by endpoint key (name / username) or id; only on top-level plugins.
    route: str | None = None
    service: str | None = None
    consumer: str | None = None
    consumer_group: str | None = None
    tags: Tags = []


class RouteEntry(Entry, kw_only=True):
    UNSUPPORTED_FIELDS = frozenset({"snis", "sources", "destinations", "filter_chains"})

    id: Uuid | None = None
    name: Name | None = None
    protocols: Annotated[list[Protocol], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["http", "https"]
    )
    methods: list[Method] | None = None
    hosts: list[RouteHost] | None = None
    paths: list[RouterPath] | None = None
    headers: dict[RouteHeaderName, list[RouteHeaderValue]] | None = None
    https_redirect_status_code: Literal[426, 301, 302, 307, 308] = 426
    regex_priority: int = 0
    strip_path: bool = True
    # "v1" is kept but routes as "v0", as Kong's traditional_compatible router does.
    path_handling: Literal["v0", "v1"] = "v0"
    preserve_host: bool = False
    # Accepted so Kong files load; fastgate always streams request and response bodies.
    request_buffering: bool = True
    response_buffering: bool = True
    # The service's name or id; only on top-level routes.
    service: str | None = None
    tags: Tags = []
    plugins: list[PluginEntry] = []


class ServiceEntry(Entry, kw_only=True):
    UNSUPPORTED_FIELDS = frozenset(
        {"tls_verify", "tls_verify_depth", "ca_certificates", "client_certificate", "filter_chains"}
    )

    id: Uuid | None = None
    name: Name | None = None
    # Shorthand for protocol, host, port and path: `scheme://host[:port][/path]`.
    url: str | None = None
    # None here so that a clash with `url` shows; without a url, protocol defaults to "http",
    # port to 80, and host is required.
    protocol: Protocol | None = None
    host: ServiceHost | None = None
    port: Port | None = None
    path: ServicePath | None = None
    retries: Annotated[int, Meta(ge=0, le=32767)] = 5
    connect_timeout: Timeout = 60000
    write_timeout: Timeout = 60000
    read_timeout: Timeout = 60000
    enabled: bool = True
    tags: Tags = []
    routes: list[RouteEntry] = []
    plugins: list[PluginEntry] = []


class KeyAuthCredentialEntry(Entry, kw_only=True):
    id: Uuid | None = None
    # The consumer's username or id; required on top-level credentials, absent when nested.
    consumer: str | None = None
    # Required: Kong invents a random key when none is given, a different one at every load.
    key: Key
    ttl: Annotated[int, Meta(ge=0, le=100_000_000)] | None = None
    tags: Tags = []


class AclEntry(Entry, kw_only=True):
    id: Uuid | None = None
    consumer: str | None = None
    group: str
    tags: Tags = []


class GroupReference(Record, kw_only=True):
    """An entry of `consumers[].groups` (decK's membership form)."""

    id: Uuid | None = None
    name: str | None = None


class ConsumerReference(Record, kw_only=True):
    """An entry of `consumer_groups[].consumers` (decK's membership form)."""

    id: Uuid | None = None
    username: str | None = None


class ConsumerEntry(Entry, kw_only=True):
    UNSUPPORTED_FIELDS = frozenset({
        "basicauth_credentials", "hmacauth_credentials", "jwt_secrets", "oauth2_credentials",
        "mtls_auth_credentials",
    })

    id: Uuid | None = None
    username: str | None = None
    custom_id: str | None = None
    tags: Tags = []
    keyauth_credentials: list[KeyAuthCredentialEntry] = []
    acls: list[AclEntry] = []
    plugins: list[PluginEntry] = []
    groups: list[GroupReference] = []


class ConsumerGroupEntry(Entry, kw_only=True):
    """Kong Enterprise's consumer group, in decK's file shape."""

    id: Uuid | None = None
    name: str
    consumers: list[ConsumerReference] = []
    plugins: list[PluginEntry] = []
    tags: Tags = []


class Document(Record, kw_only=True):
    IGNORED_FIELDS = frozenset({"_comment", "_ignore"})
    UNSUPPORTED_FIELDS = frozenset({
        # Kong entities and file metadata fastgate lacks.
        "_workspace", "upstreams", "targets", "certificates", "snis", "ca_certificates", "vaults",
        "keys", "key_sets", "filter_chains", "basicauth_credentials", "hmacauth_credentials",
        "jwt_secrets", "oauth2_credentials", "mtls_auth_credentials",
        # decK's: `_info.defaults` would change field defaults; the rest is Konnect/Enterprise.
        "_info", "_konnect", "_plugin_configs", "rbac_roles", "service_packages", "licenses",
        "custom_entities",
    })

    format_version: Literal["1.1", "2.1", "3.0"] = msgspec.field(name="_format_version")
    # Kong: whether to transform (e.g. hash) credential fields; nothing to transform for key-auth.
    transform: bool = msgspec.field(default=True, name="_transform")
    services: list[ServiceEntry] = []
    routes: list[RouteEntry] = []
    consumers: list[ConsumerEntry] = []
    consumer_groups: list[ConsumerGroupEntry] = []
    plugins: list[PluginEntry] = []
    keyauth_credentials: list[KeyAuthCredentialEntry] = []
    acls: list[AclEntry] = []


# ---------------------------------------------------------------------------------------------
# The normalised configuration (see the module docstring). Fields mean what Kong's do.


class Normalised(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Service(Normalised, kw_only=True):
    id: str
    name: str | None
    protocol: str
    host: str
    port: int
    path: str | None
    retries: int
    connect_timeout: int
    write_timeout: int
    read_timeout: int
    enabled: bool
    tags: list[str]


class Route(Normalised, kw_only=True):
    id: str
    name: str | None
    protocols: list[str]
    methods: list[str]
    hosts: list[str]
    paths: list[str]
    headers: dict[str, list[str]]
    https_redirect_status_code: int
    regex_priority: int
    strip_path: bool
    path_handling: str
    preserve_host: bool
    # Kong's values, kept for round trips; fastgate always streams.
    request_buffering: bool
    response_buffering: bool
    service: str | None
    tags: list[str]


class Consumer(Normalised, kw_only=True):
    id: str
    username: str | None
    custom_id: str | None
    tags: list[str]


class KeyAuthCredential(Normalised, kw_only=True):
    id: str
    consumer: str
    # Always `sha256:<64 lowercase hex>`: a plain key in the file is hashed at load.
    key: str
    ttl: int | None
    tags: list[str]


class Acl(Normalised, kw_only=True):
    id: str
    consumer: str
    group: str
    tags: list[str]


class ConsumerGroup(Normalised, kw_only=True):
    id: str
    name: str
    tags: list[str]


class Plugin(Normalised, kw_only=True):
    id: str
    name: str
    instance_name: str | None
    config: msgspec.Struct
    enabled: bool
    protocols: list[str]
    route: str | None
    service: str | None
    consumer: str | None
    consumer_group: str | None
    tags: list[str]


class Config(Normalised, kw_only=True):
    format_version: str
    services: list[Service]
    routes: list[Route]
    consumers: list[Consumer]
    keyauth_credentials: list[KeyAuthCredential]
    acls: list[Acl]
    consumer_groups: list[ConsumerGroup]
    # (consumer group id, consumer id)
    consumer_group_members: list[tuple[str, str]]
    plugins: list[Plugin]
