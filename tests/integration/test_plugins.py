"""correlation-id, cors, request-termination, the transformers, a team's own plugin and the error
template, each through a real gateway (behavior.md 3.1, 7)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.integration.conftest import GatewayProcess
from tests.integration.test_proxy import read_sse

UUID_COUNTER = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}#(\d+)$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


def CONFIG(upstream, log_path):
    def route(name, *plugins, **extra):
        return {"name": name, "paths": [f"/{name}"], "plugins": list(plugins), **extra}

    def termination(**config):
        return {"name": "request-termination", "config": config}

    audit = {"name": "team-audit", "config": {"delay_ms": 150, "refuse_arg": "refuse", "upper_case_body": True,
                                             "log_path": str(log_path)}}
    return {
        "_format_version": "3.0",
        "services": [
            {"name": "echo", "url": f"{upstream.url}/echo", "routes": [
                route("term", termination(status_code=403, message="gone")),
                route("term-default", termination()),
                route("term-body", termination(status_code=200, body="hello", content_type="text/plain")),
                route("term-418", termination(status_code=418)),
                route("term-trigger", termination(status_code=410, message="stopped", trigger="x-stop")),
                route("term-echo", termination(status_code=200, echo=True)),
                route("corr", {"name": "correlation-id", "config": {"echo_downstream": True}}),
                route("corr-uuid", {"name": "correlation-id", "config": {"generator": "uuid", "header_name": "X-Trace"}}),
                route("corr-tracker", {"name": "correlation-id", "config": {"generator": "tracker", "echo_downstream": True}}),
                route("cors", {"name": "cors", "config": {
                    "origins": ["https://app.example.com"], "credentials": True, "max_age": 600,
                    "exposed_headers": ["X-Total"], "headers": ["X-Api-Key", "Content-Type"],
                }}, {"name": "key-auth"}),
                route("cors-any", {"name": "cors"}),
                route("cors-list", {"name": "cors", "config": {
                    "origins": [r"https://.*\.example\.org", "http://plain.test:8080", "https://other.test"],
                    "methods": ["GET", "POST"], "private_network": True,
                }}),
                route("cors-continue", {"name": "cors", "config": {"preflight_continue": True}}),
                route("rt", {"name": "response-transformer", "config": {
                    "remove": {"headers": ["Date"]}, "rename": {"headers": ["Server:X-Origin-Server"]},
                    "replace": {"headers": ["Content-Type:text/plain"]},
                    "add": {"headers": ["X-Added:yes", "Content-Type:never"]}, "append": {"headers": ["X-Added:again"]},
                }}),
                {"name": "rqt", "paths": [r"~/rqt/(?<ver>v[0-9]+)/(\d+)$"], "plugins": [
                    {"name": "request-transformer", "config": {
                        "http_method": "POST",
                        "remove": {"headers": ["x-remove-me"], "querystring": ["drop"]},
                        "rename": {"headers": ["x-old:x-new"], "querystring": ["old:new"]},
                        "replace": {"headers": ["x-replace:new-$(query_params.v)", "host:rewritten.test"],
                                    "querystring": ["v:replaced"], "uri": "/echo/rewritten/$(uri_captures.ver)"},
                        "add": {"headers": ["x-add:$(headers.x-source)", "x-cap:$(uri_captures[2])",
                                            "x-present:not-added"], "querystring": ["added:1"]},
                        "append": {"headers": ["x-present:appended"], "querystring": ["v:second"]},
                    }},
                ]},
                route("directory", {"name": "key-auth", "config": {"anonymous": "guest"}}, {"name": "team-directory"},
                      {"name": "acl", "config": {"allow": ["staff"]}}),
                route("directory-always", {"name": "key-auth"}, {"name": "team-directory"},
                      {"name": "acl", "config": {"allow": ["staff"], "always_use_authenticated_groups": True}}),
                route("audit", audit),
                route("audit-fail", {"name": "team-audit", "config": {"fail_in_access": True}}),
                route("short", {"name": "key-auth"}, {"name": "team-audit"},
                      {"name": "correlation-id", "config": {"echo_downstream": True}}),
            ]},
            {"name": "sse", "url": upstream.url, "routes": [
                {"name": "rt-sse", "paths": ["/sse"], "strip_path": False, "plugins": [
                    {"name": "response-transformer", "config": {"add": {"headers": ["X-Stream:yes"]}}},
                ]},
            ]},
        ],
        "routes": [
            route("nosvc", termination(status_code=200, message="maintenance")),
            route("nosvc-plain"),
        ],
        "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]}, {"username": "guest"}],
    }


@pytest.fixture(scope="module", params=["compiled", "pure"])
def gateway(request, tmp_path_factory):
    upstream = request.getfixturevalue("upstream")
    directory = tmp_path_factory.mktemp("plugins")
    log_path = directory / "audit.log"
    process = GatewayProcess(
        directory, CONFIG(upstream, log_path), impl=request.param,
        env={"FASTGATE_PLUGINS": "tests.integration.custom_plugins:Audit,tests.integration.custom_plugins:DirectoryGroups"},
    )
    process.audit_log = log_path
    yield process
    process.stop()


def echoed(response) -> dict:
    assert response.status == 200, (response.status, response.body)
    document = response.json()
    headers: dict[str, list[str]] = {}
    for name, value in document["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    document["headers"] = headers
    return document


# -- request-termination (behavior.md 7.2) ----------------------------------------------------


def test_termination_message_has_no_request_id(gateway):
    response = gateway.request("GET", "/term")
    assert response.status == 403
    assert response.body == b'{"message":"gone"}'
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Fastgate-Request-Id"])
    assert "X-Fastgate-Response-Latency" in response.headers


def test_termination_defaults_and_bodies(gateway):
    response = gateway.request("GET", "/term-default")
    assert (response.status, response.body) == (503, b'{"message":"Service unavailable"}')
    response = gateway.request("GET", "/term-body")
    assert (response.status, response.body, response.headers["Content-Type"]) == (200, b"hello", "text/plain")
    response = gateway.request("GET", "/term-418")
    assert (response.status, response.body, response.headers.get("Content-Type")) == (418, b"", None)


def test_termination_trigger(gateway):
    assert echoed(gateway.request("GET", "/term-trigger"))["path"] == "/echo"
    assert gateway.request("GET", "/term-trigger", {"X-Stop": "1"}).status == 410
    assert gateway.request("GET", "/term-trigger", {"x_stop": "1"}).status == 410
    assert gateway.request("GET", "/term-trigger?x-stop").status == 410


def test_termination_echo(gateway):
    response = gateway.request("GET", "/term-echo/a?x=1&x=2&flag", {"X-Thing": "t"})
    assert response.status == 200
    document = response.json()
    assert document["request"]["method"] == "GET"
    assert document["request"]["path"] == "/term-echo/a"
    assert document["request"]["query"] == {"x": ["1", "2"], "flag": True}
    assert document["request"]["headers"]["x-thing"] == "t"
    assert document["matched_route"]["name"] == "term-echo"
    assert document["matched_service"]["name"] == "echo"


def test_termination_works_on_a_route_without_service(gateway):
    response = gateway.request("GET", "/nosvc")
    assert (response.status, response.body) == (200, b'{"message":"maintenance"}')
    response = gateway.request("GET", "/nosvc-plain")
    assert response.status == 503 and response.json()["message"] == "no Service found with those values"


# -- correlation-id (behavior.md 7.3) ---------------------------------------------------------


def test_correlation_id_counter_generator_and_echo(gateway):
    first = gateway.request("GET", "/corr")
    second = gateway.request("GET", "/corr")
    ids = []
    for response in (first, second):
        sent = echoed(response)["headers"]["kong-request-id"]
        assert len(sent) == 1 and UUID_COUNTER.match(sent[0]), sent
        assert response.headers["Kong-Request-ID"] == sent[0]
        ids.append(sent[0])
    assert ids[0].split("#")[0] == ids[1].split("#")[0]
    assert int(ids[1].split("#")[1]) == int(ids[0].split("#")[1]) + 1


def test_correlation_id_keeps_a_given_id_and_replaces_a_blank_one(gateway):
    response = gateway.request("GET", "/corr", {"Kong-Request-ID": "given-1"})
    assert echoed(response)["headers"]["kong-request-id"] == ["given-1"]
    assert response.headers["Kong-Request-ID"] == "given-1"
    blank = echoed(gateway.request("GET", "/corr", {"Kong-Request-ID": "  "}))["headers"]["kong-request-id"]
    assert len(blank) == 1 and UUID_COUNTER.match(blank[0])


def test_correlation_id_uuid_and_tracker(gateway):
    response = gateway.request("GET", "/corr-uuid")
    sent = echoed(response)["headers"]["x-trace"]
    assert len(sent) == 1 and UUID.match(sent[0])
    assert "X-Trace" not in response.headers  # echo_downstream is off by default
    response = gateway.request("GET", "/corr-tracker")
    tracker = response.headers["Kong-Request-ID"]
    assert re.fullmatch(rf"127\.0\.0\.1-{gateway.port}-\d+-\d+-1-\d+\.\d{{3}}", tracker), tracker


def test_correlation_id_echoed_on_a_short_circuit(gateway):
    # key-auth ends the request; correlation-id (higher priority) ran, and the response
    # phases of the plugins after key-auth (team-audit) still run (behavior.md 3.1).
    response = gateway.request("GET", "/short")
    assert response.status == 401
    assert UUID_COUNTER.match(response.headers["Kong-Request-ID"])
    assert response.headers["X-Audit"] == "seen 401"


# -- cors (behavior.md 7.4) -------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "x-api-key"}


def test_cors_preflight_is_answered_before_auth(gateway):
    response = gateway.request("OPTIONS", "/cors", PREFLIGHT)
    assert (response.status, response.body) == (200, b"")
    assert response.headers["Content-Length"] == "0"
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Allow-Methods"] == "GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT"
    assert response.headers["Access-Control-Allow-Headers"] == "X-Api-Key,Content-Type"
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert response.headers["Vary"] == "Origin"


def test_cors_headers_on_proxied_and_error_responses(gateway):
    ok = gateway.request("GET", "/cors", {"Origin": "https://app.example.com", "apikey": "alice-key"})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert ok.headers["Access-Control-Expose-Headers"] == "X-Total"
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    denied = gateway.request("GET", "/cors", {"Origin": "https://app.example.com"})
    assert denied.status == 401
    assert denied.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


def test_cors_any_origin(gateway):
    response = gateway.request("GET", "/cors-any", {"Origin": "https://x.test"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in response.headers
    # allow_origin_absent (default true): the header goes out without an Origin too.
    assert gateway.request("GET", "/cors-any").headers["Access-Control-Allow-Origin"] == "*"
    preflight = gateway.request("OPTIONS", "/cors-any", {"Origin": "https://x.test", "Access-Control-Request-Method": "GET",
                                                          "Access-Control-Request-Headers": "X-One, X-Two"})
    assert preflight.status == 200 and preflight.headers["Access-Control-Allow-Headers"] == "X-One, X-Two"


def test_cors_origin_list_and_regex(gateway):
    def allow(origin):
        return gateway.request("GET", "/cors-list", {"Origin": origin}).headers.get("Access-Control-Allow-Origin")

    assert allow("https://api.example.org") == "https://api.example.org"
    assert allow("http://plain.test:8080") == "http://plain.test:8080"
    assert allow("https://other.test:443") == "https://other.test"
    assert allow("https://evil.test") is None
    assert allow("https://api.example.org.evil.test") is None
    preflight = gateway.request("OPTIONS", "/cors-list", {
        "Origin": "https://other.test", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Private-Network": "true",
    })
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET,POST"
    assert preflight.headers["Access-Control-Allow-Private-Network"] == "true"


def test_cors_preflight_continue_is_proxied(gateway):
    response = gateway.request("OPTIONS", "/cors-continue", PREFLIGHT)
    assert echoed(response)["method"] == "OPTIONS"


# -- transformers (behavior.md 7.1) -----------------------------------------------------------


def test_response_transformer_edits_headers(gateway):
    response = gateway.request("GET", "/rt")
    assert response.status == 200
    assert "Date" not in response.headers
    assert response.headers["X-Origin-Server"].startswith("Python")
    assert re.fullmatch(r"fastgate/\S+", response.headers["Server"])  # the upstream's was renamed away
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers.get_all("X-Added") == ["yes", "again"]
    assert json.loads(response.body)["path"] == "/echo"


def test_response_transformer_does_not_buffer_a_stream(gateway):
    interval = 0.1
    reads = read_sse(gateway.port, f"/sse?n=5&interval={interval}")
    assert b"X-Stream: yes" in reads[0][1]
    events = [(at, data) for at, data in reads if b"data: " in data and b"[DONE]" not in data]
    assert len(events) == 5 and all(data.count(b"data: ") == 1 for _, data in events)
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    assert all(interval * 0.5 < gap < interval * 2.5 for gap in gaps), gaps


def test_request_transformer(gateway):
    response = gateway.request(
        "GET", "/rqt/v2/42?v=1&drop=x&old=o&keep=k",
        {"X-Remove-Me": "1", "X-Old": "moved", "X-Replace": "was", "X-Source": "src", "X-Present": "orig"},
    )
    document = echoed(response)
    headers = document["headers"]
    assert document["method"] == "POST"
    path, _, query = document["path"].partition("?")
    assert path == "/echo/rewritten/v2"
    assert sorted(query.split("&")) == sorted(["v=replaced", "new=o", "keep=k", "added=1", "v=second"])
    assert "x-remove-me" not in headers and "x-old" not in headers
    assert headers["x-new"] == ["moved"]
    assert headers["x-replace"] == ["new-1"]
    assert headers["x-add"] == ["src"]
    assert headers["x-cap"] == ["42"]
    assert headers["x-present"] == ["orig", "appended"]
    assert headers["host"] == ["rewritten.test"]


# -- acl with groups another plugin authenticated (behavior.md 5) ----------------------------


def test_acl_uses_authenticated_groups_when_there_is_no_credential(gateway):
    groups = {"x-directory-groups": "staff, ops"}
    # Anonymous (no credential): the directory's groups decide, and go upstream as
    # X-Authenticated-Groups, not X-Consumer-Groups.
    response = gateway.request("GET", "/directory", groups)
    headers = echoed(response)["headers"]
    assert headers.get("x-authenticated-groups", []) == ["staff, ops"]
    assert headers.get("x-consumer-groups", []) == []
    # A real credential (alice has no ACL groups): her groups decide, so she is refused...
    assert gateway.request("GET", "/directory", {"apikey": "alice-key", **groups}).status == 403
    # ...unless always_use_authenticated_groups.
    response = gateway.request("GET", "/directory-always", {"apikey": "alice-key", **groups})
    assert echoed(response)["headers"].get("x-authenticated-groups", []) == ["staff, ops"]
    assert gateway.request("GET", "/directory-always", {"apikey": "alice-key"}).status == 403


# -- a team's own plugin (FASTGATE_PLUGINS) ---------------------------------------------------


def test_custom_plugin_waits_without_blocking_others(gateway):
    results: list[tuple[int, float]] = []

    def call(path):
        began = time.monotonic()
        response = gateway.request("GET", path)
        results.append((response.status, time.monotonic() - began, response))

    threads = [threading.Thread(target=call, args=("/audit",)) for _ in range(10)]
    threads.append(threading.Thread(target=call, args=("/audit?refuse=1",)))
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    # Eleven requests that each wait 150 ms in access, all at once: they waited together
    # (one after another would be 1.65 s).
    assert elapsed < 1.2, elapsed
    assert all(duration >= 0.14 for _, duration, _ in results)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 10 + [418]
    for status, _, response in results:
        assert response.headers["X-Audit"] == f"seen {status}"
        if status == 200:
            # The body phase upper-cased every chunk (and the body went out chunked).
            assert b'"PATH": "/ECHO"' in response.body
            assert response.headers["Transfer-Encoding"] == "chunked"


def test_custom_plugin_log_phase_runs_after_the_response(gateway):
    gateway.request("GET", "/audit?mark=log-test")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if gateway.audit_log.exists() and "/audit?mark=log-test 200" in gateway.audit_log.read_text():
            break
        time.sleep(0.05)
    assert "GET /audit?mark=log-test 200" in gateway.audit_log.read_text()


def test_plugin_exception_is_500_and_the_worker_goes_on(gateway):
    response = gateway.request("GET", "/audit-fail")
    assert response.status == 500
    assert response.json()["message"] == "An unexpected error occurred"
    assert "the plugin broke" in gateway.logs()
    assert gateway.request("GET", "/term").status == 403


# -- FASTGATE_ERROR_TEMPLATE ------------------------------------------------------------------


def test_error_template_replaces_gateway_errors(upstream, start_gateway):
    template = '{"error": {"code": {status}, "message": "{message}", "id": "{request_id}"}}'
    config = {"_format_version": "3.0", "services": [{"name": "s", "url": upstream.url, "routes": [
        {"name": "k", "paths": ["/k"], "plugins": [{"name": "key-auth"}]},
        {"name": "t", "paths": ["/t"], "plugins": [{"name": "request-termination", "config": {"message": "off"}}]},
    ]}]}
    gateway = start_gateway(config, env={"FASTGATE_ERROR_TEMPLATE": template,
                                         "FASTGATE_ERROR_CONTENT_TYPE": "application/problem+json"})
    for path, status, message in (("/nowhere", 404, "no Route matched with those values"),
                                  ("/k", 401, "No API key found in request")):
        response = gateway.request("GET", path)
        assert response.status == status
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json() == {"error": {"code": status, "message": message,
                                             "id": response.headers["X-Fastgate-Request-Id"]}}
    # request-termination's own body is not a gateway error template (Kong's exit body).
    assert gateway.request("GET", "/t").body == b'{"message":"off"}'
