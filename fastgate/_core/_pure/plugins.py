"""The plugin runtime of the per-request path, and the built-in plugins' phase methods.

Like proxy.py, this file is both the pure-Python reference and the source of the compiled
module `fastgate._core.plugins` (through the symlink fastgate/_core/plugins.py and the
declarations of fastgate/_core/plugins.pxd).

* `PluginRun`: one configured plugin instance with its phase methods bound once, at snapshot
  compile time, so the proxy calls `run.access(exchange)` without an attribute lookup.
* `Slot`: the instances of one plugin name that can apply to a route, with Kong's precedence
  (behavior.md 3.1) resolved when the snapshot is compiled. Only the consumer-dependent part
  (consumer and consumer-group scoped instances) is chosen per request, after authentication.
* `Exit`: what an access phase returns to end the request with a response.
* `ConsumerInfo` / `CredentialInfo`: the consumers and key-auth credentials as the hot path
  needs them (upstream header lines formatted once, on first use).
* The built-in plugins' handlers (`KeyAuthHandler`, ...): fastgate/plugins/<name>.py subclasses
  each one, adding its NAME, PRIORITY and config Struct.

A phase method receives the proxy's `Exchange` (method, url, headers, header_parts, match,
consumer, credential, upstream_extra, ...); see the Plugin docs in fastgate/plugins/__init__.py.
"""

import os
import re
import time
import uuid
from urllib.parse import unquote_to_bytes

# Identity headers the gateway sets towards the upstream (behavior.md 4 and 5). A client's copy
# never reaches the upstream of a route with key-auth or acl: it would let the client pose as a
# consumer (tests/integration/test_access.py).
IDENTITY_HEADERS = frozenset({
    b"x-consumer-id", b"x-consumer-custom-id", b"x-consumer-username", b"x-credential-identifier",
    b"x-anonymous-consumer", b"x-consumer-groups", b"x-authenticated-groups",
})

MSG_UNAUTHORIZED = "Unauthorized"
MSG_NO_KEY = "No API key found in request"
MSG_DUPLICATE_KEY = "Duplicate API key found"
MSG_ACL_FORBIDDEN = "You cannot consume this service"

# No consumer group wins: a level past Kong's twelve (behavior.md 3.1).
NO_LEVEL = 13


def canonical_header(name):
    """Header names compare case-insensitively and with `_` equal to `-` (nginx's $http_*)."""
    return name.lower().replace(b"_", b"-")


def without_headers(parts, names):
    """`parts` (name, b": ", value, b"\\r\\n", ...) without the headers whose canonical name is
    in `names`."""
    kept = []
    for index in range(0, len(parts), 4):
        if canonical_header(parts[index]) not in names:
            kept.extend(parts[index:index + 4])
    return kept


def header_values(parts, name):
    """The values of header `name` (canonical) in `parts`, in order."""
    values = []
    for index in range(0, len(parts), 4):
        if canonical_header(parts[index]) == name:
            values.append(parts[index + 2])
    return values


def query_args(url):
    """The decoded (name, value-or-None) pairs of the query of `url`, in order; a flag without
    `=` has None (nginx's ngx.req.get_uri_args decodes %XX and `+`)."""
    query_at = url.find(b"?")
    if query_at < 0:
        return []
    pairs = []
    for item in url[query_at + 1:].split(b"&"):
        if not item:
            continue
        name, equals, value = item.partition(b"=")
        name = unquote_to_bytes(name.replace(b"+", b" "))
        pairs.append((name, unquote_to_bytes(value.replace(b"+", b" ")) if equals else None))
    return pairs


def has_query_arg(url, name):
    """Whether the query of `url` has an argument whose canonical name is `name`."""
    for arg, _ in query_args(url):
        if canonical_header(arg) == name:
            return True
    return False


def url_without_args(url, names):
    """`url` with the query arguments whose decoded name is in `names` removed, the others
    kept byte for byte in their order."""
    path, question, query = url.partition(b"?")
    if not question:
        return url
    kept = [
        item for item in query.split(b"&")
        if item and unquote_to_bytes(item.partition(b"=")[0].replace(b"+", b" ")) not in names
    ]
    return path + b"?" + b"&".join(kept) if kept else path


class Exit:
    """An access phase's answer. With `message` (and no body) the body is the gateway's error
    template with the request id (Kong's kong.response.error); otherwise `body` is sent as is
    with `content_type` (kong.response.exit)."""

    def __init__(self, status, message=None, headers=(), body=None, content_type=None):
        self.status = status
        self.message = message
        self.headers = headers
        self.body = body
        self.content_type = content_type


def _phase(instance, name):
    method = getattr(instance, name, None)
    if method is not None and not callable(method):
        raise TypeError(f"{type(instance).__name__}.{name} is a phase name and must be a method")
    return method


class PluginRun:
    """One plugin instance as a request runs it: its phase methods bound once."""

    def __init__(self, name, priority, instance, protocols):
        self.name = name
        self.priority = priority
        self.instance = instance
        self.protocols = frozenset(protocol.encode() for protocol in protocols)
        self.access = _phase(instance, "access")
        self.response = _phase(instance, "response")
        self.body = _phase(instance, "body")
        self.log = _phase(instance, "log")


class Slot:
    """The instances of one plugin name that can apply to one route, with Kong's precedence
    resolved: `static` is the best instance that does not depend on the consumer (route +
    service, route, service, global); `by_consumer` / `by_group` map a consumer or consumer
    group id to (level, instance), level being the rank in behavior.md 3.1 (1 is best)."""

    def __init__(self, static, static_level, by_consumer, by_group):
        self.static = static
        self.static_level = static_level
        self.by_consumer = by_consumer
        self.by_group = by_group
        self.dynamic = by_consumer is not None or by_group is not None

    def choose(self, consumer):
        """The instance for a request of `consumer` (None before authentication)."""
        best = self.static
        if consumer is None or not self.dynamic:
            return best
        level = self.static_level
        if self.by_consumer is not None:
            hit = self.by_consumer.get(consumer.id)
            if hit is not None and hit[0] < level:
                level = hit[0]
                best = hit[1]
        if self.by_group is not None:
            # group_ids are sorted by group name: on a tie the alphabetically first group wins.
            for group_id in consumer.group_ids:
                hit = self.by_group.get(group_id)
                if hit is not None and hit[0] < level:
                    level = hit[0]
                    best = hit[1]
        return best


class ConsumerInfo:
    """A consumer as the hot path sees it."""

    def __init__(self, id, username, custom_id, acl_groups, group_ids, group_names):
        self.id = id
        self.username = username
        self.custom_id = custom_id
        # ACL groups in file order (Kong sends them in DB order), and the consumer groups the
        # consumer belongs to: ids sorted by group name (plugin precedence), names in that order.
        self.acl_groups = tuple(acl_groups)
        self.acl_group_set = frozenset(acl_groups)
        self.group_ids = tuple(group_ids)
        self.group_names = tuple(group_names)
        self.identity_lines = b""
        self.groups_line = b""
        self.groups_with_consumer_groups_line = b""

    def consumer_lines(self):
        """X-Consumer-ID / -Custom-ID / -Username lines (absent fields send no header)."""
        lines = self.identity_lines
        if not lines:
            lines = b"X-Consumer-ID: " + self.id.encode() + b"\r\n"
            if self.custom_id is not None:
                lines += b"X-Consumer-Custom-ID: " + self.custom_id.encode() + b"\r\n"
            if self.username is not None:
                lines += b"X-Consumer-Username: " + self.username.encode() + b"\r\n"
            self.identity_lines = lines
        return lines


class CredentialInfo:
    """A key-auth credential: its consumer and id; `expires_at` is a time.time() (0: never)."""

    def __init__(self, id, consumer, expires_at):
        self.id = id
        self.consumer = consumer
        self.expires_at = expires_at
        self.lines = b""

    def upstream_lines(self):
        lines = self.lines
        if not lines:
            lines = self.consumer.consumer_lines() + b"X-Credential-Identifier: " + self.id.encode() + b"\r\n"
            self.lines = lines
        return lines


def _strip_identity(exchange):
    """Drop a client's copies of the identity headers (only when it sent one)."""
    headers = exchange.headers
    if headers is not None and not IDENTITY_HEADERS.isdisjoint(headers):
        exchange.header_parts = without_headers(exchange.header_parts, IDENTITY_HEADERS)
        for name in IDENTITY_HEADERS:
            headers.pop(name, None)


def _add_upstream(exchange, lines):
    extra = exchange.upstream_extra
    if extra is None:
        exchange.upstream_extra = [lines]
    else:
        extra.append(lines)


class PluginContext:
    """What a plugin instance may use from the snapshot being compiled."""

    def __init__(self, consumers, consumers_by_username, key_index):
        self.consumers = consumers  # id -> ConsumerInfo
        self.consumers_by_username = consumers_by_username
        self.key_index = key_index  # KeyIndex: key -> CredentialInfo

    def find_consumer(self, reference):
        """A consumer by id or username (key-auth's `anonymous`), or None."""
        found = self.consumers.get(reference)
        return found if found is not None else self.consumers_by_username.get(reference)


# -- key-auth (behavior.md 4) -----------------------------------------------------------------


class KeyAuthHandler:
    def __init__(self, config, context):
        self.key_names = tuple(canonical_header(name.encode()) for name in config.key_names)
        self.key_in_header = config.key_in_header
        self.key_in_query = config.key_in_query
        self.hide_credentials = config.hide_credentials
        self.run_on_preflight = config.run_on_preflight
        self.index = context.key_index
        self.anonymous_reference = config.anonymous
        self.anonymous = context.find_consumer(config.anonymous) if config.anonymous else None
        if config.realm is None:
            self.challenge = ((b"WWW-Authenticate", b"Key"),)
        else:
            self.challenge = ((b"WWW-Authenticate", b'Key realm="' + config.realm.encode() + b'"'),)
        self.watched_headers = self.key_names + tuple(IDENTITY_HEADERS)

    def access(self, exchange):
        if not self.run_on_preflight and exchange.method == b"OPTIONS":
            return None
        if self.anonymous_reference is not None and exchange.credential is not None:
            return None  # logical OR: an earlier auth plugin has authenticated the request
        message = self.authenticate(exchange)
        if message is None:
            return None
        if self.anonymous_reference is None:
            return Exit(401, message, self.challenge)
        consumer = self.anonymous
        if consumer is None:
            return Exit(500, "anonymous consumer " + self.anonymous_reference + " is configured but doesn't exist")
        _strip_identity(exchange)
        exchange.consumer = consumer
        _add_upstream(exchange, consumer.consumer_lines() + b"X-Anonymous-Consumer: true\r\n")
        return None

    def authenticate(self, exchange):
        """None when a valid key was presented, else the 401 message."""
        key = None
        found_in = 0
        headers = exchange.headers
        for name in self.key_names:
            if self.key_in_header and headers is not None:
                values = headers.get(name)
                if values is not None:
                    if len(values) > 1:
                        return MSG_DUPLICATE_KEY
                    key = values[0]
                    found_in = 1
            if key is None and self.key_in_query:
                values = [value for arg, value in query_args(exchange.url) if canonical_header(arg) == name]
                if values:
                    if len(values) > 1:
                        return MSG_DUPLICATE_KEY
                    key = values[0] if values[0] is not None else b""
                    found_in = 2
            if key is not None:
                if self.hide_credentials:
                    self.hide(exchange, name, found_in)
                break
        if not key:
            return MSG_NO_KEY
        credential = self.index.lookup(key)
        if credential is None or (credential.expires_at and credential.expires_at <= time.time()):
            return MSG_UNAUTHORIZED
        _strip_identity(exchange)
        exchange.consumer = credential.consumer
        exchange.credential = credential
        _add_upstream(exchange, credential.upstream_lines())
        return None

    def hide(self, exchange, name, found_in):
        if found_in == 1:
            exchange.header_parts = without_headers(exchange.header_parts, frozenset((name,)))
        else:
            names = {arg for arg, _ in query_args(exchange.url) if canonical_header(arg) == name}
            path = exchange.upstream_path or exchange.match.upstream_path
            exchange.upstream_path = url_without_args(path, names)


# -- acl (behavior.md 5) ----------------------------------------------------------------------


class AclHandler:
    def __init__(self, config, context):
        self.allow = config.allow is not None
        self.groups = frozenset(config.allow if config.allow is not None else config.deny)
        self.hide_groups_header = config.hide_groups_header
        self.always_use_authenticated_groups = config.always_use_authenticated_groups
        self.include_consumer_groups = config.include_consumer_groups
        self.forbidden = Exit(403, MSG_ACL_FORBIDDEN)
        self.unauthorized = Exit(401, MSG_UNAUTHORIZED)
        self.watched_headers = tuple(IDENTITY_HEADERS)

    def access(self, exchange):
        consumer = exchange.consumer
        credential = exchange.credential
        authenticated_groups = exchange.authenticated_groups
        if consumer is None and authenticated_groups is None:
            return self.unauthorized if credential is None else self.forbidden
        from_authenticated = False
        if authenticated_groups is not None and (
            consumer is None or credential is None or self.always_use_authenticated_groups
        ):
            groups = tuple(authenticated_groups)
            from_authenticated = True
        elif self.include_consumer_groups:
            groups = consumer.acl_groups + consumer.group_names
        else:
            groups = consumer.acl_groups
        if not groups:
            if self.allow:
                return self.unauthorized if credential is None else self.forbidden
        elif self.allow:
            if self.groups.isdisjoint(groups):
                return self.forbidden
        elif not self.groups.isdisjoint(groups):
            return self.forbidden
        headers = exchange.headers
        if headers is not None and (b"x-consumer-groups" in headers or b"x-authenticated-groups" in headers):
            exchange.header_parts = without_headers(
                exchange.header_parts, frozenset((b"x-consumer-groups", b"x-authenticated-groups"))
            )
        if not self.hide_groups_header:
            if from_authenticated:
                _add_upstream(exchange, b"X-Authenticated-Groups: " + ", ".join(groups).encode() + b"\r\n")
            else:
                _add_upstream(exchange, self.consumer_groups_line(consumer, groups))
        return None

    def consumer_groups_line(self, consumer, groups):
        # Formatted once per consumer (two forms: with and without consumer-group names).
        if self.include_consumer_groups:
            line = consumer.groups_with_consumer_groups_line
            if not line:
                line = consumer.groups_with_consumer_groups_line = (
                    b"X-Consumer-Groups: " + ", ".join(groups).encode() + b"\r\n"
                )
        else:
            line = consumer.groups_line
            if not line:
                line = consumer.groups_line = b"X-Consumer-Groups: " + ", ".join(groups).encode() + b"\r\n"
        return line


# -- request-termination (behavior.md 7.2) ----------------------------------------------------

_TERMINATION_MESSAGES = {
    401: "Unauthorized", 404: "Not found", 405: "Method not allowed", 500: "An unexpected error occurred",
    502: "Bad Gateway", 503: "Service unavailable",
}
JSON_TYPE = b"application/json; charset=utf-8"


def _json_string(text):
    out = ['"']
    for char in text:
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif char < " ":
            out.append("\\u%04x" % ord(char))
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def json_dumps(value):
    """Compact JSON of str / bytes / int / bool / None / list / tuple / dict (keys in order)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return _json_string(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(_json_string(str(key)) + ":" + json_dumps(item) for key, item in value.items()) + "}"
    return "[" + ",".join(json_dumps(item) for item in value) + "]"


class RequestTerminationHandler:
    def __init__(self, config, context):
        self.status = config.status_code
        self.echo = config.echo
        self.trigger = canonical_header(config.trigger.encode()) if config.trigger else b""
        self.watched_headers = (self.trigger,) if self.trigger else ()
        if config.body is not None:
            self.exit_body = config.body.encode()
            self.content_type = (config.content_type or "application/json; charset=utf-8").encode()
        else:
            message = config.message if config.message is not None else _TERMINATION_MESSAGES.get(self.status)
            self.exit_body = b"" if message is None else ('{"message":' + _json_string(message) + "}").encode()
            self.content_type = JSON_TYPE if message is not None else b""

    def access(self, exchange):
        if self.trigger:
            headers = exchange.headers
            if (headers is None or self.trigger not in headers) and not has_query_arg(exchange.url, self.trigger):
                return None
        if self.echo:
            return Exit(self.status, None, (), self.echo_body(exchange), JSON_TYPE)
        return Exit(self.status, None, (), self.exit_body, self.content_type)

    def echo_body(self, exchange):
        parts = exchange.header_parts
        headers = {}
        for index in range(0, len(parts), 4):
            name = parts[index].decode("latin-1").lower()
            value = parts[index + 2].decode("utf-8", "replace")
            if name in headers:
                previous = headers[name]
                headers[name] = previous + [value] if isinstance(previous, list) else [previous, value]
            else:
                headers[name] = value
        if exchange.host:
            headers.setdefault("host", exchange.host.decode("latin-1"))
        url = exchange.url
        path, _, _ = url.partition(b"?")
        query = {}
        for name, value in query_args(url):
            key = name.decode("utf-8", "replace")
            item = True if value is None else value.decode("utf-8", "replace")
            if key in query:
                previous = query[key]
                query[key] = previous + [item] if isinstance(previous, list) else [previous, item]
            else:
                query[key] = item
        match = exchange.match
        route = match.route if match is not None else None
        service = match.service if match is not None else None
        captures = match.captures if match is not None else None
        host = exchange.host.decode("latin-1")
        client = exchange.client
        document = {
            "message": None,
            "request": {
                "scheme": client.scheme.decode(),
                "host": host.rsplit(":", 1)[0] if host.count(":") == 1 else host,
                "port": client.listen_port,
                "method": exchange.method.decode(),
                "path": path.decode("utf-8", "replace"),
                "query": query,
                "headers": headers,
                "uri_captures": {
                    "named": {k: v for k, v in (captures or {}).items() if isinstance(k, str)},
                    "unnamed": [v for k, v in sorted((k, v) for k, v in (captures or {}).items() if isinstance(k, int))],
                },
            },
            "matched_route": None if route is None else {"id": route.id, "name": route.name},
            "matched_service": None if service is None else {"id": service.id, "name": service.name},
        }
        del document["message"]
        return json_dumps(document).encode()


# -- correlation-id (behavior.md 7.3) ---------------------------------------------------------


class CorrelationIdHandler:
    def __init__(self, config, context):
        self.name = config.header_name.encode()
        self.canonical = canonical_header(self.name)
        self.generator = config.generator
        self.echo_downstream = config.echo_downstream
        self.watched_headers = (self.canonical,)
        self.worker_uuid = str(uuid.uuid4()).encode()
        self.counter = 0
        self.pid = os.getpid()

    def generate(self, exchange):
        if self.generator == "uuid":
            return str(uuid.uuid4()).encode()
        if self.generator == "uuid#counter":
            self.counter += 1
            return self.worker_uuid + b"#%d" % self.counter
        client = exchange.client
        return b"%s-%d-%d-%d-%d-%.3f" % (
            client.local_address, client.listen_port, self.pid, client.serial, client.requests, time.time()
        )

    def access(self, exchange):
        headers = exchange.headers
        values = headers.get(self.canonical) if headers is not None else None
        if values and values[0].strip():
            exchange.correlation_id = values[0]
            return None
        value = self.generate(exchange)
        if values is not None:
            exchange.header_parts = without_headers(exchange.header_parts, frozenset((self.canonical,)))
        exchange.correlation_id = value
        _add_upstream(exchange, self.name + b": " + value + b"\r\n")
        return None

    def response(self, exchange, status, parts):
        if self.echo_downstream and exchange.correlation_id:
            parts.extend((self.name, b": ", exchange.correlation_id, b"\r\n"))


# -- cors (behavior.md 7.4) -------------------------------------------------------------------

_PLAIN_ORIGIN = re.compile(r"[A-Za-z0-9.\-:/]+")
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
_CORS_RESPONSE_HEADERS = frozenset({
    b"access-control-allow-origin", b"access-control-allow-credentials", b"access-control-expose-headers",
    b"vary",
})


def normalize_origin(origin):
    """scheme://host[:port] in lower case, the scheme's default port dropped."""
    scheme, sep, rest = origin.partition(b"://")
    if not sep:
        return origin.lower()
    host = rest.split(b"/", 1)[0].lower()
    name, colon, port = host.rpartition(b":")
    if colon and port.find(b"]") < 0 and _DEFAULT_PORTS.get(scheme.lower()) == port:
        host = name
    return scheme.lower() + b"://" + host


class CorsHandler:
    def __init__(self, config, context):
        origins = config.origins or []
        self.any_origin = not origins or "*" in origins
        self.single_origin = None
        self.plain = set()
        self.patterns = []
        for origin in origins:
            if origin == "*":
                continue
            if _PLAIN_ORIGIN.fullmatch(origin):
                self.plain.add(normalize_origin(origin.encode()))
            else:
                self.patterns.append(re.compile(origin.encode()))
        if len(origins) == 1 and not self.any_origin and _PLAIN_ORIGIN.fullmatch(origins[0]):
            self.single_origin = origins[0].encode()
        self.headers = ",".join(config.headers).encode() if config.headers else b""
        self.exposed = ",".join(config.exposed_headers).encode() if config.exposed_headers else b""
        self.methods = ",".join(config.methods).encode()
        self.max_age = b"%d" % config.max_age if config.max_age is not None else b""
        self.credentials = config.credentials
        self.private_network = config.private_network
        self.preflight_continue = config.preflight_continue
        self.allow_origin_absent = config.allow_origin_absent
        self.watched_headers = (
            b"origin", b"access-control-request-method", b"access-control-request-headers",
            b"access-control-request-private-network",
        )

    def allowed_origin(self, origin):
        """(Access-Control-Allow-Origin value or None, whether to add Vary: Origin)."""
        if self.any_origin:
            if self.credentials and origin:
                return origin, True
            return b"*", False
        if self.single_origin is not None:
            return self.single_origin, True
        if origin:
            normalized = normalize_origin(origin)
            if normalized in self.plain:
                return normalized, True
            for pattern in self.patterns:
                if pattern.fullmatch(normalized) is not None:
                    return normalized, True
        return None, True

    def origin_of(self, exchange):
        headers = exchange.headers
        values = headers.get(b"origin") if headers is not None else None
        return values[0] if values else b""

    def access(self, exchange):
        if exchange.method != b"OPTIONS":
            return None
        headers = exchange.headers
        origin = self.origin_of(exchange)
        if not origin or headers is None or not headers.get(b"access-control-request-method"):
            return None
        if self.preflight_continue:
            return None
        allow, vary = self.allowed_origin(origin)
        out = []
        if allow is not None:
            out.append((b"Access-Control-Allow-Origin", allow))
        if vary:
            out.append((b"Vary", b"Origin"))
        if self.credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        out.append((b"Access-Control-Allow-Methods", self.methods))
        requested = headers.get(b"access-control-request-headers")
        if self.headers:
            out.append((b"Access-Control-Allow-Headers", self.headers))
        elif requested:
            out.append((b"Access-Control-Allow-Headers", requested[0]))
        if self.max_age:
            out.append((b"Access-Control-Max-Age", self.max_age))
        if self.private_network and headers.get(b"access-control-request-private-network") == [b"true"]:
            out.append((b"Access-Control-Allow-Private-Network", b"true"))
        exchange.cors_preflight = True
        return Exit(200, None, tuple(out), b"", b"")

    def response(self, exchange, status, parts):
        if exchange.cors_preflight:
            return
        origin = self.origin_of(exchange)
        if not origin and not self.allow_origin_absent:
            return
        allow, vary = self.allowed_origin(origin)
        parts[:] = without_headers(parts, frozenset((b"access-control-allow-origin",)))
        if allow is not None:
            parts.extend((b"Access-Control-Allow-Origin", b": ", allow, b"\r\n"))
            if self.credentials:
                parts.extend((b"Access-Control-Allow-Credentials", b": ", b"true", b"\r\n"))
            if self.exposed:
                parts.extend((b"Access-Control-Expose-Headers", b": ", self.exposed, b"\r\n"))
        if vary:
            parts.extend((b"Vary", b": ", b"Origin", b"\r\n"))


# -- request-transformer / response-transformer (behavior.md 7.1) -----------------------------

# `$(headers.x)`, `$(headers["x"])`, `$(query_params.x)`, `$(query_params["x"])`,
# `$(uri_captures[1])`, `$(uri_captures["name"])`, `$(uri_captures.name)`.
TEMPLATE = re.compile(r"\$\((\w+)(?:\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\"([^\"]*)\"\]|\['([^']*)'\])\)")
TEMPLATE_SOURCES = ("headers", "query_params", "uri_captures")


def parse_template(text):
    """A template as a tuple of literal bytes and (source, key) pairs; ValueError when a
    `$(...)` is not one of the forms fastgate evaluates."""
    pieces = []
    position = 0
    for found in TEMPLATE.finditer(text):
        source, dotted, number, double, single = found.groups()
        if source not in TEMPLATE_SOURCES:
            raise ValueError(f"unknown template source '{source}' (expected one of: {', '.join(TEMPLATE_SOURCES)})")
        if found.start() > position:
            pieces.append(text[position:found.start()].encode())
        if number is not None:
            key = int(number)
        else:
            key = dotted if dotted is not None else (double if double is not None else single)
        pieces.append((source, key))
        position = found.end()
    rest = text[position:]
    if "$(" in rest:
        raise ValueError(f"unsupported template expression in '{text}'")
    if rest:
        pieces.append(rest.encode())
    return tuple(pieces)


def render(pieces, exchange):
    if len(pieces) == 1 and type(pieces[0]) is bytes:
        return pieces[0]
    out = []
    for piece in pieces:
        if type(piece) is bytes:
            out.append(piece)
            continue
        source, key = piece
        value = None
        if source == "headers":
            values = header_values(exchange.header_parts, canonical_header(key.encode()))
            value = b", ".join(values) if values else None
        elif source == "query_params":
            for name, item in query_args(exchange.url):
                if name == key.encode():
                    value = item if item is not None else b""
                    break
        else:
            captures = exchange.match.captures if exchange.match is not None else None
            if captures:
                found = captures.get(key)
                value = found.encode() if found is not None else None
        if value is not None:
            out.append(value)
    return b"".join(out)


def name_value(item):
    name, _, value = item.partition(":")
    return canonical_header(name.encode()), name.encode(), parse_template(value)


class HeaderEdits:
    """Kong's transformer operations on a header list, in its order: remove, rename, replace,
    add, append. Values are templates; renames and removals match case-insensitively."""

    def __init__(self, remove, rename, replace, add, append):
        self.remove = frozenset(canonical_header(name.encode()) for name in remove)
        self.rename = tuple(
            (canonical_header(old.encode()), new.encode()) for old, _, new in (item.partition(":") for item in rename)
        )
        self.replace = tuple(name_value(item) for item in replace)
        self.add = tuple(name_value(item) for item in add)
        self.append = tuple(name_value(item) for item in append)
        self.empty = not (self.remove or self.rename or self.replace or self.add or self.append)

    def apply(self, parts, exchange):
        if self.remove:
            parts = without_headers(parts, self.remove)
        for old, new in self.rename:
            values = header_values(parts, old)
            if values:
                parts = without_headers(parts, frozenset((old, canonical_header(new))))
                for value in values:
                    parts.extend((new, b": ", value, b"\r\n"))
        for canonical, name, template in self.replace:
            if header_values(parts, canonical):
                parts = without_headers(parts, frozenset((canonical,)))
                parts.extend((name, b": ", render(template, exchange), b"\r\n"))
        for canonical, name, template in self.add:
            if not header_values(parts, canonical):
                parts.extend((name, b": ", render(template, exchange), b"\r\n"))
        for canonical, name, template in self.append:
            parts.extend((name, b": ", render(template, exchange), b"\r\n"))
        return parts


def _quote(value):
    out = []
    for byte in value:
        if byte in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~":
            out.append(bytes((byte,)))
        else:
            out.append(b"%%%02X" % byte)
    return b"".join(out)


class RequestTransformerHandler:
    def __init__(self, config, context):
        self.method = config.http_method.encode() if config.http_method else b""
        self.uri = parse_template(config.replace.uri) if config.replace.uri is not None else None
        self.headers = HeaderEdits(
            config.remove.headers, config.rename.headers, config.replace.headers, config.add.headers,
            config.append.headers,
        )
        self.host = None
        for canonical, name, template in self.headers.replace:
            if canonical == b"host":
                self.host = template
        self.query_remove = frozenset(name.encode() for name in config.remove.querystring)
        self.query_rename = tuple(
            (old.encode(), new.encode()) for old, _, new in (item.partition(":") for item in config.rename.querystring)
        )
        self.query_replace = tuple(self.query_item(item) for item in config.replace.querystring)
        self.query_add = tuple(self.query_item(item) for item in config.add.querystring)
        self.query_append = tuple(self.query_item(item) for item in config.append.querystring)
        self.query = bool(
            self.query_remove or self.query_rename or self.query_replace or self.query_add or self.query_append
        )

    @staticmethod
    def query_item(item):
        name, _, value = item.partition(":")
        return name.encode(), parse_template(value)

    def access(self, exchange):
        match = exchange.match
        path = exchange.upstream_path or (match.upstream_path if match is not None else exchange.url)
        if self.uri is not None:
            query_at = path.find(b"?")
            new_path = render(self.uri, exchange)
            path = new_path + (path[query_at:] if query_at >= 0 else b"")
            exchange.upstream_path = path
        if self.method:
            exchange.method = self.method
        if not self.headers.empty:
            if self.host is not None:
                exchange.upstream_host = render(self.host, exchange)
            exchange.header_parts = self.headers.apply(exchange.header_parts, exchange)
        if self.query:
            exchange.upstream_path = self.transform_query(path, exchange)
        return None

    def transform_query(self, path, exchange):
        base, _, _ = path.partition(b"?")
        args = query_args(path)
        if self.query_remove:
            args = [(name, value) for name, value in args if name not in self.query_remove]
        for old, new in self.query_rename:
            if any(name == old for name, _ in args):
                args = [(new if name == old else name, value) for name, value in args if name != new or name == old]
        for name, template in self.query_replace:
            if any(arg == name for arg, _ in args):
                value = render(template, exchange)
                args = [(arg, value if arg == name else item) for arg, item in args]
        for name, template in self.query_add:
            if not any(arg == name for arg, _ in args):
                args.append((name, render(template, exchange)))
        for name, template in self.query_append:
            args.append((name, render(template, exchange)))
        if not args:
            return base
        encoded = [_quote(name) if value is None else _quote(name) + b"=" + _quote(value) for name, value in args]
        return base + b"?" + b"&".join(encoded)


# Framing belongs to the proxy: a transformer that could drop or rewrite these would make the
# client read the body wrong.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class ResponseTransformerHandler:
    def __init__(self, config, context):
        self.headers = HeaderEdits(
            config.remove.headers, config.rename.headers, config.replace.headers, config.add.headers,
            config.append.headers,
        )

    def response(self, exchange, status, parts):
        parts[:] = self.headers.apply(parts, exchange)
