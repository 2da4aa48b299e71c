"""The redis policy / strategy against a real redis-server on a free loopback port: exact across
two gateways, and what happens when Redis dies, freezes, loses its scripts and comes back."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import hiredis
import pytest

from tests.integration.conftest import GatewayProcess, free_port
from tests.integration.test_rate_limiting import _burst

# Checks wait this long for Redis before the node's counters decide.
TIMEOUT_MS = 300
# sync_rate > 0: the workers add their counts to Redis this often.
SYNC_SECONDS = 0.1


class RedisServer:
    """A redis-server of our own: no persistence, loopback only; `options` add to its command
    line, `setup` are the commands a client sends first (AUTH, SELECT), `tls` an SSL context
    when it listens with TLS only."""

    def __init__(self, directory, options=(), setup=(), tls=None):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
        self.port = free_port()
        self.directory = directory
        self.options = list(options)
        self.setup = list(setup)
        self.tls = tls
        self.process = None
        self.start()

    def start(self):
        listen = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        self.process = subprocess.Popen(
            ["redis-server", *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.options],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command(b"PING") == b"PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def command(self, *parts: bytes):
        requests = [*self.setup, parts]
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
            sock = self.tls.wrap_socket(raw, server_hostname="localhost") if self.tls else raw
            sock.sendall(b"".join(b"*%d\r\n" % len(request) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in request)
                                  for request in requests))
            reader = hiredis.Reader()
            replies = []
            while len(replies) < len(requests):
                reply = reader.gets()
                if reply is False:
                    reader.feed(sock.recv(65536))
                else:
                    replies.append(reply)
            return replies[-1]

    def stop(self):
        self.process.terminate()
        self.process.wait(10)

    def freeze(self):
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.process.pid, signal.SIGCONT)


def CONFIG(upstream, redis_port):
    redis = {"host": "127.0.0.1", "port": redis_port, "timeout": TIMEOUT_MS}

    def route(name, plugin):
        return {"name": name, "paths": [f"/{name}"], "plugins": [plugin]}

    def limits(**config):
        return {"name": "rate-limiting", "config": {"limit_by": "ip", "policy": "redis", "redis": redis, **config}}

    def advanced(**config):
        return {"name": "rate-limiting-advanced", "config": {
            "identifier": "ip", "strategy": "redis", "sync_rate": 0, "redis": redis, **config}}

    return {
        "_format_version": "3.0",
        "services": [{"name": "echo", "url": f"{upstream.url}/echo", "routes": [
            route("fixed-50", limits(day=50)),
            route("advanced-50", advanced(limit=[50], window_size=[86400], window_type="fixed")),
            route("sliding", advanced(limit=[3], window_size=[3600])),
            route("tolerant", limits(day=3)),
            route("frozen", limits(day=3)),
            route("strict", limits(day=1000, fault_tolerant=False)),
            route("flushed", limits(day=1000)),
            route("synced-fixed", limits(day=50, sync_rate=SYNC_SECONDS)),
            route("synced-sliding", advanced(limit=[50], window_size=[86400], sync_rate=SYNC_SECONDS)),
        ]}],
    }


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateways(upstream, redis, tmp_path_factory):
    """Two gateways (two nodes) on different ports sharing one Redis."""
    started = [GatewayProcess(tmp_path_factory.mktemp(f"node{i}"), CONFIG(upstream, redis.port)) for i in range(2)]
    yield started
    for gateway in started:
        gateway.stop()


def wait_redis_up(gateway, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = gateway.status()[1]["server"]
        if server["redis_connections_up"] >= 1 and server["redis_connections_down"] == 0:
            return server
        time.sleep(0.1)
    raise AssertionError(f"Redis not back in use: {gateway.status()}")


def timed_requests(gateway, path, count):
    """`count` requests one after another: their statuses and how long each took (s)."""
    statuses, timings = [], []
    for _ in range(count):
        began = time.monotonic()
        statuses.append(gateway.request("GET", path).status)
        timings.append(time.monotonic() - began)
    return statuses, timings


async def _two_bursts(gateways, path):
    return await asyncio.gather(*(_burst(gateway.port, path, 100) for gateway in gateways))


@pytest.mark.parametrize("path", ["/fixed-50", "/advanced-50"])
def test_two_gateways_sharing_redis_admit_exactly_the_limit(gateways, path):
    for gateway in gateways:
        wait_redis_up(gateway)
    answers = asyncio.run(_two_bursts(gateways, path))
    statuses = [status for burst in answers for status, _ in burst]
    assert (statuses.count(200), statuses.count(429)) == (50, 150)
    # Both nodes see the shared count: each now denies, whichever admitted the 50.
    assert [gateway.request("GET", path).status for gateway in gateways] == [429, 429]


def test_sliding_window_in_redis_with_headers(gateways, redis):
    first, second = gateways
    statuses = [gateway.request("GET", "/sliding").status for gateway in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]
    denied = second.request("GET", "/sliding")
    assert denied.headers["X-RateLimit-Limit-Hour"] == "3" and denied.headers["X-RateLimit-Remaining-Hour"] == "0"
    assert int(denied.headers["Retry-After"]) >= 1
    keys = redis.command(b"KEYS", b"*|3600|*")
    assert keys, "the sliding counters are in Redis"


def test_a_lost_script_is_loaded_again(gateways, redis):
    gateway = gateways[0]
    wait_redis_up(gateway)
    redis.command(b"SCRIPT", b"FLUSH")
    # The check that meets NOSCRIPT is decided on the node (fault tolerant); the scripts are
    # loaded again, and the next checks count in Redis.
    assert gateway.request("GET", "/flushed").status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert gateway.request("GET", "/flushed").status == 200
        if redis.command(b"KEYS", b"ratelimit:*:day"):
            break
        time.sleep(0.05)
    assert redis.command(b"KEYS", b"ratelimit:*:day")


def test_redis_down_then_back(gateways, redis):
    gateway = gateways[0]
    wait_redis_up(gateway)
    outages_before = gateway.status()[1]["server"]["redis_outages"]
    redis.stop()
    try:
        # fault_tolerant (the default): the node's counters limit, and nobody waits.
        statuses, timings = timed_requests(gateway, "/tolerant", 4)
        assert statuses == [200, 200, 200, 429]
        assert max(timings) < TIMEOUT_MS / 1000 + 0.5, timings
        # fault_tolerant false: 500.
        response = gateway.request("GET", "/strict")
        assert (response.status, response.json()["message"]) == (500, "An unexpected error occurred")
        server = gateway.status()[1]["server"]
        assert server["redis_connections_down"] >= 1 and server["redis_outages"] > outages_before
        logs = gateway.logs()
        assert logs.count("is unavailable") == server["redis_outages"], "logged once per outage"
    finally:
        redis.start()
    # Back by itself: the probe reconnects, reloads the scripts, and checks go to Redis again.
    wait_redis_up(gateway)
    assert gateway.request("GET", "/strict").status == 200
    assert "is back" in gateway.logs()


def test_a_frozen_redis_costs_a_request_at_most_the_timeout(gateways, redis):
    gateway = gateways[1]
    wait_redis_up(gateway)
    redis.freeze()
    try:
        statuses, timings = timed_requests(gateway, "/frozen", 4)
        # The first check waits out the timeout, then the node decides; the next ones do not
        # wait at all while Redis is down.
        assert statuses == [200, 200, 200, 429]
        assert TIMEOUT_MS / 1000 * 0.8 < timings[0] < TIMEOUT_MS / 1000 + 0.5, timings
        assert max(timings[1:]) < 0.2, timings
    finally:
        redis.thaw()
    wait_redis_up(gateway)


@pytest.mark.parametrize(("path", "pattern"), [("/synced-fixed", b"ratelimit:*:day"), ("/synced-sliding", b"*|86400|*")])
def test_sync_rate_counts_locally_within_the_documented_bound(gateways, redis, path, pattern):
    for gateway in gateways:
        wait_redis_up(gateway)
    before = set(redis.command(b"KEYS", pattern))
    answers = asyncio.run(_two_bursts(gateways, path))
    admitted = sum(status == 200 for burst in answers for status, _ in burst)
    # Two workers (one per node), both starting from a total of 0: each may admit the whole
    # limit before the first sync, so between L and 2 x L pass (the bound in redis_counters.py).
    assert 50 <= admitted <= 100, admitted
    time.sleep(SYNC_SECONDS * 4)
    # After a sync every node sees the shared total and denies.
    assert [gateway.request("GET", path).status for gateway in gateways] == [429, 429]
    time.sleep(SYNC_SECONDS * 4)
    # Redis holds every count: the admitted requests for rate-limiting (a denied request counts
    # nowhere), all 202 for rate-limiting-advanced (its default penalty counts denials too).
    counters = set(redis.command(b"KEYS", pattern)) - before  # this route's counters
    expected = admitted if path == "/synced-fixed" else 202
    assert sum(int(redis.command(b"GET", key)) for key in counters) == expected


def test_password_database_and_tls(upstream, start_gateway, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    secured = RedisServer(tmp_path, options=["--requirepass", "s3cret"], setup=[(b"AUTH", b"s3cret"), (b"SELECT", b"3")])
    encrypted = RedisServer(tmp_path, tls=client_tls, options=[
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no"])
    try:
        def route(name, redis):
            return {"name": name, "paths": [f"/{name}"], "plugins": [{"name": "rate-limiting", "config": {
                "day": 2, "limit_by": "ip", "policy": "redis", "redis": {"host": "127.0.0.1", "timeout": 1000, **redis}}}]}

        gateway = start_gateway({"_format_version": "3.0", "services": [{"name": "echo", "url": f"{upstream.url}/echo",
                                 "routes": [
            route("secured", {"port": secured.port, "password": "s3cret", "database": 3}),
            route("encrypted", {"port": encrypted.port, "ssl": True}),
            route("refused", {"port": secured.port, "password": "wrong"}),
        ]}]})
        server = gateway.status()[1]["server"]
        assert (server["redis_connections_up"], server["redis_connections_down"]) == (2, 1)
        for path, redis in (("/secured", secured), ("/encrypted", encrypted)):
            assert [gateway.request("GET", path).status for _ in range(3)] == [200, 200, 429]
            counters = redis.command(b"KEYS", b"ratelimit:*")
            assert len(counters) == 1 and redis.command(b"GET", counters[0]) == b"2"
        # The wrong password: refused at setup, so this route counts on the node (fault tolerant).
        assert [gateway.request("GET", "/refused").status for _ in range(3)] == [200, 200, 429]
        assert "setup failed" in gateway.logs()
        assert b"s3cret" not in gateway.logs().encode() and "wrong" not in gateway.logs()
    finally:
        secured.stop()
        encrypted.stop()
