"""The proxy's own CPU per request, without the kernel: one full exchange (client request parsed,
routed, upstream head written, upstream response parsed, client response written, upstream
connection back in the pool) driven through the protocol objects with in-memory transports.

Compiled vs pure in the same run, and what the pieces cost: routing among 1 or 10,000 routes,
and the router alone.

    taskset -c 0 .venv/bin/python -m pytest bench/test_bench_proxy.py --benchmark-only
"""

from __future__ import annotations

import importlib

import pytest
import uvloop

from fastgate.config import parse_config
from fastgate.config.compile import Snapshot

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


def make_exchange(implementation: str, routes: int):
    module = "fastgate._core" if implementation == "compiled" else "fastgate._core._pure"
    proxy = importlib.import_module(f"{module}.proxy")
    router = importlib.import_module(f"{module}.router")
    config = parse_config(config_text(routes))
    service = config.services[0]
    snapshot = Snapshot(config=config, router=router.Router([(r, service) for r in config.routes]),
                        configuration_hash="0" * 32)
    loop = uvloop.new_event_loop()
    gateway = proxy.Gateway(loop, snapshot)
    client = proxy.ClientConnection(gateway, 8000, b"http")
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    pool = gateway.pool_for(service)
    upstream = proxy.UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport())
    pool.release(upstream)

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
