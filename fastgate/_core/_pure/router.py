"""Pure-Python reference of the request router (`fastgate._core.router`).

This is the test oracle for the compiled router and the fallback when FASTGATE_NO_EXTENSIONS=1,
so it is written to be read: `Router.match` walks every sub-route in priority order and returns
the first one whose predicates all hold. The semantics are Kong 3.x `traditional_compatible`
(kong/router/transform.lua, kong/router/atc.lua, kong/router/utils.lua, kong/tools/uri.lua and the
ATC interpreter):

* a route with paths of several kinds is split into one sub-route per prefix length plus one for
  all its regexes, each with its own priority and a derived UUID (`compile_routes`);
* sub-routes are tried by descending (match_weight, plain_host_only, header_count, is_regex,
  regex_priority, prefix_length, UUID);
* matching runs on the normalised path (`normalize_path`); a request whose path, Host or matched
  header values are not valid UTF-8 matches nothing (ATC refuses such values);
* the upstream path follows `get_upstream_uri_v0`, then `escape`, then the raw query.

`compile_routes` and `SubRoute` are also used by the compiled router to build its index, so both
implementations rank and predicate routes identically by construction.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Match", "Router", "SubRoute", "compile_routes", "normalize_path", "python_regex"]

# --------------------------------------------------------------------------------------------
# Path normalisation (kong/tools/uri.lua `normalize(uri, merge_slashes=true)`)

# Percent-encoded reserved characters keep their meaning, so they are not decoded (only their hex
# is upper-cased); everything else is decoded.
RESERVED = frozenset(b"!*'();:@&=+$,/?%#[]")
_TRIPLET = re.compile(rb"%([0-9A-Fa-f]{2})")


def _decode_triplet(m: re.Match[bytes]) -> bytes:
    byte = int(m[1], 16)
    if byte in RESERVED:
        return m[0].upper()
    return bytes((byte,))


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 as Kong writes it, which also merges `//` into `/`."""
    out: list[bytes] = []
    rest = path
    while rest:
        if rest == b"/.":
            rest = b"/"
        elif rest == b"/..":
            rest = b"/"
            if out:
                out.pop()
        elif rest in (b".", b".."):
            rest = b""
        elif rest.startswith(b"../"):
            rest = rest[3:]
        elif rest.startswith(b"./"):
            rest = rest[2:]
        elif rest.startswith(b"/./"):
            rest = rest[2:]
        elif rest.startswith(b"/../"):
            rest = rest[3:]
            if out:
                out.pop()
        elif rest.startswith(b"//"):
            rest = rest[1:]
        else:
            cut = rest.find(b"/", 1)
            if cut < 0:
                out.append(rest)
                rest = b""
            else:
                out.append(rest[:cut])
                rest = rest[cut:]
    return b"".join(out)


def normalize_path(path: bytes) -> bytes:
    """Decode unreserved %XX, remove dot segments, merge `//`; `path` itself when already normal."""
    # Dot segments and `//` can only start at the beginning or at a `/`, so without `%`, `//`,
    # `/.` and a leading `.` there is nothing to do.
    if b"%" not in path and b"//" not in path and b"/." not in path and not path.startswith(b"."):
        return path
    if b"%" in path:
        path = _TRIPLET.sub(_decode_triplet, path)
    return _remove_dot_segments(path)


# --------------------------------------------------------------------------------------------
# Upstream path (kong/router/utils.lua `get_upstream_uri_v0`, kong/tools/uri.lua `escape`)

# Bytes kept as they are when the path is sent upstream; anything else becomes %XX.
UNESCAPED = frozenset(
    b"!#$&'()*+,/:;=?@[]-_.~%" b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
)


def _escape(path: bytes) -> bytes:
    if all(byte in UNESCAPED for byte in path):
        return path
    return b"".join(bytes((byte,)) if byte in UNESCAPED else b"%%%02X" % byte for byte in path)


def _sanitize_postfix(rest: bytes) -> bytes:
    if rest in (b".", b".."):
        return b""
    if rest.startswith(b"./"):
        return rest[2:]
    if rest.startswith(b"../"):
        return rest[3:]
    return rest


def _upstream_path_v0(base: bytes, strip: bool, path: bytes, matched: bytes | None) -> bytes:
    """Join the service path `base` and the normalised request `path` (Kong path_handling v0)."""
    if not strip:
        if base.endswith(b"/"):
            return base + path[1:]
        return base if path == b"/" else base + path
    # Without a path predicate the "prefix" is the leading slash.
    rest = _sanitize_postfix(path[len(matched) :] if matched is not None else path[1:])
    if base.endswith(b"/"):
        if rest == b"":
            if base == b"/":
                return b"/"
            return base if path.endswith(b"/") else base[:-1]
        if rest.startswith(b"/"):
            return base[:-1] + rest
        return base + rest
    if rest == b"":
        return base + b"/" if len(path) > 1 and path.endswith(b"/") else base
    if rest.startswith(b"/"):
        return base + rest
    return base + b"/" + rest


# --------------------------------------------------------------------------------------------
# Route compilation (shared with the compiled router)

# transform.lua names split sub-routes uuid5(this namespace, "<route id>#<group index>").
_SPLIT_NAMESPACE = uuid.UUID("7f145bf9-0dce-4f91-98eb-debbce4b9f6b")
_MAX_HEADER_COUNT = 255
HOST_EXACT, HOST_SUFFIX, HOST_PREFIX = 0, 1, 2
NO_SERVICE_MESSAGE = "no Service found with those values"
HTTPS_MESSAGE = "Please use HTTPS protocol"
UPGRADE_HEADERS = ((b"Connection", b"Upgrade"), (b"Upgrade", b"TLS/1.2, HTTP/1.1"))

_INLINE_FLAGS = re.compile(r"\(\?[aiLmsux-]*m[aiLmsux-]*[:)]")


def split_host(host: bytes) -> tuple[bytes, int]:
    """Split `name[:port]` (or `[v6][:port]`); the port is -1 when there is none."""
    if host.startswith(b"["):
        end = host.find(b"]")
        if end > 0 and host[end + 1 : end + 2] == b":" and host[end + 2 :].isdigit():
            return host[: end + 1], int(host[end + 2 :])
        return host, -1
    colon = host.find(b":")
    if colon >= 0 and host[colon + 1 :].isdigit():
        return host[:colon], int(host[colon + 1 :])
    return host, -1


def translate_regex(pattern: str) -> str:
    """Give a Rust `regex` pattern the same meaning under Python `re`.

    Rust's `$` (without the m flag) and `\\z` match only at the very end; Python's `$` also matches
    before a final newline, which a decoded `%0A` can put there, so they become `\\Z`.
    """
    multiline = _INLINE_FLAGS.search(pattern) is not None
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append("\\Z" if nxt == "z" and not in_class else ch + nxt)
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            # A `]` right after `[` or `[^` is a literal member, not the end of the class.
            j = i + 1
            if pattern[j : j + 1] == "^":
                j += 1
            if pattern[j : j + 1] == "]":
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
        elif ch == "$" and not multiline:
            out.append("\\Z")
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


_LEADING_FLAGS = re.compile(r"\(\?[a-zA-Z]+\)")
# `(?<name>` but not the look-behinds `(?<=` and `(?<!`.
_NAMED_GROUP = re.compile(r"\(\?<(?=[A-Za-z_])")


def python_regex(kong_regex: str) -> str:
    """Kong's route regexes name groups `(?<name>...)`; Python's `re` spells it `(?P<name>...)`."""
    return _NAMED_GROUP.sub("(?P<", kong_regex)


def compile_path_regex(path: str) -> re.Pattern[bytes]:
    """`~/re` -> `^/re` with `(?<name>` spelled `(?P<name>` (transform.lua `path_val_transform`).

    Leading global flags (`~(?i)/re`) go before the `^`: Python only accepts them first.
    """
    body = python_regex(path[1:])
    flags = _LEADING_FLAGS.match(body)
    head = flags[0] if flags else ""
    return re.compile(translate_regex(head + "^" + body[len(head) :]).encode())


def _header_name(name: str) -> bytes:
    # Kong looks headers up with `_` and `-` interchangeable and case-insensitively.
    return name.lower().replace("_", "-").encode()


def _service_host(service: Any) -> bytes:
    if service is None:
        return b""
    port = service.port
    if port is None:
        port = 443 if service.protocol == "https" else 80
    host = service.host.encode()
    if (service.protocol == "http" and port != 80) or (service.protocol == "https" and port != 443):
        return host + b":%d" % port
    return host


def _split_paths(route: Any) -> list[tuple[str, list[str] | None]]:
    """One (id, paths) per sub-route: paths grouped by prefix length, all regexes together."""
    paths = route.paths
    if not paths or len(paths) == 1:
        return [(route.id, paths or None)]
    groups: dict[int, list[str]] = {}
    for path in paths:
        groups.setdefault(0 if path.startswith("~") else len(path.encode()), []).append(path)
    if len(groups) == 1:
        return [(route.id, paths)]
    return [
        (str(uuid.uuid5(_SPLIT_NAMESPACE, f"{route.id}#{index}")), group)
        for index, group in enumerate(groups.values(), 1)
    ]


class SubRoute:
    """One route (or one path group of a split route), with its predicates compiled.

    Predicates that the route does not set are None. `hosts` holds (kind, name, port) with
    kind HOST_EXACT/HOST_SUFFIX/HOST_PREFIX and port -1 for any; `headers` holds (name, values)
    where a value is lowercase bytes to compare or a compiled `~*` regex to search.
    """

    __slots__ = (
        "route", "service", "key", "methods", "hosts", "prefixes", "regexes", "headers",
        "strip_path", "preserve_host", "https_redirect", "base_path", "service_host",
    )  # fmt: skip

    def __init__(self, route: Any, service: Any, sub_id: str, paths: list[str] | None) -> None:
        self.route = route
        self.service = service
        self.methods = frozenset(m.encode() for m in route.methods) if route.methods else None
        self.hosts = tuple(self._host(h) for h in route.hosts) if route.hosts else None
        self.prefixes = self.regexes = None
        if paths and paths[0].startswith("~"):
            self.regexes = tuple(compile_path_regex(p) for p in paths)
        elif paths:
            self.prefixes = tuple(p.encode() for p in paths)
        self.headers = (
            tuple(
                (_header_name(name), tuple(self._header_value(v) for v in values))
                for name, values in route.headers.items()
            )
            if route.headers
            else None
        )
        self.strip_path = bool(route.strip_path)
        self.preserve_host = bool(route.preserve_host)
        # kong/runloop/handler.lua: only an https-only route refuses a request that is not https.
        self.https_redirect = 0
        if "https" in route.protocols and "http" not in route.protocols:
            self.https_redirect = route.https_redirect_status_code or 426
        self.base_path = (service.path if service is not None and service.path else "/").encode()
        self.service_host = _service_host(service)
        self.key = self._priority(route, sub_id, paths)

    @staticmethod
    def _host(host: str) -> tuple[int, bytes, int]:
        name, port = split_host(host.encode())
        if name.startswith(b"*"):
            return HOST_SUFFIX, name[1:], port
        if name.endswith(b"*"):
            return HOST_PREFIX, name[:-1], port
        return HOST_EXACT, name, port

    @staticmethod
    def _header_value(value: str) -> bytes | re.Pattern[bytes]:
        # The value (regex source included) is lowercased, as transform.lua does.
        if value.startswith("~*"):
            return re.compile(translate_regex(value[2:].lower()).encode())
        return value.lower().encode()

    @staticmethod
    def _priority(route: Any, sub_id: str, paths: list[str] | None) -> tuple[Any, ...]:
        """transform.lua `get_priority`, as a tuple compared descending, then the UUID."""
        headers = len(route.headers) if route.headers else 0
        weight = bool(route.methods) + bool(route.hosts) + bool(headers) + bool(paths)
        # Kong tests `type(hosts) == "table"`, true for an explicit empty list but not for an
        # unset field; the config loader turns unset into [], so empty counts as unset here.
        plain_host_only = bool(route.hosts) and not any("*" in h for h in route.hosts)
        is_regex = bool(paths) and paths[0].startswith("~")
        return (
            weight,
            plain_host_only,
            min(headers, _MAX_HEADER_COUNT),
            is_regex,
            route.regex_priority if is_regex else 0,
            len(paths[0].encode()) & 0x7FFFF if paths and not is_regex else 0,
            uuid.UUID(sub_id).bytes,
        )


def compile_routes(routes: Iterable[tuple[Any, Any]]) -> list[SubRoute]:
    """All sub-routes, best first."""
    subs = [
        SubRoute(route, service, sub_id, paths)
        for route, service in routes
        for sub_id, paths in _split_paths(route)
    ]
    subs.sort(key=lambda sub: sub.key, reverse=True)
    return subs


def lower_value(value: bytes) -> bytes:
    """ATC's `lower()`: Unicode lowercase (values reaching it are valid UTF-8)."""
    if value.isascii():
        return value.lower()
    return value.decode().lower().encode()


def is_utf8(value: bytes) -> bool:
    if value.isascii():
        return True
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def add_captures(captures: dict[int | str, str], m: re.Match[bytes]) -> None:
    """Numbered then named groups that took part in the match, as the ATC interpreter keeps them."""
    for i, group in enumerate((m[0], *m.groups())):
        if group is not None:
            captures[i] = group.decode(errors="surrogateescape")
    for name, group in m.groupdict().items():
        if group is not None:
            captures[name] = group.decode(errors="surrogateescape")


def match_headers(
    sub: SubRoute, headers: Mapping[bytes, Sequence[bytes]] | None
) -> dict[int | str, str] | None:
    """None unless every header predicate holds; then the captures of the `~*` ones that matched.

    Each header is (value 1 OR value 2 ...), every value tried against each request value; the
    first predicate that holds ends the header, as the ATC interpreter evaluates `||` and `any`.
    """
    captures: dict[int | str, str] = {}
    for name, predicates in sub.headers or ():
        values = [lower_value(v) for v in (headers.get(name) if headers else None) or ()]
        for predicate in predicates:
            if isinstance(predicate, bytes):
                if predicate in values:
                    break
                continue
            m = next((m for v in values if (m := predicate.search(v)) is not None), None)
            if m is not None:
                add_captures(captures, m)
                break
        else:
            return None
    return captures


# --------------------------------------------------------------------------------------------
# Matching


class Match:
    """The outcome of `Router.match`: what to proxy to, or which error to answer."""

    __slots__ = (
        "_route", "_service", "_upstream_path", "_upstream_host", "_stripped_prefix", "_captures",
        "_error_status", "_error_message", "_error_headers",
    )  # fmt: skip

    def __init__(
        self,
        route: Any,
        service: Any,
        upstream_path: bytes,
        upstream_host: bytes,
        stripped_prefix: bytes,
        captures: dict[int | str, str] | None,
        error_status: int,
        error_message: str | None,
        error_headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self._route = route
        self._service = service
        self._upstream_path = upstream_path
        self._upstream_host = upstream_host
        self._stripped_prefix = stripped_prefix
        self._captures = captures
        self._error_status = error_status
        self._error_message = error_message
        self._error_headers = error_headers

    route = property(lambda self: self._route)
    service = property(lambda self: self._service)
    upstream_path = property(lambda self: self._upstream_path)
    upstream_host = property(lambda self: self._upstream_host)
    stripped_prefix = property(lambda self: self._stripped_prefix)
    captures = property(lambda self: self._captures)
    error_status = property(lambda self: self._error_status)
    error_message = property(lambda self: self._error_message)
    error_headers = property(lambda self: self._error_headers)

    def __repr__(self) -> str:
        return (
            f"<Match route={getattr(self._route, 'id', None)} upstream_path={self._upstream_path!r}"
            f" upstream_host={self._upstream_host!r} error_status={self._error_status}>"
        )


def _host_matches(hosts: tuple[tuple[int, bytes, int], ...], name: bytes, port: int) -> bool:
    for kind, value, want_port in hosts:
        if kind == HOST_EXACT:
            hit = name == value
        elif kind == HOST_SUFFIX:
            hit = name.endswith(value)
        else:
            hit = name.startswith(value)
        if hit and (want_port < 0 or want_port == port):
            return True
    return False


def _path_match(sub: SubRoute, path: bytes) -> tuple[bytes | None, re.Match[bytes] | None] | None:
    """(matched path, regex match) when the path predicate holds (or there is none), else None."""
    if sub.prefixes is not None:
        for prefix in sub.prefixes:
            if path.startswith(prefix):
                return prefix, None
        return None
    if sub.regexes is not None:
        for regex in sub.regexes:
            m = regex.search(path)
            if m is not None:
                return m[0], m
        return None
    return None, None


class Router:
    """Kong `traditional_compatible` route selection over a fixed set of routes."""

    def __init__(self, routes: Iterable[tuple[Any, Any]]) -> None:
        self._subs = compile_routes(routes)
        self.header_names = frozenset(
            name for sub in self._subs for name, _ in sub.headers or ()
        )
        # ATC rejects a request whose value for a field some route uses is not UTF-8.
        self._uses_path = any(s.prefixes or s.regexes for s in self._subs)
        self._uses_host = any(s.hosts for s in self._subs)
        self._uses_method = any(s.methods for s in self._subs)

    def _valid_utf8(
        self,
        method: bytes,
        host: bytes,
        path: bytes,
        headers: Mapping[bytes, Sequence[bytes]] | None,
    ) -> bool:
        if self._uses_path and not is_utf8(path):
            return False
        if self._uses_host and not is_utf8(host):
            return False
        if self._uses_method and not is_utf8(method):
            return False
        if headers:
            for name in self.header_names:
                if not all(is_utf8(v) for v in headers.get(name) or ()):
                    return False
        return True

    def match(
        self,
        method: bytes,
        host: bytes,
        target: bytes,
        headers: Mapping[bytes, Sequence[bytes]] | None = None,
        port: int = 0,
        scheme: bytes = b"http",
    ) -> Match | None:
        # utils.lua `strip_uri_args`: the query starts at the first `?` after the first byte.
        cut = target.find(b"?", 1)
        path = normalize_path(target if cut < 0 else target[:cut])
        host_name = split_host(host)[0]
        if not self._valid_utf8(method, host_name, path, headers):
            return None
        for sub in self._subs:
            if sub.methods is not None and method not in sub.methods:
                continue
            if sub.hosts is not None and not _host_matches(sub.hosts, host_name, port):
                continue
            hit = _path_match(sub, path)
            if hit is None:
                continue
            header_captures = match_headers(sub, headers)
            if header_captures is None:
                continue
            matched, regex_match = hit
            upstream_path = _escape(_upstream_path_v0(sub.base_path, sub.strip_path, path, matched))
            if cut >= 0:
                upstream_path += target[cut:]
            # Path captures first, then the header ones, which overwrite equal keys (0 at least).
            captures: dict[int | str, str] = {}
            if regex_match is not None:
                add_captures(captures, regex_match)
            captures.update(header_captures)
            status, message, error_headers = _outcome(sub, scheme, host_name, target)
            return Match(
                sub.route,
                sub.service,
                upstream_path,
                host if sub.preserve_host and host else sub.service_host,
                matched if sub.strip_path and matched is not None else b"",
                captures if len(captures) > 1 else None,
                status,
                message,
                error_headers,
            )
        return None


def _outcome(
    sub: SubRoute, scheme: bytes, host_name: bytes, target: bytes
) -> tuple[int, str | None, tuple[tuple[bytes, bytes], ...]]:
    """(error_status, error_message, error_headers) of a matched sub-route (handler.lua order)."""
    if sub.https_redirect and scheme != b"https":
        if sub.https_redirect == 426:
            return 426, HTTPS_MESSAGE, UPGRADE_HEADERS
        # "https://" .. $host .. $request_uri; nginx's $host is lowercase and has no port.
        location = b"https://" + host_name.lower() + target
        return sub.https_redirect, HTTPS_MESSAGE, ((b"Location", location),)
    if sub.service is None:
        return 503, NO_SERVICE_MESSAGE, ()
    return 0, None, ()
