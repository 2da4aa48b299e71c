"""Flow control between the two sides of an exchange, driven by hand with fake transports.

When an upstream connection's write buffer passes its high-water mark (uvloop calls
pause_writing), the gateway pauses the client's reads. Whatever ends the exchange (a
response, a timeout, a lost connection) must end that pause too: otherwise the client's next
request on the connection is never read. Over real sockets that state needs the whole request
body read while the upstream's buffer is full, which the kernel's socket buffer sizing decides
(tests/integration/test_faults.py covers the neighbouring cases); here it is set up exactly.
Run against both implementations, like test_router.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastgate.config import parse_config
from fastgate.config.compile import compile_snapshot

HIGH_WATER = 65536
BODY = b"b" * (2 * HIGH_WATER)
REQUEST = b"POST /up/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


@pytest.fixture
def proxy(core_module) -> Any:
    return core_module("proxy")


class FakeTransport:
    """What the proxy uses of a uvloop transport. A write that takes the buffer past the
    high-water mark calls the protocol's pause_writing, as uvloop does; nothing is ever sent."""

    def __init__(self, protocol: Any):
        self.protocol = protocol
        self.written: list[bytes] = []
        self.buffered = 0
        self.write_paused = False
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)
        if not self.write_paused and self.buffered > HIGH_WATER:
            self.write_paused = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    abort = close


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()  # for loop.time(); never run: no connection is opened
    yield loop
    loop.close()


def setup_exchange(proxy: Any, loop: Any) -> tuple[Any, Any, Any]:
    """A client whose POST went to a pooled upstream connection that does not read: the
    whole body was read from the client, the upstream's writes are paused."""
    snapshot = compile_snapshot(parse_config(
        "_format_version: '3.0'\nservices: [{name: up, url: 'http://127.0.0.1:9', routes: [{name: up, paths: [/up]}]}]\n"
    ))
    gateway = proxy.Gateway(loop, snapshot)
    pool = gateway.pool_for(snapshot.config.services[0])
    upstream = proxy.UpstreamConnection(pool)
    upstream.connection_made(FakeTransport(upstream))
    pool.release(upstream)
    client = proxy.ClientConnection(gateway, 8000, b"http")
    client.connection_made(FakeTransport(client))
    client.data_received(REQUEST)
    assert upstream.write_paused and not client.transport.reading
    return gateway, client, upstream


def client_output(client: Any) -> bytes:
    return b"".join(client.transport.written)


def test_a_response_ends_the_pause(proxy, loop):
    _, client, upstream = setup_exchange(proxy, loop)
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client_output(client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: keep-alive\r\n" in client_output(client)
    assert client.transport.reading
    # Its buffer still holds body the upstream may never read: not reused, dropped.
    assert upstream.pool.idle == [] and upstream.transport.closed


def test_a_write_timeout_ends_the_pause(proxy, loop):
    _, client, upstream = setup_exchange(proxy, loop)
    upstream.expire(loop.time())
    assert client_output(client).startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"Connection: keep-alive\r\n" in client_output(client)  # the whole request was read
    assert client.transport.reading


def test_a_lost_upstream_ends_the_pause(proxy, loop):
    _, client, upstream = setup_exchange(proxy, loop)
    upstream.connection_lost(ConnectionResetError())
    assert client_output(client).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert client.transport.reading


def test_a_late_resume_writing_does_not_touch_the_client(proxy, loop):
    _, client, upstream = setup_exchange(proxy, loop)
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client.pause_reading()  # e.g. the next request's body waiting for a connection
    upstream.resume_writing()  # uvloop may still report the drain of the dropped connection
    assert not client.transport.reading


def test_both_sides_have_tcp_nodelay(proxy):
    # The proxy relies on uvloop setting TCP_NODELAY on every TCP transport: without it a small
    # SSE event could wait for the previous segment's ACK (Nagle).
    import socket

    import uvloop

    from tests.integration.conftest import free_port

    async def check() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        upstream_port, gateway_port = free_port(), free_port()
        upstream = await loop.create_server(asyncio.Protocol, "127.0.0.1", upstream_port)
        config = parse_config(
            '_format_version: "3.0"\n'
            f"services: [{{name: s, url: 'http://127.0.0.1:{upstream_port}', routes: [{{name: r, paths: [/]}}]}}]\n"
        )
        gateway = proxy.Gateway(loop, compile_snapshot(config))
        server = await loop.create_server(gateway.protocol_factory(gateway_port, b"http"), "127.0.0.1", gateway_port)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(100):
            if gateway.upstreams:
                break
            await asyncio.sleep(0.01)
        (client,) = gateway.clients
        (upstream_connection,) = gateway.upstreams
        flags = tuple(
            side.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for side in (client, upstream_connection)
        )
        writer.close()
        server.close()
        upstream.close()
        return flags

    client_flag, upstream_flag = uvloop.run(check())
    assert client_flag and upstream_flag
