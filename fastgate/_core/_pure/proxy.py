"""The data plane's per-request path: HTTP/1.1 client and upstream protocols on uvloop.

This file is both the pure-Python reference and the source of the compiled module: setup.py
compiles it (through the symlink fastgate/_core/proxy.py) as `fastgate._core.proxy` with the
declarations of fastgate/_core/proxy.pxd (Cython's "augmenting .pxd"), so the twins cannot
drift apart. Nothing here may need Cython at run time.

Design, as measured in shared/perf-notes.md ("Measured prototypes"): httptools (llhttp) parses
both sides; routing and the upstream request head are done inside the parser callbacks; no
Task and no aiohttp object per request; the response is written to the client once per
upstream read, so an SSE event leaves when it arrives. Interpreted, that design proxied at
0.65x nginx; as cdef classes at 0.76x (15 us of CPU per request).
"""

import asyncio
import functools
import logging
import os
from http import HTTPStatus

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from fastgate import __version__

SERVER_TOKEN = b"fastgate/" + __version__.encode()
VIA_HTTP11 = b"1.1 " + SERVER_TOKEN
log = logging.getLogger("fastgate.proxy")

# A request head above 32 KiB or 100 header lines is refused with 431: nginx (and so Kong)
# holds a head in 4 x 8 KiB buffers, so Kong users never sent more.
MAX_HEAD_BYTES = 32768
MAX_HEADER_LINES = 100
# Requests parsed ahead of the one being answered (HTTP pipelining): past 16, the client's
# reads pause until the queue drains (aiohttp bounds it at 32 for the same reason).
MAX_PIPELINED = 16
# Request body bytes held while no upstream connection can take them yet (connecting, or a
# pipelined request waiting its turn): past 64 KiB the client's reads pause.
MAX_HELD_BODY = 65536
# A plugin that reads the whole request body before it decides (key-auth's key_in_body,
# request-transformer's body edits) has it buffered up to 1 MiB (nginx's client_max_body_size
# default); a larger body is answered 413 instead of growing the worker.
MAX_BUFFERED_BODY = 1048576
# Idle keep-alive connections kept per upstream, and for how long.
MAX_IDLE_PER_UPSTREAM = 256
UPSTREAM_IDLE_SECONDS = 60.0
# Client side: an idle keep-alive connection lives 75 s (nginx's keepalive_timeout); a client
# that stalls while sending a request or reading a response gets 60 s (client_header_timeout,
# client_body_timeout, send_timeout).
CLIENT_KEEPALIVE_SECONDS = 75.0
CLIENT_STALL_SECONDS = 60.0
# A response that went out before its request body ended is followed by a lingering close:
# the rest of the body is read and dropped for up to 30 s (nginx's lingering_time), because
# closing under a client that is still sending resets the connection and the client sees the
# reset instead of the response (an early 401 or 404 on an upload).
LINGER_SECONDS = 30.0
# Timeouts are checked by one ticker per worker instead of a timer per request.
TICK_SECONDS = 0.05
CLIENT_CHECK_EVERY_TICKS = 20
NEVER = float("inf")

# Request headers the client may not forward: hop-by-hop ones (RFC 9110 7.6.1 plus the
# httpoxy `Proxy`), and the ones the gateway sets itself (Kong's list, under our names).
_REQUEST_DROPPED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"host", b"x-forwarded-for", b"x-forwarded-proto",
        b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-path", b"x-forwarded-prefix",
        b"x-real-ip", b"x-fastgate-request-id", b"via",
    }
)
_RESPONSE_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"trailer", b"upgrade", b"via"}
)
# A stale pooled connection is retried once for these (RFC 9110 9.2.2).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Reason phrases for the statuses the gateway answers with itself (plugins may use any).
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
MSG_NO_ROUTE = "no Route matched with those values"
MSG_BAD_GATEWAY = "An invalid response was received from the upstream server"
MSG_TIMEOUT = "The upstream server is timing out"
MSG_BAD_REQUEST = "Bad request"
MSG_HEAD_TOO_LARGE = "Request header or cookie too large"
MSG_URI_TOO_LONG = "Request-URI too long"
MSG_BODY_TOO_LARGE = "Payload too large"
MSG_UNEXPECTED = "An unexpected error occurred"
JSON_TYPE = b"application/json; charset=utf-8"


# -- the plugin chain of a route (plugins themselves: fastgate/_core/_pure/plugins.py) ---------


def _phase(instance, name):
    method = getattr(instance, name, None)
    if method is not None and not callable(method):
        raise TypeError(f"{type(instance).__name__}.{name} is a phase name and must be a method")
    return method


class PluginRun:
    """One plugin instance as a request runs it: its phase methods bound once, at snapshot
    compile time, so the proxy calls `run.access(exchange)` without an attribute lookup."""

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
    (behavior.md 3.1) resolved when the snapshot is compiled; only the consumer-dependent part
    is chosen per request, after authentication. `static` is the best instance that does not
    depend on the consumer (route + service, route, service, global); `by_consumer` /
    `by_group` map a consumer or consumer group id to (level, instance), level being the rank
    in behavior.md 3.1 (1 is best)."""

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


class ClientRejected(Exception):
    """Raised inside a parser callback to stop parsing a request the gateway refuses."""


def error_body(message, request_id):
    # Kong's kong.response.error() template, byte for byte (behavior.md 0.1).
    return b'{\n  "message":"%s",\n  "request_id":"%s"\n}' % (message.encode(), request_id)


class ErrorTemplate:
    """FASTGATE_ERROR_TEMPLATE: a team's own error body, with `{message}`, `{status}` and
    `{request_id}` replaced (the message JSON-escaped, since templates are mostly JSON)."""

    def __init__(self, template, content_type):
        self.template = template
        self.content_type = content_type.encode()

    def render(self, status, message, request_id):
        escaped = message.replace("\\", "\\\\").replace('"', '\\"')
        return (
            self.template.replace("{message}", escaped).replace("{status}", str(status))
            .replace("{request_id}", request_id.decode()).encode()
        )


class Stats:
    """Counters behind GET /status (Kong's names)."""

    def __init__(self):
        self.connections_accepted = 0
        self.total_requests = 0


class Gateway:
    """One worker's data plane: the live snapshot, the upstream pools, the timeout ticker."""

    def __init__(self, loop, snapshot):
        self.loop = loop
        self.snapshot = snapshot
        self.pools = {}
        self.clients = set()
        self.upstreams = set()
        self.connecting = set()
        self.stats = Stats()
        self.draining = False
        self.tick_count = 0
        self.ticker = None
        self.ssl_context = None
        self.error_template = None
        self.connection_serial = 0
        # The loop's clock as read at the start of the current uvloop callback: every read of
        # a client or upstream sets it, and the rest of that callback uses it. One clock read
        # per read instead of nine per exchange (about 0.1 us each).
        self.now = loop.time()
        # Request ids: 64 random bits per worker + a 64-bit counter = 32 lowercase hex, unique
        # without a urandom call per request.
        self.request_id_prefix = os.urandom(8).hex().encode()
        self.request_counter = 0

    def start(self):
        self.ticker = self.loop.call_later(TICK_SECONDS, self.tick)

    def stop(self):
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None

    def set_snapshot(self, snapshot):
        self.snapshot = snapshot

    def upstream_ssl_context(self):
        # Upstream certificates are verified against the system's CAs (secure by default;
        # Kong's tls_verify knobs are not supported yet).
        if self.ssl_context is None:
            import ssl

            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def protocol_factory(self, listen_port, scheme):
        def factory():
            return ClientConnection(self, listen_port, scheme)

        return factory

    def next_request_id(self):
        self.request_counter += 1
        return self.request_id_prefix + b"%016x" % self.request_counter

    def pool_for(self, service):
        key = (service.protocol, service.host, service.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = UpstreamPool(self, service.host, service.port, service.protocol == "https")
            self.pools[key] = pool
        return pool

    def tick(self):
        now = self.now = self.loop.time()
        for upstream in list(self.upstreams):
            if upstream.deadline <= now:
                upstream.expire(now)
        for attempt in list(self.connecting):
            if attempt.deadline <= now:
                attempt.expire()
        self.tick_count += 1
        if self.tick_count % CLIENT_CHECK_EVERY_TICKS == 0:
            for client in list(self.clients):
                if client.deadline <= now:
                    client.expire()
        self.ticker = self.loop.call_later(TICK_SECONDS, self.tick)

    def begin_drain(self):
        """Finish what is in flight, take nothing new: idle clients are closed now, busy
        ones after their current response (answered with Connection: close)."""
        self.draining = True
        for client in list(self.clients):
            if client.current is None and client.parsing is None:
                client.close()

    def status(self):
        reading = writing = waiting = 0
        for client in self.clients:
            if client.current is not None:
                writing += 1
            elif client.parsing is not None:
                reading += 1
            else:
                waiting += 1
        return {
            "connections_accepted": self.stats.connections_accepted,
            "connections_handled": self.stats.connections_accepted,
            "connections_active": len(self.clients),
            "connections_reading": reading,
            "connections_writing": writing,
            "connections_waiting": waiting,
            "total_requests": self.stats.total_requests,
        }


class Exchange:
    """One request and its response, from the client's first byte to the response's last."""

    def __init__(self, snapshot, started):
        self.snapshot = snapshot
        self.started = started
        # Read once here, not once per header line (a Struct attribute is a Python getattr).
        self.watched = snapshot.watched_headers or None
        self.dashed_lengths = snapshot.dashed_lengths
        self.client = None
        self.url = b""
        self.method = b""
        self.http_version = "1.1"
        self.host = b""
        self.has_host = False
        self.forwarded_for = b""
        self.via = b""
        self.connection_tokens = b""
        self.header_parts = []
        # The headers someone looks at by name (routes, plugins), by canonical name
        # (plugins.canonical_header): only those, so nobody pays for a dict of every header.
        self.headers = None
        self.head_size = 0
        self.header_lines = 0
        self.keep_alive = True
        self.chunked = False
        self.announced_body = False
        self.has_body = False
        self.body_complete = False
        # Body bytes that arrived before an upstream connection could take them, as sent (the
        # chunked framing is added when they go out); held_paused: holding them paused the
        # client's reads.
        self.held_body = []
        self.held_body_size = 0
        self.held_paused = False
        # The whole body once a plugin read it (read_body), or a plugin's replacement for it:
        # it then goes upstream with a Content-Length of its own.
        self.body = None
        self.body_wanted = False
        self.waiting_run = None
        self.request_id = b""
        self.match = None
        self.upstream_head = b""
        self.head_written_at = 0.0
        self.retried_stale = False
        self.attempts_left = 0
        self.response_started = False
        self.upstream = None
        self.status = 0
        # Plugins (fastgate/_core/_pure/plugins.py): the route's slots, where the access
        # phase resumes after a plugin waited, who authenticated, what goes upstream in
        # addition or instead, and which plugins' later phases run.
        self.chain = None
        self.plugin_index = 0
        self.consumer = None
        self.credential = None
        self.authenticated_groups = None
        self.upstream_extra = None
        self.upstream_path = b""
        self.upstream_host = b""
        self.responders = None
        # Header lines (name, b": ", value, b"\r\n", ...) the access phase set for the client's
        # response, proxied or not (Kong's kong.response.set_header in access: rate-limit headers).
        self.response_headers = None
        self.body_filters = None
        self.loggers = None
        self.correlation_id = b""
        self.cors_preflight = False
        self.plugin_data = None

    def read_body(self):
        """The whole request body, for a plugin that must see it before it decides; b"" when
        the request has none. None while it is still arriving: the plugin then returns None from
        its access phase (changing nothing before this call), and that access phase is called
        again once the body is complete. A body over MAX_BUFFERED_BODY is answered 413."""
        body = self.body
        if body is not None:
            return body
        if not self.body_complete:
            self.body_wanted = True
            return None
        if not self.held_body:
            return b""
        body = self.body = b"".join(self.held_body)
        return body


class ClientConnection:
    """The protocol of one client connection (uvloop calls it; httptools calls it back)."""

    def __init__(self, gateway, listen_port, scheme):
        self.gateway = gateway
        self.loop = gateway.loop
        self.listen_port = listen_port
        self.forwarded_headers = b""
        self.scheme = scheme
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self.local_address = b""
        self.serial = 0
        self.requests = 0
        self.parsing = None
        self.current = None
        self.pending = None
        self.closed = False
        self.write_paused = False
        self.read_pauses = 0
        self.reject_status = 0
        self.broken = False
        self.lingering = False
        self.deadline = NEVER

    # -- uvloop callbacks ---------------------------------------------------------------------

    def connection_made(self, transport):
        # No TCP_NODELAY call here: uvloop sets it on every TCP transport (handles/tcp.pyx), so
        # a small SSE event is not held back by Nagle; tests/unit/core/test_proxy_flow.py checks.
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        local = transport.get_extra_info("sockname")
        self.local_address = local[0].encode() if local else b""
        # The upstream headers that are the same for every request of this connection.
        self.forwarded_headers = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Port: %d\r\nX-Real-IP: %s\r\n" % (
            self.scheme, self.listen_port, self.peer
        )
        gateway = self.gateway
        gateway.clients.add(self)
        gateway.stats.connections_accepted += 1
        gateway.connection_serial += 1
        self.serial = gateway.connection_serial
        self.deadline = self.loop.time() + CLIENT_KEEPALIVE_SECONDS

    def data_received(self, data):
        if self.closed:
            return
        now = self.gateway.now = self.loop.time()
        if not self.lingering:
            self.deadline = now + CLIENT_STALL_SECONDS
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            # The Upgrade header is hop-by-hop and is not forwarded, so the request was proxied
            # as a plain one; parse what follows it with a fresh parser.
            self.parser = httptools.HttpRequestParser(self)
            rest = data[upgrade.args[0]:]
            if rest:
                self.data_received(rest)
        except HttpParserError as error:
            cause = error.__context__
            if cause is not None and not isinstance(cause, ClientRejected):
                log.error("unexpected error while handling a request", exc_info=cause)
                self.reject_status = 500
            self.reject_request()

    def eof_received(self):
        return False  # a half-closed client gets its transport closed (no half-open proxying)

    def connection_lost(self, exc):
        self.closed = True
        self.gateway.clients.discard(self)
        current = self.current
        if current is not None:
            self.current = None
            if current.upstream is not None:
                current.upstream.abort()
        self.pending = None
        self.parsing = None

    def pause_writing(self):
        self.write_paused = True
        self.deadline = self.loop.time() + CLIENT_STALL_SECONDS
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self.gateway.now = self.loop.time()
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self):
        gateway = self.gateway
        gateway.stats.total_requests += 1
        self.requests += 1
        exchange = self.parsing = Exchange(gateway.snapshot, gateway.now)
        exchange.client = self

    def on_url(self, url):
        exchange = self.parsing
        exchange.url += url
        exchange.head_size += len(url)
        if exchange.head_size > MAX_HEAD_BYTES:
            self.reject_status = 414
            raise ClientRejected

    def on_header(self, name, value):
        exchange = self.parsing
        exchange.head_size += len(name) + len(value) + 4
        exchange.header_lines += 1
        if exchange.head_size > MAX_HEAD_BYTES or exchange.header_lines > MAX_HEADER_LINES:
            self.reject_status = 431
            raise ClientRejected
        lower = name.lower()
        if lower in _REQUEST_DROPPED:
            if lower == b"host":
                exchange.host = value
                exchange.has_host = True
            elif lower == b"x-forwarded-for":
                exchange.forwarded_for = value if not exchange.forwarded_for else exchange.forwarded_for + b", " + value
            elif lower == b"via":
                exchange.via = value if not exchange.via else exchange.via + b", " + value
            elif lower == b"connection":
                exchange.connection_tokens = value.lower()
            elif lower == b"transfer-encoding":
                exchange.chunked = True
            return
        if lower == b"content-length" and value.strip().lstrip(b"0"):
            exchange.announced_body = True
        parts = exchange.header_parts
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
        watched = exchange.watched
        if watched is not None:
            if lower not in watched:
                length = len(lower)
                if not (exchange.dashed_lengths >> (length if length < 63 else 63)) & 1:
                    return
                lower = lower.replace(b"_", b"-")
                if lower not in watched:
                    return
            headers = exchange.headers
            if headers is None:
                headers = exchange.headers = {}
            values = headers.get(lower)
            if values is None:
                headers[lower] = [value]
            else:
                values.append(value)

    def on_headers_complete(self):
        if self.closed:
            return
        exchange = self.parsing
        parser = self.parser
        exchange.method = parser.get_method()
        exchange.http_version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive() and not self.gateway.draining
        exchange.request_id = self.gateway.next_request_id()
        if not exchange.chunked and not exchange.announced_body:
            # No body (RFC 9112 6.3): the request is complete with its head, so an answer the
            # gateway gives right away (404, 426, ...) keeps the connection alive.
            exchange.body_complete = True
        if exchange.connection_tokens:
            self._drop_connection_listed(exchange)
        if self.current is None:
            self.current = exchange
            self.dispatch(exchange)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(exchange)
            if len(self.pending) >= MAX_PIPELINED:
                self.pause_reading()

    def on_body(self, body):
        exchange = self.parsing
        exchange.has_body = True
        upstream = exchange.upstream
        if upstream is not None:
            upstream.send_body(body, exchange.chunked)
            return
        if exchange.response_started:
            return  # answered already (an error): the rest of the body is discarded
        exchange.held_body.append(body)
        exchange.held_body_size += len(body)
        if exchange.body_wanted:
            if exchange.held_body_size > MAX_BUFFERED_BODY:
                exchange.body_wanted = False
                exchange.waiting_run = None
                exchange.held_body = []
                self.collect_rest(exchange, exchange.plugin_index)
                self.respond_error(exchange, 413, MSG_BODY_TOO_LARGE)
        elif exchange.held_body_size > MAX_HELD_BODY and not exchange.held_paused:
            exchange.held_paused = True
            self.pause_reading()

    def on_message_complete(self):
        exchange = self.parsing
        self.parsing = None
        exchange.body_complete = True
        if exchange.body_wanted:
            exchange.body_wanted = False
            self.body_arrived(exchange)
        elif exchange.upstream is not None:
            if exchange.chunked:
                exchange.upstream.send_body_end()
            else:
                exchange.upstream.request_sent()
        if self.lingering:
            self.close()  # the body the answer did not wait for has ended

    # -- the exchange -------------------------------------------------------------------------

    def dispatch(self, exchange):
        """Route the request, run the access phase, hand it to an upstream connection (or
        answer it)."""
        if not exchange.has_host and exchange.http_version == "1.1":
            self.respond_error(exchange, 400, MSG_BAD_REQUEST)
            return
        snapshot = exchange.snapshot
        match = snapshot.router.match(
            exchange.method, exchange.host, exchange.url, exchange.headers, self.listen_port, self.scheme,
        )
        if match is None:
            self.respond_error(exchange, 404, MSG_NO_ROUTE)
            return
        exchange.match = match
        # A route without a service still runs its plugins (request-termination is made for
        # it); an https redirect happens before any plugin, as in Kong.
        if match.error_status and match.service is not None:
            self.respond_error(exchange, match.error_status, match.error_message, match.error_headers)
            return
        chains = snapshot.chains
        if chains:
            chain = chains.get(match.route.id)
            if chain is not None:
                exchange.chain = chain
                if not self.run_access(exchange, 0):
                    return
        self.forward(exchange)

    def run_access(self, exchange, index):
        """Run the access phase from slot `index`: True when the request goes on upstream,
        False when a plugin answered it or is waiting (for Redis, or for the request body)."""
        chain = exchange.chain
        count = len(chain)
        scheme = self.scheme
        while index < count:
            slot = chain[index]
            index += 1
            run = slot.choose(exchange.consumer) if slot.dynamic else slot.static
            if run is None or scheme not in run.protocols:
                continue
            self.collect(exchange, run)
            if run.access is not None and not self.call_access(exchange, run, index):
                return False
        return True

    def call_access(self, exchange, run, index):
        """One plugin's access phase (`index`: the slot after it). True when the request goes
        on to the next plugin."""
        try:
            result = run.access(exchange)
        except Exception:
            log.exception("plugin '%s' failed in its access phase", run.name)
            self.collect_rest(exchange, index)
            self.respond_error(exchange, 500, MSG_UNEXPECTED)
            return False
        if result is None:
            if not exchange.body_wanted:
                return True
            # The plugin asked for the body (read_body) and it is still arriving: it is asked
            # again from on_message_complete. Buffering must not wait on the pause that holding
            # the body up to now may have put on the client's reads.
            exchange.plugin_index = index
            exchange.waiting_run = run
            if exchange.held_paused:
                exchange.held_paused = False
                self.resume_reading()
            return False
        exchange.plugin_index = index
        if asyncio.isfuture(result) or asyncio.iscoroutine(result):
            # A plugin that must wait (e.g. for Redis) returns a future: this request waits,
            # the others go on, and no Task is made for it (a coroutine gets one).
            if not asyncio.isfuture(result):
                result = asyncio.ensure_future(result, loop=self.loop)
            result.add_done_callback(functools.partial(self.access_resumed, exchange))
            return False
        self.collect_rest(exchange, index)
        self.respond_exit(exchange, result)  # an Exit (fastgate/_core/_pure/plugins.py)
        return False

    def body_arrived(self, exchange):
        """The body a plugin asked for is complete: ask that plugin again, then go on."""
        run = exchange.waiting_run
        exchange.waiting_run = None
        index = exchange.plugin_index
        if self.call_access(exchange, run, index) and self.run_access(exchange, index):
            self.forward(exchange)

    def access_resumed(self, exchange, future):
        """A plugin's awaited result is there: go on with the access phase."""
        self.gateway.now = self.loop.time()
        if self.closed or self.current is not exchange:
            return
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                log.error("a plugin failed in its access phase", exc_info=future.exception())
            self.collect_rest(exchange, exchange.plugin_index)
            self.respond_error(exchange, 500, MSG_UNEXPECTED)
            return
        result = future.result()
        if result is not None:
            self.collect_rest(exchange, exchange.plugin_index)
            self.respond_exit(exchange, result)
        elif self.run_access(exchange, exchange.plugin_index):
            self.forward(exchange)

    def collect(self, exchange, run):
        """Note the plugin's later phases (response head, body chunks, log)."""
        if run.response is not None:
            if exchange.responders is None:
                exchange.responders = []
            exchange.responders.append(run.response)
        if run.body is not None:
            if exchange.body_filters is None:
                exchange.body_filters = []
            exchange.body_filters.append(run.body)
        if run.log is not None:
            if exchange.loggers is None:
                exchange.loggers = []
            exchange.loggers.append(run.log)

    def collect_rest(self, exchange, index):
        """After a plugin ended the request, the later plugins' access is skipped but their
        response and log phases still run (behavior.md 3.1)."""
        chain = exchange.chain
        scheme = self.scheme
        for position in range(index, len(chain)):
            slot = chain[position]
            run = slot.choose(exchange.consumer) if slot.dynamic else slot.static
            if run is not None and scheme in run.protocols:
                self.collect(exchange, run)

    def respond_exit(self, exchange, result):
        if result.body is None:
            self.respond_error(exchange, result.status, result.message, result.headers)
        else:
            self.respond(exchange, result.status, result.content_type, result.body, result.headers)

    def forward(self, exchange):
        """Hand the request to a pooled or new upstream connection."""
        match = exchange.match
        if match.error_status:
            self.respond_error(exchange, match.error_status, match.error_message, match.error_headers)
            return
        if exchange.body is not None:
            self.replace_body(exchange)
        exchange.upstream_head = self.upstream_head(exchange, match)
        service = match.service
        exchange.attempts_left = service.retries + 1
        pool = self.gateway.pool_for(service)
        upstream = pool.acquire()
        if upstream is not None:
            upstream.attach(self, exchange)
        else:
            pool.connect(self, exchange)

    def replace_body(self, exchange):
        """A body read (or rewritten) by a plugin goes upstream whole, with its own length."""
        body = exchange.body
        exchange.header_parts = without_length(exchange.header_parts)
        exchange.chunked = False
        exchange.held_body = [body] if body else []
        length_line = b"Content-Length: %d\r\n" % len(body)
        if exchange.upstream_extra is None:
            exchange.upstream_extra = [length_line]
        else:
            exchange.upstream_extra.append(length_line)

    def upstream_head(self, exchange, match):
        host = exchange.host
        port_at = host.rfind(b":")
        forwarded_host = host[:port_at] if port_at > 0 and host.find(b"]", port_at) < 0 else host
        url = exchange.url
        query_at = url.find(b"?")
        raw_path = url if query_at < 0 else url[:query_at]
        parts = [
            exchange.method, b" ", exchange.upstream_path or match.upstream_path, b" HTTP/1.1\r\nHost: ",
            exchange.upstream_host or match.upstream_host, b"\r\n",
        ]
        parts.extend(exchange.header_parts)
        if exchange.upstream_extra is not None:
            parts.extend(exchange.upstream_extra)
        parts.append(self.forwarded_headers)
        parts.append(b"X-Forwarded-For: ")
        if exchange.forwarded_for:
            parts.append(exchange.forwarded_for)
            parts.append(b", ")
        parts.append(self.peer)
        parts.append(b"\r\nX-Forwarded-Host: ")
        parts.append(forwarded_host)
        parts.append(b"\r\nX-Forwarded-Path: ")
        parts.append(raw_path)
        prefix = match.stripped_prefix
        if prefix and prefix != b"/":
            parts.append(b"\r\nX-Forwarded-Prefix: ")
            parts.append(prefix)
        parts.append(b"\r\nX-Fastgate-Request-Id: ")
        parts.append(exchange.request_id)
        parts.append(b"\r\nVia: ")
        if exchange.via:
            parts.append(exchange.via)
            parts.append(b", ")
        if exchange.http_version == "1.1":
            parts.append(VIA_HTTP11)
        else:
            parts.append(b"%s %s" % (exchange.http_version.encode(), SERVER_TOKEN))
        if exchange.chunked:
            parts.append(b"\r\nTransfer-Encoding: chunked")
        parts.append(b"\r\nConnection: keep-alive\r\n\r\n")
        return b"".join(parts)

    def _drop_connection_listed(self, exchange):
        """Remove the headers the client's Connection header names (hop-by-hop by declaration)."""
        listed = {token.strip() for token in exchange.connection_tokens.split(b",")}
        listed.difference_update((b"keep-alive", b"close", b"upgrade", b""))
        if not listed:
            return
        parts = exchange.header_parts
        kept = []
        for index in range(0, len(parts), 4):
            if parts[index].lower() not in listed:
                kept.extend(parts[index:index + 4])
        exchange.header_parts = kept

    def respond_error(self, exchange, status, message, extra_headers=()):
        """Answer from the gateway: Kong's JSON error body with the request id (or the team's
        FASTGATE_ERROR_TEMPLATE)."""
        template = self.gateway.error_template
        if template is None:
            self.respond(exchange, status, JSON_TYPE, error_body(message, exchange.request_id), extra_headers)
        else:
            body = template.render(status, message, exchange.request_id)
            self.respond(exchange, status, template.content_type, body, extra_headers)

    def respond(self, exchange, status, content_type, body, extra_headers):
        """Answer from the gateway with `body`; the response phase of the plugins collected so
        far runs on the head."""
        latency = int((self.gateway.now - exchange.started) * 1000)
        # A body the client is still sending is read and dropped (lingering close, see finish),
        # then the connection closes.
        keep_alive = exchange.keep_alive and exchange.body_complete and not self.gateway.draining
        exchange.keep_alive = keep_alive
        exchange.status = status
        head = []
        if content_type:
            head.extend((b"Content-Type", b": ", content_type, b"\r\n"))
        for name, value in extra_headers:
            head.extend((name, b": ", value, b"\r\n"))
        if exchange.response_headers is not None:
            head.extend(exchange.response_headers)
        if exchange.responders is not None:
            for responder in exchange.responders:
                try:
                    responder(exchange, status, head)
                except Exception:
                    log.exception("a plugin failed in its response phase")
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))]
        parts.extend(head)
        parts.append(
            b"Content-Length: %d\r\nServer: %s\r\nX-Fastgate-Request-Id: %s\r\nX-Fastgate-Response-Latency: %d\r\n"
            % (len(body), SERVER_TOKEN, exchange.request_id, latency)
        )
        parts.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
        if exchange.method != b"HEAD":
            parts.append(body)
        exchange.response_started = True
        self.transport.write(b"".join(parts))
        self.finish(exchange)

    def reject_request(self):
        """The client sent something unparseable or too large: 4xx, then close."""
        exchange = self.parsing
        self.parsing = None
        if self.current is not None and exchange is not self.current:
            # Garbage behind a request still being answered: that answer goes out in order,
            # then the connection closes.
            self.pending = None
            self.broken = True
            self.pause_reading()
            return
        if exchange is None:
            exchange = Exchange(self.gateway.snapshot, self.gateway.now)
        if exchange.upstream is not None:
            exchange.upstream.abort()  # e.g. bad chunked framing after the head went upstream
            exchange.upstream = None
        if exchange.response_started:
            self.close()
            return
        if not exchange.request_id:
            exchange.request_id = self.gateway.next_request_id()
        exchange.keep_alive = False
        self.current = exchange
        status = self.reject_status or 400
        if status == 431:
            message = MSG_HEAD_TOO_LARGE
        elif status == 414:
            message = MSG_URI_TOO_LONG
        elif status == 500:
            message = MSG_UNEXPECTED
        else:
            message = MSG_BAD_REQUEST
        self.respond_error(exchange, status, message)

    def finish(self, exchange):
        """The response to `exchange` has been written in full."""
        if self.current is not exchange:
            return
        self.current = None
        if exchange.loggers is not None:
            # Off the client's path: after this callback, once the next request was dispatched.
            self.loop.call_soon(run_loggers, exchange)
        if exchange.held_paused:
            # Answered (an error) before an upstream connection took the held body: the pause
            # that holding it put on the client's reads must not outlive the exchange, or the
            # connection's next request is never read.
            exchange.held_paused = False
            self.resume_reading()
        if self.closed:
            return
        if not exchange.body_complete and exchange is self.parsing:
            self.lingering = True
            self.deadline = self.gateway.now + LINGER_SECONDS
            return
        if not exchange.keep_alive or not exchange.body_complete:
            self.close()
            return
        if self.broken:
            self.close()
            return
        pending = self.pending
        if pending:
            if len(pending) == MAX_PIPELINED:
                self.resume_reading()
            following = pending.pop(0)
            self.current = following
            self.dispatch(following)
        else:
            self.deadline = self.gateway.now + CLIENT_KEEPALIVE_SECONDS
            if self.gateway.draining and self.parsing is None:
                self.close()

    def upstream_failed(self, exchange, status, message):
        """The upstream could not give a response: answer with `status` if nothing went out."""
        if self.current is not exchange or self.closed:
            return
        exchange.upstream = None
        if exchange.response_started:
            self.transport.abort()  # a truncated response must not look complete
            return
        self.respond_error(exchange, status, message)

    def pause_reading(self):
        self.read_pauses += 1
        if self.read_pauses == 1 and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self):
        if self.read_pauses > 0:
            self.read_pauses -= 1
            if self.read_pauses == 0 and not self.closed:
                self.transport.resume_reading()

    def close(self):
        if not self.closed:
            self.closed = True
            self.transport.close()
            current = self.current
            if current is not None and current.upstream is not None:
                current.upstream.abort()

    def expire(self):
        self.close()


def chunk_frame(body):
    """One chunk of a chunked request body (RFC 9112 7.1)."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def without_length(parts):
    kept = []
    for index in range(0, len(parts), 4):
        if parts[index].lower() != b"content-length":
            kept.extend(parts[index:index + 4])
    return kept


def run_loggers(exchange):
    for logger in exchange.loggers:
        try:
            logger(exchange, exchange.status)
        except Exception:
            log.exception("a plugin failed in its log phase")


class UpstreamPool:
    """Keep-alive connections to one upstream (protocol, host, port); no cap on how many are
    busy at once (an LLM stream holds one for minutes), a cap on how many wait idle."""

    def __init__(self, gateway, host, port, tls):
        self.gateway = gateway
        self.host = host
        self.port = port
        self.tls = tls
        self.idle = []

    def acquire(self):
        idle = self.idle
        while idle:
            upstream = idle.pop()
            if not upstream.closed:
                return upstream
        return None

    def release(self, upstream):
        if len(self.idle) < MAX_IDLE_PER_UPSTREAM and not self.gateway.draining:
            upstream.deadline = self.gateway.now + UPSTREAM_IDLE_SECONDS
            self.idle.append(upstream)
        else:
            upstream.close()

    def forget(self, upstream):
        try:
            self.idle.remove(upstream)
        except ValueError:
            pass  # it was busy, not idle

    def connect(self, client, exchange):
        ConnectAttempt(self, client, exchange).start()


class ConnectAttempt:
    """Opening one upstream connection for a waiting exchange, with the service's
    connect_timeout and up to `retries` more tries (nothing was sent yet, so a retry is safe)."""

    def __init__(self, pool, client, exchange):
        self.pool = pool
        self.client = client
        self.exchange = exchange
        self.future = None
        self.deadline = NEVER
        self.timed_out = False

    def start(self):
        pool = self.pool
        gateway = pool.gateway
        exchange = self.exchange
        exchange.attempts_left -= 1
        service = exchange.match.service
        self.timed_out = False
        self.deadline = gateway.loop.time() + service.connect_timeout / 1000.0
        ssl_context = pool.gateway.upstream_ssl_context() if pool.tls else None
        coroutine = gateway.loop.create_connection(
            functools.partial(UpstreamConnection, pool), pool.host, pool.port, ssl=ssl_context,
            server_hostname=pool.host if pool.tls else None,
        )
        # One Task per new connection (not per request): pooled connections are reused.
        self.future = asyncio.ensure_future(coroutine, loop=gateway.loop)
        gateway.connecting.add(self)
        self.future.add_done_callback(self.done)

    def expire(self):
        self.timed_out = True
        self.future.cancel()

    def done(self, future):
        gateway = self.pool.gateway
        gateway.now = gateway.loop.time()
        gateway.connecting.discard(self)
        client = self.client
        exchange = self.exchange
        if future.cancelled():
            error = asyncio.TimeoutError()
        else:
            error = future.exception()
        if error is None:
            upstream = future.result()[1]
            if client.closed or client.current is not exchange:
                self.pool.release(upstream)  # the client left; the connection is still good
            else:
                upstream.attach(client, exchange)
            return
        if client.closed or client.current is not exchange:
            return
        if exchange.attempts_left > 0:
            self.start()
            return
        if self.timed_out:
            client.upstream_failed(exchange, 504, MSG_TIMEOUT)
        else:
            client.upstream_failed(exchange, 502, MSG_BAD_GATEWAY)


class UpstreamConnection:
    """The protocol of one keep-alive connection to an upstream."""

    def __init__(self, pool):
        self.pool = pool
        self.gateway = pool.gateway
        self.loop = pool.gateway.loop
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.client = None
        self.exchange = None
        self.closed = False
        self.reused = False
        self.deadline = NEVER
        self.read_timeout = 60.0
        self.write_timeout = 60.0
        self.reading_paused = False
        self.write_paused = False
        self._reset_response()

    def _reset_response(self):
        self.reason = b""
        self.header_parts = []
        self.has_server = False
        self.has_length = False
        self.upstream_chunked = False
        self.via = b""
        self.head_done = False
        self.chunk_out = False
        self.until_eof = False
        self.complete = False
        self.keep_alive = False
        self.out = None

    # -- uvloop callbacks ---------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport  # TCP_NODELAY: set by uvloop, as on the client side
        self.gateway.upstreams.add(self)

    def data_received(self, data):
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        now = self.gateway.now = self.loop.time()
        self.deadline = now + self.read_timeout
        out = self.out = []
        try:
            self.parser.feed_data(data)
        except HttpParserError as error:
            cause = error.__context__
            if cause is not None:
                log.error("unexpected error while handling a response", exc_info=cause)
            self.fail()
            return
        if out:
            client = self.client
            if client is not None and not client.closed:
                client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.out = None
        if self.complete:
            self.finish()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.gateway.now = self.loop.time()
        self.gateway.upstreams.discard(self)
        exchange = self.exchange
        if exchange is None:
            self.pool.forget(self)
            return
        if self.until_eof and self.head_done:
            # A close-delimited body ends at EOF: that is its normal end.
            client = self.client
            if self.chunk_out and client is not None and not client.closed:
                client.transport.write(b"0\r\n\r\n")
            self.keep_alive = False
            self.finish()
            return
        client = self._detach()
        if client is None:
            return
        if not self.head_done and not exchange.response_started:
            if (
                self.reused and not exchange.retried_stale and not exchange.has_body
                and exchange.method in _IDEMPOTENT
            ):
                # The upstream closed a pooled connection just as it was reused; once more on
                # a fresh one (nginx and Kong do the same for idempotent requests).
                exchange.retried_stale = True
                exchange.upstream = None
                exchange.attempts_left = 1
                self.pool.connect(client, exchange)
                return
            client.upstream_failed(exchange, 502, MSG_BAD_GATEWAY)
            return
        client.upstream_failed(exchange, 502, MSG_BAD_GATEWAY)

    def pause_writing(self):
        # The upstream reads the request body slower than the client sends it.
        self.write_paused = True
        self.deadline = self.loop.time() + self.write_timeout
        client = self.client
        if client is not None:
            client.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self.gateway.now = self.loop.time()
        self._arm_read_deadline()
        client = self.client
        if client is not None:
            client.resume_reading()

    # -- the exchange -------------------------------------------------------------------------

    def attach(self, client, exchange):
        service = exchange.match.service
        self.client = client
        self.exchange = exchange
        exchange.upstream = self
        self.read_timeout = service.read_timeout / 1000.0
        self.write_timeout = service.write_timeout / 1000.0
        exchange.head_written_at = self.gateway.now
        held = exchange.held_body
        if exchange.chunked:
            framed = [exchange.upstream_head]
            for chunk in held:
                framed.append(chunk_frame(chunk))
            if exchange.body_complete:
                framed.append(b"0\r\n\r\n")
            self.transport.write(b"".join(framed))
        elif held:
            self.transport.write(exchange.upstream_head + b"".join(held))
        else:
            self.transport.write(exchange.upstream_head)
        if held:
            exchange.held_body = []
            exchange.held_body_size = 0
        if exchange.held_paused:
            exchange.held_paused = False
            client.resume_reading()
        self._arm_read_deadline()
        if client.write_paused:
            self.pause_reading()

    def _arm_read_deadline(self):
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.body_complete and not self.reading_paused:
            self.deadline = self.gateway.now + self.read_timeout
        else:
            # The client is still sending (its pace, not the upstream's) or not reading.
            self.deadline = NEVER

    def send_body(self, body, chunked):
        if chunked:
            self.transport.write(chunk_frame(body))
        else:
            self.transport.write(body)

    def send_body_end(self):
        self.transport.write(b"0\r\n\r\n")
        self.request_sent()

    def request_sent(self):
        if not self.write_paused:
            self._arm_read_deadline()

    def pause_reading(self):
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
            self.deadline = NEVER

    def resume_reading(self):
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
            self._arm_read_deadline()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_status(self, reason):
        self.reason += reason

    def on_header(self, name, value):
        lower = name.lower()
        if lower in _RESPONSE_DROPPED:
            if lower == b"via":
                self.via = value if not self.via else self.via + b", " + value
            elif lower == b"transfer-encoding":
                self.upstream_chunked = True
            return
        if lower == b"server":
            self.has_server = True
        elif lower == b"content-length":
            self.has_length = True
        parts = self.header_parts
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")

    def on_headers_complete(self):
        parser = self.parser
        status = parser.get_status_code()
        exchange = self.exchange
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): pass it on, wait for the final
            # one. An HTTP/1.0 client must not get one (RFC 9110 15.2): it would take it as final.
            out = self.out
            if exchange.http_version == "1.1":
                out.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, self.reason, b"".join(self.header_parts)))
            self._reset_response()
            self.out = out
            return
        self.head_done = True
        exchange.response_started = True
        exchange.status = status
        self.keep_alive = parser.should_keep_alive()
        if exchange.response_headers is not None:
            self.header_parts.extend(exchange.response_headers)
        if exchange.responders is not None:
            self.run_responders(exchange, status)
        now = self.gateway.now
        bodiless = exchange.method == b"HEAD" or status == 204 or status == 304
        # A request body still coming in means a lingering close after this response.
        client_keep_alive = exchange.keep_alive and exchange.body_complete and not self.gateway.draining
        length_to_client = self.has_length
        if exchange.body_filters is not None and length_to_client and not bodiless:
            # A body filter may change the length: the client gets the body chunked instead.
            self.header_parts = without_length(self.header_parts)
            length_to_client = False
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, self.reason)]
        parts.extend(self.header_parts)
        if not bodiless and not length_to_client:
            if not self.upstream_chunked and not self.has_length:
                self.until_eof = True
            if exchange.http_version == "1.1":
                self.chunk_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                client_keep_alive = False  # an HTTP/1.0 client reads this body until close
        exchange.keep_alive = client_keep_alive
        parts.append(b"Via: ")
        if self.via:
            parts.append(self.via)
            parts.append(b", ")
        parts.append(VIA_HTTP11)
        parts.append(b"\r\n")
        if not self.has_server:
            parts.append(b"Server: %s\r\n" % SERVER_TOKEN)
        parts.append(
            b"X-Fastgate-Request-Id: %s\r\nX-Fastgate-Upstream-Latency: %d\r\nX-Fastgate-Proxy-Latency: %d\r\n"
            % (
                exchange.request_id,
                int((now - exchange.head_written_at) * 1000),
                int((exchange.head_written_at - exchange.started) * 1000),
            )
        )
        parts.append(b"Connection: keep-alive\r\n\r\n" if client_keep_alive else b"Connection: close\r\n\r\n")
        self.out.append(b"".join(parts))
        if exchange.method == b"HEAD":
            # llhttp cannot be told a response has no body: finish here and start the next
            # response on a fresh parser.
            self.complete = True
            self.parser = httptools.HttpResponseParser(self)

    def run_responders(self, exchange, status):
        parts = self.header_parts
        for responder in exchange.responders:
            try:
                responder(exchange, status, parts)
            except Exception:
                log.exception("a plugin failed in its response phase")
        self.header_parts = parts
        self.has_server = False
        for index in range(0, len(parts), 4):
            if parts[index].lower() == b"server":
                self.has_server = True

    def on_body(self, body):
        body_filters = self.exchange.body_filters
        if body_filters is not None:
            for body_filter in body_filters:
                body = body_filter(self.exchange, body)
            if not body:
                return  # a filter held the chunk back; an empty chunk would end a chunked body
        if self.chunk_out:
            self.out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def on_message_complete(self):
        if not self.head_done:
            return  # the end of an interim (1xx) response
        if self.chunk_out:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

    def finish(self):
        exchange = self.exchange
        client = self._detach()
        self.deadline = NEVER
        reusable = (
            self.keep_alive and not self.until_eof and exchange.body_complete and not self.closed
            and not self.write_paused
        )
        if self.reading_paused:
            self.reading_paused = False
            if not self.closed:
                self.transport.resume_reading()
        self._reset_response()
        self.reused = True
        exchange.upstream = None
        if reusable:
            self.pool.release(self)
        elif self.write_paused:
            # The upstream answered without reading the request body and may never read it:
            # flushing the rest would keep this connection open for nothing.
            self.abort()
        else:
            self.close()
        if client is not None:
            client.finish(exchange)

    def _detach(self):
        """Unlink the exchange; returns its client. While this connection's writes are paused
        the client's reads are too (pause_writing): that pause ends with the exchange, or the
        client's next request is never read. A write-paused connection is never reused, so
        the paused client is always this one."""
        client = self.client
        self.client = None
        self.exchange = None
        if self.write_paused and client is not None:
            client.resume_reading()
        return client

    def fail(self):
        """The upstream sent something that is not HTTP: drop the connection, 502 the client."""
        exchange = self.exchange
        client = self._detach()
        self.close()
        if client is not None and exchange is not None:
            client.upstream_failed(exchange, 502, MSG_BAD_GATEWAY)

    def expire(self, now):
        exchange = self.exchange
        if exchange is None:
            self.close()  # idle past UPSTREAM_IDLE_SECONDS
            return
        client = self._detach()
        self.abort()
        if client is not None:
            client.upstream_failed(exchange, 504, MSG_TIMEOUT)

    def close(self):
        if not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def abort(self):
        self._detach()
        if not self.closed:
            self.closed = True
            self.transport.abort()
            self.pool.forget(self)
