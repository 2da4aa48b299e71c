"""The `fastgate` command as a user runs it (real subprocesses)."""

import subprocess
import sys
import textwrap

VALID = """\
_format_version: "3.0"
services:
  - name: echo
    url: http://127.0.0.1:9/api
    routes:
      - name: r1
        paths: ["/v1"]
"""

INVALID = """\
_format_version: "3.0"
services:
  - name: echo
    url: http://127.0.0.1:9/api
    port: 70000
    routes:
      - name: r1
        paths: ["/v1"]
      - name: r2
        paths: ["v2"]
routes:
  - name: r3
    paths: ["/v3"]
    service: nope
plugins:
  - name: prometheus
"""


def fastgate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True, env=env)


def test_validate_accepts_a_valid_file(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID)
    result = fastgate("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid (1 services, 1 routes" in result.stdout


def test_validate_reports_every_problem_with_its_path(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(INVALID)
    result = fastgate("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "services[0].routes[1].paths[0]: must start with / or ~/" in lines
    assert "routes[0].service: invalid reference 'service: nope' (no such entry in 'services')" in lines
    assert "plugins[0].name: plugin 'prometheus' is not supported yet" in lines
    assert "services[0].port: value should be between 0 and 65535" in lines
    assert len(lines) == 4


def test_validate_reads_fastgate_config_and_names_a_missing_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = fastgate("validate", env={"FASTGATE_CONFIG": str(missing), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.startswith(f"{missing}: cannot read the file")


def test_run_refuses_an_invalid_file_and_a_bad_environment(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(INVALID)
    result = fastgate("run", "--config", str(path), env={"FASTGATE_ADMIN_LISTEN": "off", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "services[0].routes[1].paths[0]: must start with / or ~/" in result.stderr
    result = fastgate("run", "--config", str(path), env={"FASTGATE_WORKERS": "lots", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "FASTGATE_WORKERS: expected an integer from 1 to 1024, got 'lots'" in result.stderr


def test_run_stops_at_once_when_a_worker_cannot_listen(tmp_path):
    import socket
    import time

    path = tmp_path / "gateway.yaml"
    path.write_text(VALID)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = fastgate("run", "--config", str(path), env={
            "FASTGATE_PROXY_LISTEN": f"127.0.0.1:{port}", "FASTGATE_ADMIN_LISTEN": "off",
            "FASTGATE_WORKERS": "1", "PATH": "/usr/bin:/bin",
        })
    assert result.returncode == 1
    assert "worker 0 exited with 1 while starting" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert time.monotonic() - started < 15
