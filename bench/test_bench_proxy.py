"""The proxy's own CPU per request, without the kernel: one full exchange (client request parsed,
routed, upstream head written, upstream response parsed, client response written, upstream
connection back in the pool) driven through the protocol objects with in-memory transports.

Compiled vs pure in the same run, and what the pieces cost: routing among 1 or 10,000 routes,
and key-auth + acl with 100,000 consumers (a random consumer's key on each request) against the
same exchange without plugins.

    taskset -c 0 .venv/bin/python -m pytest bench/test_bench_proxy.py --benchmark-only
"""

from __future__ import annotations

import importlib

import msgspec
import pytest
import uvloop

import json
import random

from fastgate.config import parse_config
from fastgate.config.compile import compile_snapshot

REQUEST = (
    b"GET /json HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\n\r\n"
)
RESPONSE_BODY = b'{"id":"req-7f3c2a9e","service":"upstream","status":"ok","items":[1,2,3],"pad":"xxxx"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 17:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(RESPONSE_BODY), RESPONSE_BODY)
)


class MemoryTransport:
    """What the protocols need of a transport; writes are counted, not kept."""

    def __init__(self):
        self.written = 0

    def write(self, data):
        self.written += len(data)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def close(self):
        pass

    def abort(self):
        pass


def config_text(routes: int) -> str:
    lines = ['_format_version: "3.0"', "services:", "  - name: json", "    url: http://127.0.0.1:9001",
             "    routes:"]
    for index in range(routes - 1):
        lines.append(f"      - {{name: r{index}, paths: [/svc{index}/v1], strip_path: false}}")
    lines.append("      - {name: json, paths: [/json], strip_path: false}")
    return "\n".join(lines) + "\n"


def auth_config_text(consumers: int, rate_limited: bool = False) -> str:
    plugins = [{"name": "key-auth"}, {"name": "acl", "config": {"allow": ["users"]}}]
    if rate_limited:
        # A sliding window per consumer with a limit the benchmark never reaches.
        plugins.append({"name": "rate-limiting-advanced", "config": {"limit": [1e9], "window_size": [60]}})
    return json.dumps({
        "_format_version": "3.0",
        "services": [{"name": "json", "url": "http://127.0.0.1:9001", "routes": [
            {"name": "json", "paths": ["/json"], "strip_path": False, "plugins": plugins}]}],
        "consumers": [{"username": f"user-{i}", "keyauth_credentials": [{"key": f"key-{i}"}],
                       "acls": [{"group": "users"}]} for i in range(consumers)],
    })


def make_exchange(implementation: str, routes: int, consumers: int = 0, rate_limited: bool = False):
    """One exchange as a function; with `consumers`, the route has key-auth + acl and each call
    presents the key of a consumer picked at random (each key's request is prepared once)."""
    module = "fastgate._core" if implementation == "compiled" else "fastgate._core._pure"
    proxy = importlib.import_module(f"{module}.proxy")
    # compile_snapshot builds with the implementation fastgate._core chose (compiled here); the
    # pure run swaps in the pure router.
    config = parse_config(auth_config_text(consumers, rate_limited) if consumers else config_text(routes))
    service = config.services[0]
    snapshot = compile_snapshot(config)
    if implementation == "pure":
        router = importlib.import_module(f"{module}.router")
        snapshot = msgspec.structs.replace(snapshot, router=router.Router([(r, service) for r in config.routes]))
    loop = uvloop.new_event_loop()
    gateway = proxy.Gateway(loop, snapshot)
    client = proxy.ClientConnection(gateway, 8000, b"http")
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    pool = gateway.pool_for(service)
    upstream = proxy.UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport())
    pool.release(upstream)

    if consumers:
        keyed = [REQUEST.replace(b"Accept: */*", b"apikey: key-%d\r\nAccept: */*" % i) for i in range(consumers)]
        pick = random.Random(7).randrange

        def one_exchange():
            client.data_received(keyed[pick(consumers)])
            upstream.data_received(RESPONSE)
    else:
        def one_exchange():
            client.data_received(REQUEST)
            upstream.data_received(RESPONSE)

    one_exchange()
    assert client_transport.written > len(RESPONSE), "the response did not reach the client"
    return one_exchange, loop


@pytest.mark.parametrize("routes", [1, 10_000], ids=["1-route", "10000-routes"])
@pytest.mark.parametrize("implementation", ["compiled", "pure"])
def test_exchange(benchmark, implementation, routes):
    benchmark.group = f"exchange-{routes}-routes"
    exchange, loop = make_exchange(implementation, routes)
    try:
        benchmark(exchange)
    finally:
        loop.close()


@pytest.mark.parametrize("plugins", ["none", "key-auth+acl", "key-auth+acl+rate-limiting-advanced"])
def test_exchange_with_auth(benchmark, plugins):
    """Compiled, 100,000 consumers. "none" picks a random number too, so both pay the same
    random.randrange; only the plugins differ."""
    benchmark.group = "exchange-auth-100000-consumers"
    if plugins == "none":
        exchange, loop = make_exchange("compiled", 1)
        pick = random.Random(7).randrange

        def exchange_with_pick(inner=exchange):
            pick(100_000)
            inner()

        exchange = exchange_with_pick
    else:
        exchange, loop = make_exchange("compiled", 1, consumers=100_000, rate_limited=plugins.endswith("advanced"))
    try:
        benchmark(exchange)
    finally:
        loop.close()
