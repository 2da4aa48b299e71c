"""Operating a gateway: status, workers, reload, drain, crash restart, TLS, the demo."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.conftest import free_port


def config_with(upstream, *paths: str) -> dict:
    return {
        "_format_version": "3.0",
        "services": [
            {"name": f"svc{index}", "url": upstream.url, "routes": [{"name": f"r{index}", "paths": [path]}]}
            for index, path in enumerate(paths)
        ],
    }


def test_status_reports_server_counters_and_hash(start_gateway, upstream, impl):
    gateway = start_gateway(config_with(upstream, "/up"), impl=impl)
    assert gateway.request("GET", "/up/status/200").status == 200
    code, body = gateway.status()
    assert code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", body["configuration_hash"])
    server = body["server"]
    for name in ("connections_accepted", "connections_active", "connections_handled", "connections_reading",
                 "connections_waiting", "connections_writing", "total_requests"):
        assert isinstance(server[name], int)
    assert server["total_requests"] >= 1
    assert len(body["worker_pids"]) == 1


def test_workers_share_the_port(start_gateway, upstream):
    gateway = start_gateway(config_with(upstream, "/up"), workers=2)
    _, body = gateway.status()
    assert len(set(body["worker_pids"])) == 2
    assert all(gateway.request("GET", "/up/status/200").status == 200 for _ in range(20))


def test_reload_swaps_config_and_refuses_a_bad_file(start_gateway, upstream, impl):
    gateway = start_gateway(config_with(upstream, "/one"), impl=impl)
    assert gateway.request("GET", "/two/status/200").status == 404
    gateway.reload(config_with(upstream, "/one", "/two"))
    assert gateway.request("GET", "/two/status/200").status == 200
    _, before = gateway.status()
    gateway.write_config("_format_version: '3.0'\nservices: [{name: x}]\n")
    gateway.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    _, after = gateway.status()
    assert after["configuration_hash"] == before["configuration_hash"]
    assert "reload refused" in gateway.logs()
    assert "services[0].host" in gateway.logs()
    assert gateway.request("GET", "/two/status/200").status == 200


def test_reload_under_load_fails_no_request(start_gateway, upstream):
    gateway = start_gateway(config_with(upstream, "/up"), workers=2)
    failures, done, stop = [], [0], threading.Event()

    def load():
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        while not stop.is_set():
            try:
                connection.request("GET", "/up/status/200")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(response.status)
                done[0] += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        connection.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for round_number in range(3):
            gateway.reload(config_with(upstream, "/up", f"/extra{round_number}"))
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert done[0] > 50
    assert failures == []


def test_sigterm_drains_an_in_flight_stream(start_gateway, upstream, impl):
    gateway = start_gateway(config_with(upstream, "/up"), impl=impl)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /up/sse?n=10&interval=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while b"data: 0" not in received:
            received += sock.recv(65536)
        gateway.process.send_signal(signal.SIGTERM)
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"data: ") == 11  # 10 events and [DONE]: the stream finished
    assert received.endswith(b"0\r\n\r\n")
    assert gateway.process.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=1).close()


def test_crashed_worker_is_restarted(start_gateway, upstream):
    gateway = start_gateway(config_with(upstream, "/up"))
    _, body = gateway.status()
    (old_pid,) = body["worker_pids"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, body = gateway.status()
        if body["worker_pids"] and body["worker_pids"][0] != old_pid and body["server"]:
            break
        time.sleep(0.1)
    assert body["worker_pids"][0] != old_pid
    assert gateway.request("GET", "/up/status/200").status == 200
    assert "restarting it" in gateway.logs()


def test_tls_listener_and_https_only_route(start_gateway, upstream, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    plain_port, tls_port = free_port(), free_port()
    config = config_with(upstream, "/up")
    config["services"][0]["routes"][0]["protocols"] = ["https"]
    gateway = start_gateway(config, env={
        "FASTGATE_SSL_CERT": str(cert), "FASTGATE_SSL_CERT_KEY": str(key),
        "FASTGATE_PROXY_LISTEN": f"127.0.0.1:{plain_port}, 127.0.0.1:{tls_port} ssl",
    })
    gateway.port = plain_port
    assert gateway.request("GET", "/up/status/200").status == 426
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    connection = http.client.HTTPSConnection("127.0.0.1", tls_port, context=context, timeout=5)
    connection.request("GET", "/up/echo/tls")
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 200
    assert ["X-Forwarded-Proto", "https"] in body["headers"]
    connection.close()


def test_demo_serves_the_mock_ai_upstream(tmp_path):
    port, admin = free_port(), free_port()
    env = dict(os.environ, FASTGATE_PROXY_LISTEN=f"127.0.0.1:{port}", FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}",
               FASTGATE_WORKERS="1")
    process = subprocess.Popen([sys.executable, "-m", "fastgate", "demo"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            lines.append(line)
            if "Stop with Ctrl-C" in line:
                break
        output = "".join(lines)
        assert f"curl -i http://127.0.0.1:{port}/ai/models" in output, output
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/ai/models")
        assert json.loads(connection.getresponse().read())["object"] == "list"
        connection.request("POST", "/ai/chat/completions", body=json.dumps(
            {"stream": True, "messages": [{"role": "user", "content": "hi there"}]}),
            headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "text/event-stream"
        stream = response.read()
        assert stream.count(b"data: ") == 5 and stream.endswith(b"data: [DONE]\n\n")
        connection.close()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0


def test_drain_gives_up_after_the_graceful_timeout(start_gateway, upstream, impl):
    gateway = start_gateway(config_with(upstream, "/up"), impl=impl, env={"FASTGATE_GRACEFUL_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /up/sse?n=100&interval=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while b"data: 0" not in received:
            received += sock.recv(65536)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # the stream is cut, as it must be once the graceful timeout has passed
    assert gateway.process.wait(15) == 0
    elapsed = time.monotonic() - started
    assert elapsed > 0.9 and elapsed < 6, elapsed
    assert b"[DONE]" not in received  # 100 events at 0.1 s would have taken 10 s
