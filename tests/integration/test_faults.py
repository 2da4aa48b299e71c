"""Faults and protocol edges of the data plane, through real gateways on 127.0.0.1
(behavior.md 0, 2.4-2.5 and 8; README "Proxying"): backpressure, upstream timeouts and
retries, interim responses, HTTP/1.0 clients, snapshots across a reload, upstream keep-alive,
the forwarded headers."""

from __future__ import annotations

import hashlib
import http.client
import json
import select
import socket
import struct
import threading
import time
import uuid

import pytest

from tests.integration.conftest import free_port

MIB = 1024 * 1024
BLOCK = bytes(range(256)) * 256  # the 64 KiB the upstream's /big repeats
MSG_TIMEOUT = "The upstream server is timing out"
MSG_BAD_GATEWAY = "An invalid response was received from the upstream server"


def CONFIG(upstream):
    return {
        "_format_version": "3.0",
        "services": [
            {"name": "up", "url": upstream.url, "routes": [{"name": "up", "paths": ["/up"]}]},
            {"name": "raw", "url": upstream.raw_url, "read_timeout": 2000,
             "routes": [{"name": "raw", "paths": ["/raw"]}]},
            {"name": "no-read", "url": upstream.raw_url, "write_timeout": 300,
             "routes": [{"name": "no-read", "paths": ["/wt"]}]},
            {"name": "echo", "url": f"{upstream.url}/echo", "routes": [
                {"name": "stripped", "paths": ["/pfx"]},
                {"name": "root", "paths": ["/"], "hosts": ["root.test"]},
                {"name": "host-only", "hosts": ["hostonly.test"]},
                {"name": "preserved", "paths": ["/keep-host"], "preserve_host": True},
            ]},
            {"name": "unstripped", "url": upstream.url, "routes": [
                {"name": "unstripped", "paths": ["/echo"], "strip_path": False},
            ]},
        ],
    }


@pytest.fixture
def gateway(module_gateway):
    return module_gateway


# -- helpers --------------------------------------------------------------------------------


def big_digest(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // len(BLOCK)):
        digest.update(BLOCK)
    digest.update(BLOCK[: size % len(BLOCK)])
    return digest.hexdigest()


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def worker_pid(gateway) -> int:
    _, body = gateway.status()
    (pid,) = body["worker_pids"]
    return pid


class RawResponse:
    def __init__(self, status: int, head: bytes, headers: dict[str, str], body: bytes):
        self.status = status
        self.head = head
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class Reader:
    """Reads HTTP/1.x responses off a client socket, keeping what follows for the next one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            raise EOFError
        self.buffer += data

    def head(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return RawResponse(int(lines[0].split()[1]), head, headers, b"")

    def response(self) -> RawResponse:
        """The next final response (interim ones are skipped); its body by its framing."""
        response = self.head()
        while 100 <= response.status < 200:
            response = self.head()
        if "content-length" in response.headers:
            length = int(response.headers["content-length"])
            while len(self.buffer) < length:
                self._fill()
            response.body, self.buffer = self.buffer[:length], self.buffer[length:]
        elif response.headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size_line, _, self.buffer = self.buffer.partition(b"\r\n")
                size = int(size_line, 16)
                while len(self.buffer) < size + 2:
                    self._fill()
                body += self.buffer[:size]
                self.buffer = self.buffer[size + 2:]
                if size == 0:
                    break
            response.body = body
        else:
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed(self, timeout: float = 2.0) -> bool:
        """True when the peer closes the connection within `timeout` with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            self._fill()
        except EOFError:
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False


def connect(gateway, timeout: float = 5.0) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)
    return sock, Reader(sock)


def echoed_headers(response) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


def assert_gateway_error(response, status: int, message: str) -> None:
    """`response`: a RawResponse or conftest's Response (whose headers ignore case)."""
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = json.loads(response.body)
    assert body == {"message": message, "request_id": response.headers["x-fastgate-request-id"]}


# -- 1. backpressure: bounded memory both ways ---------------------------------------------

# Allowed growth of the worker's peak RSS over its warmed-up value: the gateway may hold a
# few reads per connection, never the body (200 MB down, 128 MB up).
RSS_HEADROOM = 40 * MIB


def bounded_config(upstream):
    return {"_format_version": "3.0",
            "services": [{"name": "up", "url": upstream.url, "routes": [{"name": "up", "paths": ["/up"]}]}]}


def warmed_up_worker(gateway) -> int:
    pid = worker_pid(gateway)
    # Run every code path once (streaming down, streaming up) so that the baseline includes
    # the interpreter's one-off allocations.
    assert gateway.request("GET", f"/up/big?size={4 * MIB}").status == 200
    assert gateway.request("POST", "/up/upload", body=b"x" * (4 * MIB)).status == 200
    return pid


def upstream_get(upstream, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", upstream.http_port, timeout=5)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def wait_for_stall(read_progress, *, within: float, still_for: float = 0.5) -> int:
    """Poll `read_progress()` until it has not moved for `still_for` s; return its value."""
    deadline = time.monotonic() + within
    last, since = read_progress(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read_progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still_for:
            return now
    raise AssertionError(f"still moving after {within} s (at {last} bytes)")


def test_slow_reader_pauses_the_upstream_and_memory_stays_bounded(start_gateway, upstream, impl):
    gateway = start_gateway(bounded_config(upstream), impl=impl)
    pid = warmed_up_worker(gateway)
    baseline = peak_rss(pid)
    size, token = 200 * MIB, uuid.uuid4().hex
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", f"/up/big?size={size}&token={token}")
        response = connection.getresponse()
        digest, received = hashlib.sha256(), 0
        while received < MIB:
            piece = response.read(64 * 1024)
            digest.update(piece)
            received += len(piece)
        # The client stops reading: socket buffers fill, then the gateway must stop reading
        # the upstream, whose writes then stall (it awaits drain on every 64 KiB).
        sent = wait_for_stall(lambda: upstream_get(upstream, f"/big-state?token={token}")["sent"], within=5)
        assert sent < size // 2, f"the upstream sent {sent} bytes to a client that read 1 MiB"
        time.sleep(0.5)  # paused for a while: nothing more may come
        assert upstream_get(upstream, f"/big-state?token={token}")["sent"] == sent
        assert peak_rss(pid) - baseline < RSS_HEADROOM, (baseline, peak_rss(pid))
        while piece := response.read(MIB):
            digest.update(piece)
            received += len(piece)
    finally:
        connection.close()
    assert received == size
    assert digest.hexdigest() == big_digest(size)
    assert peak_rss(pid) - baseline < RSS_HEADROOM, (baseline, peak_rss(pid))


def test_slow_upstream_reader_pauses_the_client_and_memory_stays_bounded(start_gateway, upstream, impl):
    gateway = start_gateway(bounded_config(upstream), impl=impl)
    pid = warmed_up_worker(gateway)
    baseline = peak_rss(pid)
    size = 128 * MIB
    sent = [0]
    piece = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, not the same byte repeated

    def body():
        for _ in range(size // len(piece)):
            yield piece
            sent[0] += len(piece)

    result: dict = {}

    def upload():
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        connection.request("POST", f"/up/slow-upload?pause=2.5&after={MIB}", body=body(),
                           headers={"Content-Length": str(size)})
        response = connection.getresponse()
        result.update(status=response.status, body=json.loads(response.read()))
        connection.close()

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        # The upstream stops reading after 1 MiB for 2.5 s: the client's sends must stall.
        stalled_at = wait_for_stall(lambda: sent[0], within=2.2, still_for=0.4)
        assert stalled_at < size // 2, f"the gateway took {stalled_at} bytes the upstream did not read"
        assert peak_rss(pid) - baseline < RSS_HEADROOM, (baseline, peak_rss(pid))
    finally:
        thread.join(15)
    assert result["status"] == 200, result
    expected = hashlib.sha256()
    for _ in range(size // len(piece)):
        expected.update(piece)
    assert result["body"] == {"size": size, "sha256": expected.hexdigest()}
    assert peak_rss(pid) - baseline < RSS_HEADROOM, (baseline, peak_rss(pid))


# -- 2-4. connect / write timeouts and retries ---------------------------------------------


@pytest.fixture
def unanswered_port():
    """A port on 127.0.0.1 where a connect neither succeeds nor fails: a listener that never
    accepts, with its accept queue full (listen(0) takes one connection, then Linux drops
    further SYNs, so the connecting side keeps retransmitting)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [filler], [], 0.1)
            if not writable:
                break  # this connect hangs: the queue is full
            if filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                pytest.skip("this kernel refuses connections to a full accept queue (tcp_abort_on_overflow?)")
        else:
            pytest.skip("this kernel kept accepting connections into a listen(0) queue")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def timing_out_config(port: int) -> dict:
    return {
        "_format_version": "3.0",
        "services": [
            {"name": f"retries{retries}", "url": f"http://127.0.0.1:{port}", "connect_timeout": 300,
             "retries": retries, "routes": [{"name": f"r{retries}", "paths": [f"/retries{retries}"]}]}
            for retries in (0, 1, 3)
        ],
    }


def timed_request(gateway, path: str):
    started = time.monotonic()
    response = gateway.request("GET", path, timeout=10)
    return response, time.monotonic() - started


def test_connect_timeout_is_504_after_retries_attempts(start_gateway, unanswered_port, impl):
    gateway = start_gateway(timing_out_config(unanswered_port), impl=impl)
    once, once_elapsed = timed_request(gateway, "/retries0/x")
    twice, twice_elapsed = timed_request(gateway, "/retries1/x")
    four_times, four_elapsed = timed_request(gateway, "/retries3/x")
    for response in (once, twice, four_times):
        assert_gateway_error(response, 504, MSG_TIMEOUT)
    # Each attempt waits its full connect_timeout (300 ms, then up to a 50 ms tick): one
    # attempt stays below two timeouts; retries + 1 attempts take at least retries + 1 of them.
    assert once_elapsed > 0.28 and once_elapsed < 0.58, once_elapsed
    assert twice_elapsed > 0.58 and twice_elapsed < 2.0, twice_elapsed
    assert four_elapsed > 1.18 and four_elapsed < 2.5, four_elapsed


def failed_connects() -> int:
    """Linux's count of connects that failed (SYN_SENT -> CLOSED, e.g. refused) in this
    network namespace."""
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("AttemptFails")])


def test_connection_refused_is_retried_retries_times_then_502(start_gateway, impl):
    refused = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway({"_format_version": "3.0", "services": [
        {"name": "once", "url": refused, "retries": 0, "routes": [{"name": "once", "paths": ["/once"]}]},
        {"name": "four", "url": refused, "retries": 3, "routes": [{"name": "four", "paths": ["/four"]}]},
    ]}, impl=impl)

    def attempts(path: str) -> int:
        # The counter is namespace-wide: the fewest seen over a few tries is the gateway's own.
        counts = []
        for _ in range(3):
            before = failed_connects()
            assert_gateway_error(gateway.request("GET", path), 502, MSG_BAD_GATEWAY)
            counts.append(failed_connects() - before)
        return min(counts)

    assert attempts("/once/x") == 1
    assert attempts("/four/x") == 4


def test_reset_after_connect_is_502_without_retry(start_gateway, impl):
    """A connection that was made and then reset before the response head is not retried
    (README: only connection failures are, and a stale pooled connection once). nginx,
    hence Kong, would also retry this one for a GET (`proxy_next_upstream error`)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    accepted, stop = [0], threading.Event()

    def reset_everything():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            accepted[0] += 1
            conn.settimeout(2)
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # with SO_LINGER 0: a reset

    thread = threading.Thread(target=reset_everything)
    thread.start()
    try:
        port = listener.getsockname()[1]
        gateway = start_gateway({"_format_version": "3.0", "services": [
            {"name": "reset", "url": f"http://127.0.0.1:{port}", "retries": 3,
             "routes": [{"name": "reset", "paths": ["/reset"]}]},
        ]}, impl=impl)
        assert_gateway_error(gateway.request("GET", "/reset/x"), 502, MSG_BAD_GATEWAY)
        assert accepted[0] == 1
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_write_timeout_is_504(gateway):
    """/raw/no-read takes the request head and never reads the body: once the socket buffers
    are full the gateway's writes wait, and write_timeout (300 ms) ends the exchange."""
    size = 256 * MIB
    sock, reader = connect(gateway, timeout=5)
    stop = threading.Event()

    def send_body():
        block = b"u" * (1 * MIB)
        try:
            sock.sendall(b"POST /wt/no-read HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                if stop.is_set():
                    return
                sock.sendall(block)
        except OSError:
            pass  # the gateway closed the connection after its 504

    started = time.monotonic()
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        response = reader.response()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        sock.close()
        sender.join(10)
    assert_gateway_error(response, 504, MSG_TIMEOUT)
    assert response.headers["connection"] == "close"  # the rest of the body is not read
    assert elapsed < 5.0, elapsed


# -- 1xx and the held body ---------------------------------------------------------------


def test_expect_100_continue_is_relayed_then_the_final_response(gateway):
    body = b"0123456789" * 100_000
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"POST /up/upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                     % len(body))
        interim = reader.head()  # nothing of the body was sent: only the upstream's 100 can come
        assert interim.head == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        final = reader.response()
    assert final.status == 200
    assert final.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "chunked": None}


def test_interim_103_is_relayed_before_the_final_response(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET /raw/early-hints HTTP/1.1\r\nHost: t\r\n\r\n")
        interim = reader.head()
        interim_at = time.monotonic()
        final = reader.response()
        final_at = time.monotonic()
    assert interim.status == 103
    assert interim.headers["link"] == "</style.css>; rel=preload"
    assert final_at - interim_at > 0.05  # relayed when it came, 100 ms before the final one
    assert final.status == 200 and final.body == b"final" and final.headers["x-final"] == "yes"
    assert "x-fastgate-request-id" in final.headers


def test_no_interim_response_to_an_http10_client(gateway):
    """RFC 9110 15.2: a server must not send a 1xx response to an HTTP/1.0 client."""
    raw = gateway.raw(b"GET /raw/early-hints HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
    assert b" 103 " not in raw
    assert raw.endswith(b"\r\n\r\nfinal")


HELD_BOUND = 64 * 1024  # request body the gateway holds while no upstream connection takes it


def send_past_the_hold_bound(sock: socket.socket, head: bytes) -> None:
    """The head and exactly HELD_BOUND bytes of body, then 1 KiB more: however the gateway's
    reads split it, the read that takes the held body past its bound (the gateway then pauses
    the client's reads) is the one that completes the body."""
    sock.sendall(head + b"h" * HELD_BOUND)
    time.sleep(0.05)
    sock.sendall(b"h" * 1024)


def test_held_body_pause_ends_with_an_error_answer(start_gateway, upstream, unanswered_port, impl):
    """While the upstream connection is being made the body is held, past its bound the
    client's reads pause; when the request is answered without a connection (here 504), the
    pause must end, or the next request on the connection is never read."""
    gateway = start_gateway({"_format_version": "3.0", "services": [
        {"name": "up", "url": upstream.url, "routes": [{"name": "up", "paths": ["/up"]}]},
        {"name": "hang", "url": f"http://127.0.0.1:{unanswered_port}", "connect_timeout": 300, "retries": 0,
         "routes": [{"name": "hang", "paths": ["/hang"]}]},
    ]}, impl=impl)
    sock, reader = connect(gateway, timeout=3)
    with sock:
        send_past_the_hold_bound(
            sock, b"POST /hang/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (HELD_BOUND + 1024))
        first = reader.response()
        assert_gateway_error(first, 504, MSG_TIMEOUT)
        assert first.headers["connection"] == "keep-alive"  # the whole request was read
        sock.sendall(b"GET /up/status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.response().status == 200


def test_held_body_of_a_pipelined_request_does_not_stall_the_connection(gateway):
    """A pipelined request's body is held while the one before it is answered; answered
    itself by the gateway (404), it must not leave the client's reads paused."""
    sock, reader = connect(gateway, timeout=3)
    with sock:
        send_past_the_hold_bound(
            sock, b"GET /up/slow?delay=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (HELD_BOUND + 1024))
        assert reader.response().status == 200
        second = reader.response()
        assert second.status == 404 and second.headers["connection"] == "keep-alive"
        sock.sendall(b"GET /up/status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.response().status == 200


# -- 6. HTTP/1.0 clients -------------------------------------------------------------------


def test_http10_client_gets_a_close_delimited_body(gateway):
    size = 300_000
    sock, reader = connect(gateway)
    with sock:
        # The upstream answers the gateway's HTTP/1.1 request in chunks (no Content-Length).
        sock.sendall(b"GET /up/big?size=%d HTTP/1.0\r\n\r\n" % size)
        response = reader.response()
    assert response.status == 200
    assert "transfer-encoding" not in response.headers
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "close"
    assert reader.eof  # the body ended when the gateway closed the connection
    assert len(response.body) == size
    assert hashlib.sha256(response.body).hexdigest() == big_digest(size)


def test_http10_client_connection_closes_by_default(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET /up/echo/one HTTP/1.0\r\n\r\n")
        response = reader.response()
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert response.json()["path"] == "/echo/one"
        assert reader.closed()


def test_http10_client_keep_alive_only_when_asked(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET /up/echo/one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = reader.response()
        assert first.status == 200
        assert first.headers["connection"].lower() == "keep-alive"
        assert "content-length" in first.headers
        assert first.json()["path"] == "/echo/one"
        sock.sendall(b"GET /nowhere HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        second = reader.response()
        assert second.status == 404 and second.headers["connection"].lower() == "keep-alive"
        # Keep-alive asked, but a body without a length can only end with the connection.
        sock.sendall(b"GET /up/big?size=1000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        third = reader.response()
        assert third.status == 200 and third.headers["connection"] == "close"
        assert "transfer-encoding" not in third.headers
        assert third.body == BLOCK[:1000]
        assert reader.eof


# -- 7. snapshots across a reload ----------------------------------------------------------


def reload_config(upstream, path: str) -> dict:
    return {"_format_version": "3.0", "services": [
        {"name": "svc", "url": upstream.url, "routes": [{"name": "r", "paths": [path]}]},
    ]}


def test_in_flight_requests_keep_their_snapshot_across_a_reload(start_gateway, upstream, impl):
    gateway = start_gateway(reload_config(upstream, "/old"), impl=impl)
    delay = 1.0
    # A: a slow request at the upstream, and one pipelined behind it (parsed already, not yet
    # routed). B: a request whose head is half sent.
    a, a_reader = connect(gateway, timeout=10)
    b, b_reader = connect(gateway, timeout=10)
    with a, b:
        sent_at = time.monotonic()
        a.sendall(b"GET /old/slow?delay=%.1f HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /old/echo/pipelined HTTP/1.1\r\nHost: t\r\n\r\n" % delay)
        b.sendall(b"GET /old/echo/half HTTP/1.1\r\nHo")
        time.sleep(0.2)  # both reached the worker
        gateway.reload(reload_config(upstream, "/new"))
        reloaded_after = time.monotonic() - sent_at
        assert reloaded_after < delay - 0.3, "the reload must land while the slow request is in flight"
        assert gateway.request("GET", "/old/echo/x").status == 404
        assert gateway.request("GET", "/new/echo/x").status == 200
        b.sendall(b"st: t\r\n\r\n")
        half = b_reader.response()
        assert half.status == 200 and half.json()["path"] == "/echo/half"
        slow = a_reader.response()
        assert slow.status == 200 and slow.json() == {"slept": True}
        assert time.monotonic() - sent_at >= delay
        pipelined = a_reader.response()
        assert pipelined.status == 200 and pipelined.json()["path"] == "/echo/pipelined"
        # The connection's next request starts now: it gets the new snapshot.
        a.sendall(b"GET /old/echo/late HTTP/1.1\r\nHost: t\r\n\r\n")
        assert a_reader.response().status == 404


# -- 8. upstream keep-alive ------------------------------------------------------------------


def test_sequential_requests_reuse_one_upstream_connection(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    peers = set()
    for index in range(20):
        if index % 3 == 0:
            connection.request("POST", "/up/peer", body=b"b" * 5000)
        else:
            connection.request("GET", "/up/peer")
        response = connection.getresponse()
        assert response.status == 200
        peers.add(tuple(json.loads(response.read()).values()))
    connection.close()
    assert len(peers) == 1, peers
    # The pool belongs to the worker, not to the client connection.
    for _ in range(5):
        peers.add(tuple(gateway.request("GET", "/up/peer").json().values()))
    assert len(peers) == 1, peers


def send_in_background(sock: socket.socket, data: bytes, block: int = MIB) -> threading.Thread:
    """sendall `data` from a thread, block by block, until done or the gateway closes."""

    def send():
        try:
            for at in range(0, len(data), block):
                sock.sendall(data[at:at + block])
        except OSError:
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_upstream_answering_before_reading_the_body_leaves_the_client_usable(gateway):
    """/raw/answer-early answers at once and reads the rest of the request body 0.3 s later.
    The client connection goes on when the gateway had read the whole body, else it is
    closed; it is never left open with its reads paused."""
    outcomes = set()
    for size in (10_000, 200_000, 2 * MIB, 32 * MIB):
        sock, reader = connect(gateway, timeout=3)
        with sock:
            sender = send_in_background(
                sock, b"POST /raw/answer-early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
                + b"e" * size)
            first = reader.response()
            assert first.status == 200 and first.body == b"early"
            sender.join(5)
            try:
                sock.sendall(b"GET /up/status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
                assert reader.response().status == 200, size
                outcomes.add("kept")
            except (EOFError, ConnectionError):
                outcomes.add("closed")
            # A socket.timeout here is the failure: the connection was left open, not read.
    assert outcomes == {"kept", "closed"}  # both ends of the range were reached


# -- 9. forwarded headers and Host -----------------------------------------------------------


def test_forwarded_prefix_only_when_a_prefix_was_stripped(gateway):
    stripped = gateway.request("GET", "/pfx/a/b?q=1")
    assert stripped.json()["path"] == "/echo/a/b?q=1"
    seen = echoed_headers(stripped)
    assert seen["x-forwarded-prefix"] == ["/pfx"]
    assert seen["x-forwarded-path"] == ["/pfx/a/b"]
    for path, headers, upstream_path in [
        ("/echo/a", {}, "/echo/a"),  # strip_path: false
        ("/a", {"Host": "root.test"}, "/echo/a"),  # the stripped prefix is "/"
        ("/a", {"Host": "hostonly.test"}, "/echo/a"),  # no path matched
    ]:
        response = gateway.request("GET", path, headers=headers)
        assert response.json()["path"] == upstream_path
        assert "x-forwarded-prefix" not in echoed_headers(response), (path, headers)


def test_a_client_cannot_forge_forwarded_prefix(gateway):
    seen = echoed_headers(gateway.request("GET", "/echo/a", headers={"X-Forwarded-Prefix": "/forged"}))
    assert "x-forwarded-prefix" not in seen


def test_preserve_host_forwards_the_client_host(gateway, upstream):
    preserved = echoed_headers(gateway.request("GET", "/keep-host/x", headers={"Host": "api.example.test:8443"}))
    assert preserved["host"] == ["api.example.test:8443"]
    assert preserved["x-forwarded-host"] == ["api.example.test"]
    replaced = echoed_headers(gateway.request("GET", "/pfx/x", headers={"Host": "api.example.test:8443"}))
    assert replaced["host"] == [f"127.0.0.1:{upstream.http_port}"]
    assert replaced["x-forwarded-host"] == ["api.example.test"]
    # An HTTP/1.0 request may come without a Host: the service's is sent then.
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET /keep-host/x HTTP/1.0\r\n\r\n")
        hostless = echoed_headers(reader.response())
    assert hostless["host"] == [f"127.0.0.1:{upstream.http_port}"]


def test_default_port_host_has_no_port(start_gateway, impl):
    """A service on port 80 gets `Host: <host>` without `:80` (behavior.md 2.5)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", 80))
    except OSError as exc:
        listener.close()
        pytest.skip(f"cannot listen on 127.0.0.1:80 ({exc})")
    listener.listen(4)
    listener.settimeout(5)
    heads: list[bytes] = []

    def answer_once():
        conn, _ = listener.accept()
        conn.settimeout(5)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            heads.append(data.split(b"\r\n\r\n")[0])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        gateway = start_gateway({"_format_version": "3.0", "services": [
            {"name": "port80", "url": "http://127.0.0.1:80/", "routes": [{"name": "p", "paths": ["/p80"]}]},
        ]}, impl=impl)
        response = gateway.request("GET", "/p80/x")
        thread.join(5)
    finally:
        listener.close()
    assert response.status == 200 and response.body == b"ok"
    host_lines = [line for line in heads[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert host_lines == [b"Host: 127.0.0.1"]


@pytest.mark.parametrize("size", [256 * 1024, 8 * 1024 * 1024])
def test_a_gateway_answer_to_an_upload_reaches_the_client(gateway, size):
    # The gateway answers (404) before the client has sent its body. Closing at once would
    # reset the connection under a client that is still sending, and it would see a reset
    # instead of the answer; the gateway reads the rest of the body first (lingering close).
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("POST", "/nowhere", body=b"x" * size)
    response = connection.getresponse()
    assert response.status == 404
    assert json.loads(response.read())["message"] == "no Route matched with those values"
    connection.close()
