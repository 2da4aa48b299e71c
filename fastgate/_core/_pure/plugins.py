"""The plugin runtime of the per-request path, and the built-in plugins' phase methods.

Like proxy.py, this file is both the pure-Python reference and the source of the compiled
module `fastgate._core.plugins` (through the symlink fastgate/_core/plugins.py and the
declarations of fastgate/_core/plugins.pxd).

* The chain a route runs (`PluginRun`, `Slot`) lives in proxy.py, which walks it per request.
* `Exit`: what an access phase returns to end the request with a response.
* `ConsumerInfo` / `CredentialInfo`: the consumers and key-auth credentials as the hot path
  needs them (upstream header lines formatted once, on first use).
* The built-in plugins' handlers (`KeyAuthHandler`, ...): fastgate/plugins/<name>.py subclasses
  each one, adding its NAME, PRIORITY and config Struct.

A phase method receives the proxy's `Exchange` (method, url, headers, header_parts, match,
consumer, credential, upstream_extra, ...); see the Plugin docs in fastgate/plugins/__init__.py.
"""

import calendar
import math
import os
import random
import re
import time
import uuid
from urllib.parse import unquote_to_bytes

import functools

import msgspec

from fastgate import redis_counters

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
MSG_BAD_BODY = "Cannot process request body"

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
    return decode_args(url[query_at + 1:])


def decode_args(encoded):
    """(name, value-or-None) pairs of a query string or an url-encoded form body, decoded."""
    pairs = []
    for item in encoded.split(b"&"):
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


# -- request bodies: key-auth's key_in_body, request-transformer's body edits -----------------

BODY_FORM = 1
BODY_JSON = 2
BODY_MULTIPART = 3
# The body formats kong.request.get_body reads; a body of any other type is left alone.
_BODY_FORMATS = {
    b"application/x-www-form-urlencoded": BODY_FORM,
    b"application/json": BODY_JSON,
    b"multipart/form-data": BODY_MULTIPART,
}
_BOUNDARY = re.compile(rb';\s*boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# The field name in a part's Content-Disposition (`form-data; name="x"; filename="y"`).
_FIELD_NAME = re.compile(rb'(?:^|;)\s*name=("[^"]*"|[^;\s]*)', re.IGNORECASE)


def body_format(exchange):
    """(format, multipart boundary) of the request body from its Content-Type, which the
    plugin must watch; format 0 for a body no plugin reads."""
    headers = exchange.headers
    values = headers.get(b"content-type") if headers is not None else None
    if not values:
        return 0, b""
    value = values[0]
    body_format = _BODY_FORMATS.get(value.partition(b";")[0].strip().lower(), 0)
    if body_format != BODY_MULTIPART:
        return body_format, b""
    found = _BOUNDARY.search(value)
    # Without a boundary the body cannot be split: RequestBody refuses it.
    return body_format, (found.group(1) or found.group(2)) if found is not None else b""


def multipart_fields(raw, boundary):
    """The [name, head, content] parts of a multipart/form-data body (RFC 7578); name is None
    for a part that is not a named field."""
    if not boundary:
        raise ValueError("multipart body without a boundary")
    # Every delimiter follows a CRLF (RFC 2046 5.1.1), so the boundary text inside a part's
    # content does not split it.
    pieces = (b"\r\n" + raw).split(b"\r\n--" + boundary)
    fields = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            return fields
        line_end = piece.find(b"\r\n")
        if line_end < 0 or piece[:line_end].strip(b" \t"):
            raise ValueError("malformed multipart delimiter line")
        rest = piece[line_end + 2:]
        if rest.startswith(b"\r\n"):
            head, content = b"", rest[2:]
        else:
            head, separator, content = rest.partition(b"\r\n\r\n")
            if not separator:
                raise ValueError("multipart part without the blank line after its headers")
        fields.append([_part_name(head), head, content])
    raise ValueError("multipart body without its closing delimiter")


def _disposition(head):
    """(start, end) of the Content-Disposition value in a part's head, or None."""
    start = 0
    for line in head.split(b"\r\n"):
        name, colon, _ = line.partition(b":")
        if colon and name.strip().lower() == b"content-disposition":
            return start + len(name) + 1, start + len(line)
        start += len(line) + 2
    return None


def _part_name(head):
    span = _disposition(head)
    if span is None:
        return None
    found = _FIELD_NAME.search(head, span[0], span[1])
    return found.group(1).strip(b'"') if found is not None else None


def _renamed_head(head, new):
    span = _disposition(head)
    found = _FIELD_NAME.search(head, span[0], span[1])
    return head[:found.start(1)] + b'"' + new + b'"' + head[found.end(1):]


def encode_args(pairs):
    """Url-encode (name, value-or-None) pairs (a None value is a bare flag)."""
    return b"&".join(
        [_quote(name) if value is None else _quote(name) + b"=" + _quote(value) for name, value in pairs]
    )


class RequestBody:
    """A request body (or a query string) as named fields, in order, that key-auth looks up and
    request-transformer edits: the pairs of a url-encoded form, the members of a JSON object,
    the parts of a multipart/form-data body. ValueError when it does not parse. `changed` says
    whether an edit changed anything, so an untouched body goes upstream as it came."""

    def __init__(self, body_format, boundary, raw):
        self.format = body_format
        self.boundary = boundary
        self.changed = False
        # Where a field keeps its value: [name, value] or [name, head, content]. (No negative
        # index: the compiled module is built without wraparound.)
        self.value_at = 2 if body_format == BODY_MULTIPART else 1
        self.fields = None
        self.document = None
        # The JSON object's members to look up and edit (None when the JSON is not an object).
        self.members = None
        if body_format == BODY_FORM:
            self.fields = [list(pair) for pair in decode_args(raw)]
        elif body_format == BODY_JSON:
            try:
                self.document = msgspec.json.decode(raw) if raw.strip() else {}
            except msgspec.DecodeError as exc:
                raise ValueError(f"malformed JSON body: {exc}") from None
            if type(self.document) is dict:
                self.members = self.document
        else:
            self.fields = multipart_fields(raw, boundary)

    def key(self, name):
        """A key-auth key in field `name`: (0, None) when there is none (a flag, a JSON number),
        (1, value), or (2, None) for several values (a duplicate key)."""
        if self.format == BODY_JSON:
            value = self.members.get(_text(name)) if self.members is not None else None
            if type(value) is str:
                return 1, value.encode()
            if type(value) is list or type(value) is dict:
                return 2, None
            return 0, None
        value_at = self.value_at
        values = [field[value_at] for field in self.fields if field[0] == name]
        if len(values) > 1:
            return 2, None
        if not values or values[0] is None:
            return 0, None
        return 1, values[0]

    def _set_member(self, name, value, present):
        """JSON: set member `name` when it is already there (`present`) or when it is not."""
        key = _text(name)
        if self.members is not None and (key in self.members) == present:
            self.members[key] = _text(value)
            self.changed = True

    def remove(self, names):
        if self.format == BODY_JSON:
            if self.members is not None:
                for name in names:
                    if self.members.pop(_text(name), _ABSENT) is not _ABSENT:
                        self.changed = True
            return
        kept = [field for field in self.fields if field[0] not in names]
        if len(kept) != len(self.fields):
            self.fields = kept
            self.changed = True

    def rename(self, old, new):
        if self.format == BODY_JSON:
            old_name = _text(old)
            if self.members is not None and old_name in self.members:
                self.members[_text(new)] = self.members.pop(old_name)
                self.changed = True
            return
        if not any(field[0] == old for field in self.fields):
            return
        fields = []
        for field in self.fields:
            if field[0] == old:
                field[0] = new
                if self.format == BODY_MULTIPART:
                    field[1] = _renamed_head(field[1], new)
                fields.append(field)
            elif field[0] != new:
                fields.append(field)
        self.fields = fields
        self.changed = True

    def replace(self, name, value):
        if self.format == BODY_JSON:
            self._set_member(name, value, True)
            return
        for field in self.fields:
            if field[0] == name:
                field[self.value_at] = value
                self.changed = True

    def add(self, name, value):
        if self.format == BODY_JSON:
            self._set_member(name, value, False)
        elif not any(field[0] == name for field in self.fields):
            self.append(name, value)

    def append(self, name, value):
        """Another value for `name`: a JSON member becomes an array (Kong's append_value)."""
        if self.format == BODY_JSON:
            if self.members is None:
                return
            key = _text(name)
            current = self.members.get(key, _ABSENT)
            if current is _ABSENT:
                self.members[key] = [_text(value)]
            elif type(current) is list:
                current.append(_text(value))
            else:
                self.members[key] = [current, _text(value)]
        elif self.format == BODY_MULTIPART:
            self.fields.append([name, b'Content-Disposition: form-data; name="' + name + b'"', value])
        else:
            self.fields.append([name, value])
        self.changed = True

    def encode(self):
        if self.format == BODY_JSON:
            return msgspec.json.encode(self.document)
        if self.format == BODY_FORM:
            return encode_args(self.fields)
        delimiter = b"--" + self.boundary
        out = []
        for _, head, content in self.fields:
            out.append(delimiter + b"\r\n" + (head + b"\r\n\r\n" if head else b"\r\n") + content + b"\r\n")
        out.append(delimiter + b"--\r\n")
        return b"".join(out)


_ABSENT = object()


def _text(value):
    """A field name or value as JSON text."""
    return value.decode("utf-8", "replace")


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


class ConsumerInfo:
    """A consumer as the hot path sees it."""

    def __init__(self, id, username, custom_id, acl_groups, group_ids, group_names):
        self.id = id
        self.id_bytes = id.encode()  # the rate-limit identifier by consumer
        self.username = username
        self.custom_id = custom_id
        # ACL groups in file order (Kong sends them in DB order), and the consumer groups the
        # consumer belongs to: ids sorted by group name (plugin precedence), names in that order.
        self.acl_groups = tuple(acl_groups)
        self.group_ids = tuple(group_ids)
        self.group_names = tuple(group_names)
        # The upstream header lines, formatted here rather than on first use: made while the
        # snapshot is compiled, they sit packed together instead of scattered among request
        # garbage, which cost ~0.4 us per request among 100,000 consumers (bench/README.md).
        # X-Consumer-ID / -Custom-ID / -Username (absent fields send no header):
        lines = b"X-Consumer-ID: " + id.encode() + b"\r\n"
        if custom_id is not None:
            lines += b"X-Consumer-Custom-ID: " + custom_id.encode() + b"\r\n"
        if username is not None:
            lines += b"X-Consumer-Username: " + username.encode() + b"\r\n"
        self.identity_lines = lines
        # acl's X-Consumer-Groups, without and with (include_consumer_groups) the consumer
        # groups' names.
        self.groups_line = b"X-Consumer-Groups: " + ", ".join(self.acl_groups).encode() + b"\r\n"
        self.groups_with_consumer_groups_line = (
            b"X-Consumer-Groups: " + ", ".join(self.acl_groups + self.group_names).encode() + b"\r\n"
        )


class CredentialInfo:
    """A key-auth credential: its consumer and id; `expires_at` is a time.time() (0: never)."""

    def __init__(self, id, consumer, expires_at):
        self.id = id
        self.consumer = consumer
        self.expires_at = expires_at
        # Formatted here for the reason in ConsumerInfo.
        self.lines = consumer.identity_lines + b"X-Credential-Identifier: " + id.encode() + b"\r\n"


def _strip_identity(exchange):
    """Drop a client's copies of the identity headers (only when it sent one)."""
    headers = exchange.headers
    if headers is None:
        return
    # A loop over the few watched headers the client sent, not IDENTITY_HEADERS.isdisjoint():
    # compiled, the loop is C; the method call cost ~1,000 instructions per request (callgrind).
    for name in headers:
        if name in IDENTITY_HEADERS:
            break
    else:
        return
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

    def __init__(self, consumers, consumers_by_username, key_index, counters):
        self.consumers = consumers  # id -> ConsumerInfo
        self.consumers_by_username = consumers_by_username
        self.key_index = key_index  # KeyIndex: key -> CredentialInfo
        self.counters = counters  # SharedCounters: the node's rate-limit counters
        # The instance being made: its id and what it is scoped to (None when not).
        self.plugin_id = None
        self.route_id = None
        self.service_id = None
        self.consumer_group_id = None

    def scoped(self, plugin_id, route_id, service_id, consumer_group_id):
        """This context for one plugin instance."""
        context = PluginContext(self.consumers, self.consumers_by_username, self.key_index, self.counters)
        context.plugin_id = plugin_id
        context.route_id = route_id
        context.service_id = service_id
        context.consumer_group_id = consumer_group_id
        return context

    def find_consumer(self, reference):
        """A consumer by id or username (key-auth's `anonymous`), or None."""
        found = self.consumers.get(reference)
        return found if found is not None else self.consumers_by_username.get(reference)


# -- key-auth (behavior.md 4) -----------------------------------------------------------------


class KeyAuthHandler:
    def __init__(self, config, context):
        self.key_names = tuple(canonical_header(name.encode()) for name in config.key_names)
        # A body field's name is matched as written (Kong's body[name]).
        self.body_names = tuple(name.encode() for name in config.key_names)
        self.key_in_header = config.key_in_header
        self.key_in_query = config.key_in_query
        self.key_in_body = config.key_in_body
        self.hide_credentials = config.hide_credentials
        self.run_on_preflight = config.run_on_preflight
        self.index = context.key_index
        self.anonymous_reference = config.anonymous
        self.anonymous = context.find_consumer(config.anonymous) if config.anonymous else None
        if config.realm is None:
            self.challenge = ((b"WWW-Authenticate", b"Key"),)
        else:
            self.challenge = ((b"WWW-Authenticate", b'Key realm="' + config.realm.encode() + b'"'),)
        self.watched_headers = self.key_names + tuple(IDENTITY_HEADERS) + ((b"content-type",) if self.key_in_body else ())

    def access(self, exchange):
        if not self.run_on_preflight and exchange.method == b"OPTIONS":
            return None
        if self.anonymous_reference is not None and exchange.credential is not None:
            return None  # logical OR: an earlier auth plugin has authenticated the request
        body = None
        message = None
        if self.key_in_body:
            # As in Kong, a body the plugin can read is read before any lookup: a key in the
            # body under the first name beats one in a header under the second, and
            # hide_credentials strips the name from the body too.
            body_format_found, boundary = body_format(exchange)
            if body_format_found:
                raw = exchange.read_body()
                if raw is None:
                    return None  # asked again once the body is there; nothing changed yet
                try:
                    body = RequestBody(body_format_found, boundary, raw)
                except ValueError:
                    message = MSG_BAD_BODY
        if message is None:
            message = self.authenticate(exchange, body)
            if message is None:
                return None
        if self.anonymous_reference is None:
            if message == MSG_BAD_BODY:
                return Exit(400, message)
            return Exit(401, message, self.challenge)
        consumer = self.anonymous
        if consumer is None:
            return Exit(500, "anonymous consumer " + self.anonymous_reference + " is configured but doesn't exist")
        _strip_identity(exchange)
        exchange.consumer = consumer
        _add_upstream(exchange, consumer.identity_lines + b"X-Anonymous-Consumer: true\r\n")
        return None

    def authenticate(self, exchange, body):
        """None when a valid key was presented, else the 401 message. Per name in order:
        header, query, body (behavior.md 4)."""
        key = None
        headers = exchange.headers
        for position in range(len(self.key_names)):
            name = self.key_names[position]
            if self.key_in_header and headers is not None:
                values = headers.get(name)
                if values is not None:
                    if len(values) > 1:
                        return MSG_DUPLICATE_KEY
                    key = values[0]
            if key is None and self.key_in_query:
                values = [value for arg, value in query_args(exchange.url) if canonical_header(arg) == name]
                if values:
                    if len(values) > 1:
                        return MSG_DUPLICATE_KEY
                    key = values[0] if values[0] is not None else b""
            if key is None and body is not None:
                count, value = body.key(self.body_names[position])
                if count > 1:
                    return MSG_DUPLICATE_KEY
                if count:
                    key = value
            if key is not None:
                if self.hide_credentials:
                    self.hide(exchange, position, body)
                break
        if not key:
            return MSG_NO_KEY
        credential = self.index.lookup(key)
        if credential is None or (credential.expires_at and credential.expires_at <= time.time()):
            return MSG_UNAUTHORIZED
        _strip_identity(exchange)
        exchange.consumer = credential.consumer
        exchange.credential = credential
        _add_upstream(exchange, credential.lines)
        return None

    def hide(self, exchange, position, body):
        """hide_credentials: the key's name leaves the headers, the query and the body,
        wherever the key was found (Kong)."""
        name = self.key_names[position]
        exchange.header_parts = without_headers(exchange.header_parts, frozenset((name,)))
        names = {arg for arg, _ in query_args(exchange.url) if canonical_header(arg) == name}
        if names:
            path = exchange.upstream_path or exchange.match.upstream_path
            exchange.upstream_path = url_without_args(path, names)
        if body is not None:
            body.remove(frozenset((self.body_names[position],)))
            if body.changed:
                exchange.body = body.encode()


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
                _add_upstream(exchange, consumer.groups_with_consumer_groups_line if self.include_consumer_groups
                              else consumer.groups_line)
        return None


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


def field_item(item):
    name, _, value = item.partition(":")
    return name.encode(), parse_template(value)


class FieldEdits:
    """request-transformer's edits of the query string or of the body's fields (a
    RequestBody), in Kong's order: remove, rename, replace, add, append."""

    def __init__(self, remove, rename, replace, add, append):
        self.remove = frozenset(name.encode() for name in remove)
        self.rename = tuple((old.encode(), new.encode()) for old, _, new in (item.partition(":") for item in rename))
        self.replace = tuple(field_item(item) for item in replace)
        self.add = tuple(field_item(item) for item in add)
        self.append = tuple(field_item(item) for item in append)
        self.empty = not (self.remove or self.rename or self.replace or self.add or self.append)

    def apply(self, fields, exchange):
        if self.remove:
            fields.remove(self.remove)
        for old, new in self.rename:
            fields.rename(old, new)
        for name, template in self.replace:
            fields.replace(name, render(template, exchange))
        for name, template in self.add:
            fields.add(name, render(template, exchange))
        for name, template in self.append:
            fields.append(name, render(template, exchange))


# http_method set to one of these moves the form body's fields into the query string (Kong).
_QUERY_METHODS = frozenset({b"GET", b"HEAD", b"TRACE"})


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
        self.query_edits = FieldEdits(
            config.remove.querystring, config.rename.querystring, config.replace.querystring,
            config.add.querystring, config.append.querystring,
        )
        self.body_edits = FieldEdits(
            config.remove.body, config.rename.body, config.replace.body, config.add.body, config.append.body,
        )
        self.method_to_query = self.method in _QUERY_METHODS
        reads_body = not self.body_edits.empty or self.method_to_query
        self.watched_headers = (b"content-type",) if reads_body else ()

    def access(self, exchange):
        # Kong's order: uri, method, headers, body, querystring. The body is read first, since
        # the access phase is asked again from the start once it has arrived.
        raw = None
        body_format_found = 0
        boundary = b""
        if self.watched_headers:
            body_format_found, boundary = body_format(exchange)
            if body_format_found == BODY_FORM or (body_format_found and not self.body_edits.empty):
                raw = exchange.read_body()
                if raw is None:
                    return None
        match = exchange.match
        path = exchange.upstream_path or (match.upstream_path if match is not None else exchange.url)
        if self.uri is not None:
            query_at = path.find(b"?")
            new_path = render(self.uri, exchange)
            path = new_path + (path[query_at:] if query_at >= 0 else b"")
            exchange.upstream_path = path
        if self.method:
            exchange.method = self.method
            if self.method_to_query and body_format_found == BODY_FORM and raw:
                moved = encode_args(decode_args(raw))
                if moved:
                    path = path + (b"&" if b"?" in path else b"?") + moved
                    exchange.upstream_path = path
        if not self.headers.empty:
            if self.host is not None:
                exchange.upstream_host = render(self.host, exchange)
            exchange.header_parts = self.headers.apply(exchange.header_parts, exchange)
        if raw is not None and not self.body_edits.empty:
            try:
                fields = RequestBody(body_format_found, boundary, raw)
            except ValueError:
                fields = None  # a body that does not parse goes on untouched (Kong)
            if fields is not None:
                self.body_edits.apply(fields, exchange)
                if fields.changed:
                    exchange.body = fields.encode()
        if not self.query_edits.empty:
            exchange.upstream_path = self.transform_query(path, exchange)
        return None

    def transform_query(self, path, exchange):
        base, _, query = path.partition(b"?")
        args = RequestBody(BODY_FORM, b"", query)
        self.query_edits.apply(args, exchange)
        encoded = args.encode()
        return base + b"?" + encoded if encoded else base


# -- rate-limiting and rate-limiting-advanced (behavior.md 6) ---------------------------------

LIMIT_BY_CONSUMER = 0
LIMIT_BY_CREDENTIAL = 1
LIMIT_BY_IP = 2
LIMIT_BY_SERVICE = 3
LIMIT_BY_HEADER = 4
LIMIT_BY_PATH = 5
LIMIT_BY_CONSUMER_GROUP = 6
LIMIT_BY = {
    "consumer": LIMIT_BY_CONSUMER, "credential": LIMIT_BY_CREDENTIAL, "ip": LIMIT_BY_IP,
    "service": LIMIT_BY_SERVICE, "header": LIMIT_BY_HEADER, "path": LIMIT_BY_PATH,
    "consumer-group": LIMIT_BY_CONSUMER_GROUP,
}
MSG_RATE_LIMITED = "API rate limit exceeded"
MSG_UNEXPECTED = "An unexpected error occurred"
# Kong's names of the usual windows, in the X-RateLimit-* header names.
WINDOW_NAMES = {1: "Second", 60: "Minute", 3600: "Hour", 86400: "Day", 2592000: "Month", 31536000: "Year"}
# rate-limiting's periods and their lengths in seconds (Kong's counter expirations).
PERIODS = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400), ("month", 2592000), ("year", 31536000))
UNSCOPED = "00000000-0000-0000-0000-000000000000"


class RateLimitBase:
    """What both rate-limiting plugins share: whose requests count together (the identifier,
    falling back to the client address when the chosen one is missing, as in Kong), and the
    response headers of the decision."""

    def init_identifier(self, config, context, limit_by):
        self.limit_by = LIMIT_BY[limit_by]
        self.header_name = canonical_header(config.header_name.encode()) if config.header_name else b""
        self.path = config.path.encode() if config.path else b""
        self.scope_group = context.consumer_group_id.encode() if context.consumer_group_id else b""
        self.counters = context.counters
        self.hide_client_headers = config.hide_client_headers
        self.error_code = config.error_code
        self.error_message = config.error_message
        self.watched_headers = (self.header_name,) if self.header_name else ()
        # The redis policy / strategy: this worker's connection, made on the first request.
        self.redis = None
        self.redis_config = None
        self.fault_tolerant = True
        # sync_rate > 0: counted on this worker, added to Redis every sync_rate seconds.
        self.sync_rate = 0.0
        self.synced = None
        self.plugin_id = context.plugin_id or ""

    def synced_for(self, exchange):
        synced = self.synced
        if synced is None:
            synced = self.synced = redis_counters.synced_counts(
                exchange.client.loop, self.redis_config, self.plugin_id, self.sync_rate)
        return synced

    def redis_check(self, exchange, request, now, starts):
        """Send a check to Redis: the future the request waits on (no Task), or None when Redis
        is down, in which case the caller decides without it."""
        redis = self.redis
        if redis is None:
            redis = self.redis = redis_counters.connection(exchange.client.loop, self.redis_config)
        future = exchange.client.loop.create_future()
        if redis.call(request, functools.partial(self.redis_answered, now, starts, exchange, future)):
            return future
        return None

    def redis_failed(self, exchange):
        """Redis could not decide: the node's counters do (fault_tolerant), or a 500."""
        if self.fault_tolerant:
            return self.local(exchange)
        return Exit(500, MSG_UNEXPECTED)

    def redis_answered(self, now, starts, exchange, future, reply):
        if future.done():
            return  # the request is gone (its client disconnected)
        if isinstance(reply, Exception):
            future.set_result(self.redis_failed(exchange))
        else:
            future.set_result(self.decided(exchange, now, starts, reply[0] - 1, reply[1:]))

    def decided(self, exchange, now, starts, denied, values):
        """The answer to a check that `denied` (a window's index, or -1) with these usages or
        rates: the headers for the response, and the Exit of a denial."""
        if not self.hide_client_headers:
            lines = self.headers(now, starts, values, denied)
            if exchange.response_headers is None:
                exchange.response_headers = lines
            else:
                exchange.response_headers.extend(lines)  # two limits on one route
        if denied >= 0:
            return Exit(self.error_code, self.error_message)
        return None

    def local(self, exchange):
        """The check in the node's counters (each plugin's own windows)."""
        raise NotImplementedError

    def headers(self, now, starts, values, denied):
        """The response headers of a decision (each plugin's own)."""
        raise NotImplementedError

    def summary(self, parts, lowest, remaining, reset, retry_after):
        """`RateLimit-Limit/-Remaining/-Reset` of the window that leads, and `Retry-After` when
        the request was denied (`retry_after` >= 0)."""
        parts.extend(self.summary_lines[lowest])
        parts.append(self.counters.decimal(remaining))
        parts.append(b"\r\n")
        parts.extend(RESET_LINE)
        parts.append(self.counters.decimal(reset))
        parts.append(b"\r\n")
        if retry_after >= 0:
            parts.extend(RETRY_AFTER_LINE)
            parts.append(self.counters.decimal(retry_after))
            parts.append(b"\r\n")

    def identifier(self, exchange):
        limit_by = self.limit_by
        if limit_by == LIMIT_BY_CONSUMER:
            if exchange.consumer is not None:
                return exchange.consumer.id_bytes
            if exchange.credential is not None:
                return exchange.credential.id.encode()
        elif limit_by == LIMIT_BY_CREDENTIAL:
            if exchange.credential is not None:
                return exchange.credential.id.encode()
        elif limit_by == LIMIT_BY_SERVICE:
            if exchange.match is not None and exchange.match.service is not None:
                return exchange.match.service.id.encode()
        elif limit_by == LIMIT_BY_HEADER:
            values = exchange.headers.get(self.header_name) if exchange.headers is not None else None
            if values:
                return values[0]
        elif limit_by == LIMIT_BY_PATH:
            url = exchange.url
            query_at = url.find(b"?")
            if (url if query_at < 0 else url[:query_at]) == self.path:
                return self.path
        elif limit_by == LIMIT_BY_CONSUMER_GROUP:
            if self.scope_group:
                return self.scope_group
            if exchange.consumer is not None and exchange.consumer.group_ids:
                return exchange.consumer.group_ids[0].encode()
        return exchange.client.peer


RESET_LINE = (b"RateLimit-Reset", b": ")
RETRY_AFTER_LINE = (b"Retry-After", b": ")


def header_lines(names, limits):
    """The fixed parts of the rate-limit headers, made once per plugin instance: per window
    `X-RateLimit-Limit-<name>: <limit>` and the start of `X-RateLimit-Remaining-<name>`; per
    window that may lead, `RateLimit-Limit: <limit>` and the start of `RateLimit-Remaining`.
    A request appends only its numbers (and each line keeps the name, b": ", value, b"\r\n"
    layout the response phase of other plugins reads)."""
    window_lines = []
    summary_lines = []
    for name, limit in zip(names, limits):
        shown = b"%d" % limit if limit == int(limit) else repr(float(limit)).encode()
        window_lines.append((b"X-RateLimit-Limit-" + name.encode(), b": ", shown, b"\r\n",
                             b"X-RateLimit-Remaining-" + name.encode(), b": "))
        summary_lines.append((b"RateLimit-Limit", b": ", shown, b"\r\n", b"RateLimit-Remaining", b": "))
    return tuple(window_lines), tuple(summary_lines)


class RateLimitingHandler(RateLimitBase):
    """rate-limiting (behavior.md 6.1), policy local: fixed calendar windows (UTC), a request
    that would exceed a window is denied and counts nowhere."""

    def __init__(self, config, context):
        self.init_identifier(config, context, config.limit_by)
        periods = [(name, seconds, getattr(config, name)) for name, seconds in PERIODS if getattr(config, name)]
        # Kong's counter names: ratelimit:<route>:<service>:<identifier>:<window start>:<period>,
        # with the plugin's own scope (a global instance counts across all routes).
        scope = "ratelimit:%s:%s" % (context.route_id or UNSCOPED, context.service_id or UNSCOPED)
        self.scope = scope.encode()
        self.names = tuple(name.encode() for name, _, _ in periods)
        self.seconds = tuple(seconds for _, seconds, _ in periods)
        self.windows = tuple(seconds * 1000 for _, seconds, _ in periods)
        self.limits = tuple(float(limit) for _, _, limit in periods)
        self.window_lines, self.summary_lines = header_lines(
            [WINDOW_NAMES[seconds] for _, seconds, _ in periods], [limit for _, _, limit in periods]
        )
        if config.policy == "redis":
            self.redis_config = config.redis
            self.fault_tolerant = config.fault_tolerant
            self.sync_rate = config.sync_rate if config.sync_rate > 0 else 0.0
            count = len(periods)
            # EVALSHA <sha> <n> <keys...> <limits...> <lifetimes...>: all but the keys made here.
            self.redis_prefix = b"*%d\r\n" % (3 + 3 * count) + redis_counters.bulk(
                (b"EVALSHA", redis_counters.FIXED_SHA, b"%d" % count)
            )
            self.redis_suffix = redis_counters.bulk(
                [repr(limit).encode() for limit in self.limits] + [b"%d" % seconds for seconds in self.seconds]
            )

    def window_starts(self, now):
        """Each period's window start in ms: fixed calendar windows in UTC."""
        starts = []
        for seconds in self.seconds:
            if seconds < 2592000:
                starts.append(int(now // seconds) * seconds * 1000)
            else:
                moment = time.gmtime(now)
                month = moment.tm_mon if seconds == 2592000 else 1
                starts.append(calendar.timegm((moment.tm_year, month, 1, 0, 0, 0)) * 1000)
        return tuple(starts)

    def access(self, exchange):
        if self.redis_config is None:
            return self.local(exchange)
        if self.sync_rate > 0:
            return self.synced_check(exchange)
        now = time.time()
        starts = self.window_starts(now)
        request = self.redis_prefix + redis_counters.bulk(self.keys(exchange, starts)) + self.redis_suffix
        future = self.redis_check(exchange, request, now, starts)
        return future if future is not None else self.redis_failed(exchange)

    def keys(self, exchange, starts):
        """The counters in Redis (Kong's names, the window start in each)."""
        prefix = self.scope + b":" + self.identifier(exchange) + b":"
        return tuple([prefix + b"%d:" % starts[i] + self.names[i] for i in range(len(self.names))])

    def local(self, exchange):
        now = time.time()
        starts = self.window_starts(now)
        # A slot of the node's counters keeps its window start itself: no start in the key.
        prefix = self.scope + b":" + self.identifier(exchange) + b":"
        keys = tuple([prefix + name for name in self.names])
        denied, usages = self.counters.take_fixed(keys, starts, self.windows, self.limits)
        return self.decided(exchange, now, starts, denied, usages)

    def synced_check(self, exchange):
        """sync_rate > 0: the totals of the last sync plus this worker's counts since."""
        now = time.time()
        starts = self.window_starts(now)
        keys = self.keys(exchange, starts)
        synced = self.synced_for(exchange)
        usages = [synced.count(key) for key in keys]
        denied = -1
        for i in range(len(keys)):
            if self.limits[i] - usages[i] <= 0:
                denied = i
                break
        if denied < 0:
            for i in range(len(keys)):
                synced.add(keys[i], self.seconds[i], starts[i] / 1000 + self.seconds[i])
        return self.decided(exchange, now, starts, denied, usages)

    def headers(self, now, starts, values, denied):
        parts = []
        lowest = -1
        lowest_remaining = 0.0
        for i in range(len(self.limits)):
            remaining = self.limits[i] - values[i]
            # The request counts in every window when allowed, only in the one that denied it
            # otherwise (Kong shows remaining - 1 for those).
            shown = remaining - 1 if denied < 0 or denied == i else remaining
            parts.extend(self.window_lines[i])
            parts.append(self.counters.decimal(int(shown) if shown > 0 else 0))
            parts.append(b"\r\n")
            # RateLimit-*: the period with the least left; on a tie the longer one (later here).
            if lowest < 0 or remaining <= lowest_remaining:
                lowest = i
                lowest_remaining = remaining
        reset = max(1, self.seconds[lowest] - int((now * 1000 - starts[lowest]) // 1000))
        shown = lowest_remaining - 1 if denied < 0 or denied == lowest else lowest_remaining
        self.summary(parts, lowest, int(shown) if shown > 0 else 0, reset, reset if denied >= 0 else -1)
        return parts


class RateLimitingAdvancedHandler(RateLimitBase):
    """rate-limiting-advanced (behavior.md 6.2), strategy local: sliding (or fixed) windows of
    any size; the sliding rate is the current window's count plus the previous window's
    weighted by the part of it still inside the sliding window."""

    def __init__(self, config, context):
        self.init_identifier(config, context, config.identifier)
        pairs = sorted(zip(config.limit, config.window_size))  # by limit (Kong sorts them)
        self.limits = tuple(float(limit) for limit, _ in pairs)
        self.sizes = tuple(size for _, size in pairs)
        self.windows = tuple(size * 1000 for size in self.sizes)
        self.sliding = config.window_type == "sliding"
        self.penalty = not config.disable_penalty
        self.jitter = config.retry_after_jitter_max
        namespace = config.namespace or context.plugin_id or ""
        self.suffixes = tuple(b"|%d" % size for size in self.sizes)
        self.prefix = namespace.encode() + b"|"
        self.window_lines, self.summary_lines = header_lines(
            [WINDOW_NAMES.get(size, str(size)) for size in self.sizes], self.limits
        )
        # strategy redis with sync_rate 0 checks in Redis; sync_rate -1 keeps the counters in
        # memory only (Kong), which is the node's shared counters.
        if config.strategy == "redis" and config.sync_rate >= 0:
            self.redis_config = config.redis
            self.sync_rate = config.sync_rate
            count = len(self.sizes)
            # EVALSHA <sha> <2n> <keys...> <limits...> <lifetimes...> <penalty> <weights...>:
            # all but the keys and the weights made here.
            self.redis_prefix = b"*%d\r\n" % (4 + 5 * count) + redis_counters.bulk(
                (b"EVALSHA", redis_counters.SLIDING_SHA, b"%d" % (2 * count))
            )
            self.redis_suffix = redis_counters.bulk(
                [repr(limit).encode() for limit in self.limits] + [b"%d" % (2 * size) for size in self.sizes]
                + [b"1" if self.penalty else b"0"]
            )

    def windows_now(self, now):
        """Each window's start (ms) and the weight of the window before it."""
        starts = []
        weights = []
        now_ms = int(now * 1000)
        for i in range(len(self.windows)):
            window = self.windows[i]
            start = now_ms - now_ms % window
            starts.append(start)
            # The previous window still covers (W - elapsed) / W of the sliding window.
            weights.append((window - (now_ms - start)) / window if self.sliding else 0.0)
        return starts, weights

    def redis_keys(self, exchange, starts):
        """Per window, the names of its current and previous counters in Redis."""
        prefix = self.prefix + self.identifier(exchange)
        keys = []
        for i in range(len(self.windows)):
            keys.append(prefix + self.suffixes[i] + b"|%d" % starts[i])
            keys.append(prefix + self.suffixes[i] + b"|%d" % (starts[i] - self.windows[i]))
        return keys

    def synced_check(self, exchange):
        """sync_rate > 0: the totals of the last sync plus this worker's counts since."""
        now = time.time()
        starts, weights = self.windows_now(now)
        keys = self.redis_keys(exchange, starts)
        synced = self.synced_for(exchange)
        denied = -1
        rates = []
        counted = 0
        for i in range(len(self.windows)):
            lifetime = 2 * self.sizes[i]
            expires_at = starts[i] / 1000 + lifetime
            synced.watch(keys[2 * i + 1], lifetime, expires_at)
            current = synced.count(keys[2 * i])
            if denied < 0:
                current += 1
                counted = i + 1
            rate = current + synced.count(keys[2 * i + 1]) * weights[i]
            rates.append(rate)
            if denied < 0 and rate > self.limits[i]:
                denied = i
        if denied < 0 or self.penalty:
            for i in range(counted):
                synced.add(keys[2 * i], 2 * self.sizes[i], starts[i] / 1000 + 2 * self.sizes[i])
        return self.decided(exchange, now, starts, denied, rates)

    def access(self, exchange):
        if self.redis_config is None:
            return self.local(exchange)
        if self.sync_rate > 0:
            return self.synced_check(exchange)
        now = time.time()
        starts, weights = self.windows_now(now)
        keys = self.redis_keys(exchange, starts)
        request = (self.redis_prefix + redis_counters.bulk(keys) + self.redis_suffix
                   + redis_counters.bulk([repr(weight).encode() for weight in weights]))
        future = self.redis_check(exchange, request, now, starts)
        return future if future is not None else self.redis_failed(exchange)

    def local(self, exchange):
        now = time.time()
        starts, weights = self.windows_now(now)
        prefix = self.prefix + self.identifier(exchange)
        if len(self.windows) == 1:
            # One window (the usual tier): a check without tuples (~1 us less, bench/README.md).
            rate = self.counters.hit(prefix + self.suffixes[0], starts[0], self.windows[0], self.limits[0],
                                     weights[0], self.penalty)
            return self.decided(exchange, now, starts, 0 if rate > self.limits[0] else -1, [rate])
        keys = tuple([prefix + suffix for suffix in self.suffixes])
        denied, rates = self.counters.take_sliding(keys, tuple(starts), self.windows, self.limits, tuple(weights),
                                                   self.penalty)
        return self.decided(exchange, now, starts, denied, rates)

    def headers(self, now, starts, values, denied):
        parts = []
        lowest = -1
        lowest_remaining = 0.0
        lowest_rate = 0.0
        for i in range(len(self.limits)):
            rate = float(values[i])  # from Redis the rates are strings
            remaining = self.limits[i] - rate
            if remaining < 0:
                remaining = 0.0
            parts.extend(self.window_lines[i])
            parts.append(self.counters.decimal(int(remaining)))
            parts.append(b"\r\n")
            # RateLimit-*: the window with the least left; on a tie the larger one.
            if lowest < 0 or remaining < lowest_remaining or (
                remaining == lowest_remaining and self.sizes[i] >= self.sizes[lowest]
            ):
                lowest = i
                lowest_remaining = remaining
                lowest_rate = rate
        size = self.sizes[lowest]
        reset = max(1, size - int(now - starts[lowest] / 1000))
        if self.sliding and lowest_rate > self.limits[lowest]:
            # Until the weighted previous window has slid far enough for one more request.
            reset = int(math.ceil(reset + (lowest_rate - self.limits[lowest]) / self.limits[lowest] * size))
        retry_after = reset + (random.randint(0, self.jitter) if self.jitter else 0) if denied >= 0 else -1
        self.summary(parts, lowest, int(lowest_remaining), reset, retry_after)
        return parts


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
