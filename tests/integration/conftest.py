"""Real processes on 127.0.0.1: the test upstream servers and `fastgate run` gateways."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
START_TIMEOUT_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream:
    def __init__(self, http_port: int, raw_port: int):
        self.http_port = http_port
        self.raw_port = raw_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.raw_url = f"http://127.0.0.1:{raw_port}"


@pytest.fixture(scope="session")
def upstream():
    http_port, raw_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "upstream_server.py"), str(http_port), str(raw_port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout.readline().strip() == b"ready"
        yield Upstream(http_port, raw_port)
    finally:
        process.terminate()
        process.wait(10)


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class GatewayProcess:
    """One `fastgate run` (supervisor + workers) with its config file in a temp dir."""

    def __init__(self, tmp_path: Path, config, *, workers: int = 1, impl: str = "compiled", env: dict | None = None):
        self.config_path = tmp_path / "gateway.yaml"
        self.write_config(config)
        self.port = free_port()
        self.admin_port = free_port()
        self.log_path = tmp_path / "gateway.log"
        environment = dict(os.environ)
        environment.update(
            FASTGATE_PROXY_LISTEN=f"127.0.0.1:{self.port}",
            FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{self.admin_port}",
            FASTGATE_WORKERS=str(workers),
            FASTGATE_NO_EXTENSIONS="1" if impl == "pure" else "0",
            FASTGATE_LOG_LEVEL="info",
        )
        environment.update(env or {})
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "--config", str(self.config_path)],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def write_config(self, config) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def status(self) -> tuple[int, dict | None]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            connection.request("GET", "/status")
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.logs()}")
            try:
                code, body = self.status()
                if code == 200:
                    return body
            except (ConnectionError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"gateway not ready in {START_TIMEOUT_SECONDS} s:\n{self.logs()}")

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
                timeout: float = 10.0) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            connection.close()

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes, read until the gateway closes the connection (or `timeout`)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except socket.timeout:
                pass
            return b"".join(chunks)

    def reload(self, config) -> str:
        """Write `config`, SIGHUP, and wait until every worker serves it; returns the new hash."""
        _, before = self.status()
        self.write_config(config)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            _, body = self.status()
            if body["configuration_hash"] != before["configuration_hash"]:
                # The supervisor switches its hash when it sends the new config; one more
                # status round trip, queued behind that config on each worker's channel,
                # returns only once every worker has applied it.
                self.status()
                return body["configuration_hash"]
            time.sleep(0.05)
        raise AssertionError(f"reload not applied:\n{self.logs()}")

    def stop(self, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(params=["compiled", "pure"])
def impl(request) -> str:
    return request.param


@pytest.fixture
def start_gateway(tmp_path):
    started: list[GatewayProcess] = []

    def start(config, **kwargs) -> GatewayProcess:
        directory = tmp_path / f"gateway{len(started)}"
        directory.mkdir()
        gateway = GatewayProcess(directory, config, **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module", params=["compiled", "pure"])
def module_gateway(request, tmp_path_factory):
    """One gateway per module and implementation, for a module's `CONFIG(upstream)`."""
    upstream = request.getfixturevalue("upstream")
    config = request.module.CONFIG(upstream)
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), config, impl=request.param)
    yield gateway
    gateway.stop()
