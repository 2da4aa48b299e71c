"""Proxying through a real gateway to real upstream servers (behavior.md 0.2, 2.6, 8)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
import uuid

import pytest

from tests.integration.conftest import free_port

VERSION_TOKEN = re.compile(r"fastgate/\d+\.\d+\.\d+")
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def CONFIG(upstream):
    return {
        "_format_version": "3.0",
        "services": [
            {"name": "echo", "url": f"{upstream.url}/echo", "routes": [{"name": "echo", "paths": ["/echo"]}]},
            {"name": "plain", "url": upstream.url, "routes": [{"name": "plain", "paths": ["/up"]}]},
            {"name": "raw", "url": upstream.raw_url, "routes": [{"name": "raw", "paths": ["/raw"]}]},
            {"name": "refused", "url": f"http://127.0.0.1:{free_port()}", "retries": 2,
             "routes": [{"name": "refused", "paths": ["/refused"]}]},
            {"name": "slow", "url": upstream.url, "read_timeout": 300,
             "routes": [{"name": "slow", "paths": ["/slowsvc"]}]},
            {"name": "secure", "url": upstream.url, "routes": [
                {"name": "https-only", "paths": ["/secure"], "protocols": ["https"]},
                {"name": "https-redirect", "paths": ["/redirect"], "protocols": ["https"],
                 "https_redirect_status_code": 301},
            ]},
        ],
        "routes": [{"name": "orphan", "paths": ["/orphan"]}],
    }


@pytest.fixture
def gateway(module_gateway):
    return module_gateway


def upstream_headers(response) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


def test_proxies_with_gateway_headers_both_ways(gateway, upstream):
    response = gateway.request(
        "GET", "/echo/hello?x=1",
        headers={"X-Fastgate-Request-Id": "forged", "X-Forwarded-For": "10.0.0.1", "Via": "1.0 client-proxy",
                 "Connection": "X-Secret", "X-Secret": "hop", "Keep-Alive": "timeout=5", "TE": "trailers",
                 "X-Kept": "yes"},
    )
    assert response.status == 200
    body = response.json()
    assert body["path"] == "/echo/hello?x=1"
    seen = upstream_headers(response)
    assert seen["host"] == [f"127.0.0.1:{upstream.http_port}"]
    assert seen["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["127.0.0.1"]
    assert seen["x-forwarded-port"] == [str(gateway.port)]
    assert seen["x-forwarded-path"] == ["/echo/hello"]
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-kept"] == ["yes"]
    assert len(seen["via"]) == 1 and re.fullmatch(r"1\.0 client-proxy, 1\.1 fastgate/\S+", seen["via"][0])
    for hop in ("x-secret", "keep-alive", "te"):
        assert hop not in seen
    request_id = response.headers["X-Fastgate-Request-Id"]
    assert REQUEST_ID.match(request_id)
    assert seen["x-fastgate-request-id"] == [request_id]
    assert VERSION_TOKEN.search(response.headers["Via"])
    assert int(response.headers["X-Fastgate-Upstream-Latency"]) >= 0
    assert int(response.headers["X-Fastgate-Proxy-Latency"]) >= 0
    assert "X-Fastgate-Response-Latency" not in response.headers


def test_server_header_passes_through_or_is_ours(gateway):
    ours = gateway.request("GET", "/raw/stale")  # the raw upstream sends no Server header
    assert ours.status == 200
    assert VERSION_TOKEN.fullmatch(ours.headers["Server"])
    theirs = gateway.request("GET", "/up/server-header")
    assert theirs.headers["Server"] == "upstream/1.0"
    assert re.fullmatch(r"1\.1 upstream-proxy, 1\.1 fastgate/\S+", theirs.headers["Via"])


def test_request_ids_are_fresh(gateway):
    ids = {gateway.request("GET", "/echo/x").headers["X-Fastgate-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


def assert_gateway_error(response, status, message):
    assert response.status == status
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body == {"message": message, "request_id": response.headers["X-Fastgate-Request-Id"]}
    assert REQUEST_ID.match(body["request_id"])
    assert VERSION_TOKEN.fullmatch(response.headers["Server"])
    assert int(response.headers["X-Fastgate-Response-Latency"]) >= 0


def test_no_route_is_404(gateway):
    assert_gateway_error(gateway.request("GET", "/nowhere"), 404, "no Route matched with those values")


def test_route_without_service_is_503(gateway):
    assert_gateway_error(gateway.request("GET", "/orphan"), 503, "no Service found with those values")


def test_https_only_route_over_http(gateway):
    upgrade = gateway.request("GET", "/secure/x")
    assert_gateway_error(upgrade, 426, "Please use HTTPS protocol")
    assert upgrade.headers["Upgrade"] == "TLS/1.2, HTTP/1.1"
    redirect = gateway.request("GET", "/redirect/x?q=1", headers={"Host": "api.example.test"})
    assert redirect.status == 301
    assert redirect.headers["Location"] == "https://api.example.test/redirect/x?q=1"


def test_connection_refused_is_502_after_retries(gateway):
    started = time.monotonic()
    response = gateway.request("GET", "/refused/x")
    assert_gateway_error(response, 502, "An invalid response was received from the upstream server")
    assert time.monotonic() - started < 5


def test_read_timeout_is_504(gateway):
    started = time.monotonic()
    response = gateway.request("GET", "/slowsvc/slow?delay=3")
    elapsed = time.monotonic() - started
    assert_gateway_error(response, 504, "The upstream server is timing out")
    assert 0.25 < elapsed < 2.5  # read_timeout 300 ms, checked by a 50 ms ticker


def test_upstream_garbage_and_reset_are_502(gateway):
    for path in ("/raw/garbage", "/raw/reset-before-headers"):
        assert_gateway_error(gateway.request("GET", path), 502, "An invalid response was received from the upstream server")


def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(gateway):
    # /raw/stale answers the first request of a connection and drops the connection on the
    # second: the gateway's pooled connection dies just as it is reused.
    assert gateway.request("GET", "/raw/stale").body == b"fresh"
    assert gateway.request("GET", "/raw/stale").body == b"fresh"
    # The pool now holds a connection that answered once; a POST on it is not replayed.
    response = gateway.request("POST", "/raw/stale", body=b"not replayed")
    assert_gateway_error(response, 502, "An invalid response was received from the upstream server")


def test_close_delimited_body_ends_at_eof(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    connection.request("GET", "/raw/close-delimited")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"all of this until EOF"
    connection.request("GET", "/echo/after")  # the client connection stays usable
    assert connection.getresponse().status == 200
    connection.close()


def test_upstream_dying_mid_body_truncates_visibly(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    connection.request("GET", "/raw/die-mid-body")
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()


def test_head_and_bodiless_statuses(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    for method, path, status in [("HEAD", "/echo/x", 200), ("GET", "/up/status/204", 204),
                                 ("GET", "/up/status/304", 304), ("HEAD", "/nowhere", 404)]:
        connection.request(method, path)
        response = connection.getresponse()
        assert response.status == status
        assert response.read() == b""
    connection.request("GET", "/echo/still-alive")  # framing stayed right on the connection
    assert connection.getresponse().status == 200
    connection.close()


def test_pipelined_requests_are_answered_in_order(gateway):
    raw = gateway.raw(
        b"GET /echo/1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo/3 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /echo/4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"404", b"200", b"200"]
    paths = re.findall(rb'"path": "(/echo/\d)"', raw)
    assert paths == [b"/echo/1", b"/echo/3", b"/echo/4"]


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
        (b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST /echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
        (b"GET /echo/x HTTP/1.1\r\n\r\n", 400),
    ],
    ids=["request-line", "oversized-head", "length-and-chunked", "bad-chunk", "no-host"],
)
def test_bad_requests_get_4xx_and_the_worker_goes_on(gateway, request_bytes, status):
    raw = gateway.raw(request_bytes)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:200]
    assert b'"request_id":"' in raw
    assert gateway.request("GET", "/echo/after").status == 200


def test_request_body_streamed_both_ways(gateway):
    size = 24 * 1024 * 1024
    block = bytes(range(256)) * 4096

    def chunks():
        for _ in range(size // len(block)):
            yield block

    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.request("POST", "/up/upload", body=chunks(), encode_chunked=True,
                       headers={"Transfer-Encoding": "chunked"})
    result = json.loads(connection.getresponse().read())
    assert result["size"] == size
    assert result["sha256"] == hashlib.sha256(block * (size // len(block))).hexdigest()
    assert result["chunked"] == "chunked"
    payload = b"x" * (3 * 1024 * 1024)
    connection.request("POST", "/up/upload", body=payload)
    assert json.loads(connection.getresponse().read())["size"] == len(payload)
    connection.request("GET", f"/up/big?size={size}")
    response = connection.getresponse()
    digest, received = hashlib.sha256(), 0
    while piece := response.read(1 << 20):
        digest.update(piece)
        received += len(piece)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()
    connection.close()


def read_sse(port: int, path: str, timeout: float = 10.0) -> list[tuple[float, bytes]]:
    """(arrival time, bytes) for every recv until the stream's last chunk."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path.encode())
        reads = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            reads.append((time.monotonic(), data))
            if b"0\r\n\r\n" in data or b"[DONE]" in data and data.endswith(b"\r\n\r\n"):
                break
        return reads


def test_sse_events_leave_as_they_arrive(gateway):
    interval = 0.1
    reads = read_sse(gateway.port, f"/up/sse?n=6&interval={interval}")
    event_reads = [(at, data) for at, data in reads if b"data: " in data and b"[DONE]" not in data]
    assert len(event_reads) == 6, reads
    # One event per read: nothing was held back and coalesced.
    assert all(data.count(b"data: ") == 1 for _, data in event_reads)
    gaps = [b[0] - a[0] for a, b in zip(event_reads, event_reads[1:])]
    assert all(interval * 0.5 < gap < interval * 2.5 for gap in gaps), gaps
    # Each event left the gateway soon after the upstream sent it (same monotonic clock).
    for at, data in event_reads:
        sent = float(data.split(b"data: ")[1].split()[1])
        assert at - sent < 0.05


def test_client_disconnect_aborts_the_upstream_stream(gateway):
    token = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /up/sse?n=100&interval=0.05&token=%s HTTP/1.1\r\nHost: t\r\n\r\n" % token.encode())
        received = b""
        while b"data: 0" not in received:
            received += sock.recv(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = gateway.request("GET", f"/up/sse-state?token={token}").json()["state"]
        if state == "aborted":
            break
        time.sleep(0.05)
    assert state == "aborted"
