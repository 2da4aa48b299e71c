"""Plugins that read the request body, through a real gateway: key-auth's key_in_body
(behavior.md 4) and request-transformer's body edits (behavior.md 7.1), over url-encoded forms,
JSON and multipart/form-data, with the buffering bounds (1 MiB, 413) and the framing the
upstream receives."""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import socket
import time

import pytest

from tests.integration.test_plugins import echoed as echoed_request

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
BOUNDARY = "fgBoundary7d2"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
# fastgate's MAX_BUFFERED_BODY (fastgate/_core/_pure/proxy.py).
MAX_BUFFERED_BODY = 1024 * 1024


def CONFIG(upstream):
    def route(name, *plugins, **extra):
        return {"name": name, "paths": [f"/{name}"], "plugins": list(plugins), **extra}

    def transformer(**config):
        return {"name": "request-transformer", "config": config}

    body_edits = transformer(
        remove={"body": ["drop"]},
        rename={"body": ["old:new"]},
        replace={"body": ["r:replaced-$(headers.x-source)", "absent:never"]},
        add={"body": ["added:1", "r:not-added"]},
        append={"body": ["multi:second"]},
    )
    return {
        "_format_version": "3.0",
        "services": [
            {"name": "echo", "url": f"{upstream.url}/echo", "routes": [
                route("body-key", {"name": "key-auth", "config": {"key_in_body": True}}),
                route("body-key-hidden", {"name": "key-auth", "config": {
                    "key_in_body": True, "hide_credentials": True, "key_names": ["apikey", "x-key"],
                }}),
                route("body-key-anon", {"name": "key-auth", "config": {"key_in_body": True, "anonymous": "guest"}}),
                route("body-key-then-edit", {"name": "key-auth", "config": {"key_in_body": True}},
                      transformer(add={"body": ["tier:$(headers.x-tier)"]})),
                route("body-edits", body_edits),
                route("body-to-query", transformer(http_method="GET", add={"querystring": ["q:1"]})),
                route("plain"),
            ]},
        ],
        "consumers": [
            {"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
            {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}]},
            {"username": "guest"},
        ],
    }


@pytest.fixture
def gateway(module_gateway):
    return module_gateway


def echoed(response) -> dict:
    """The echo upstream's view of the request, its body as bytes."""
    document = echoed_request(response)
    document["body"] = document["body"].encode("latin-1")
    return document


def post(gateway, path, content_type, body: bytes, headers: dict | None = None):
    return gateway.request("POST", path, {"Content-Type": content_type, **(headers or {})}, body)


def multipart(*fields: tuple[str, str], filename: str | None = None) -> bytes:
    parts = []
    for name, value in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n")
    return ("".join(parts) + f"--{BOUNDARY}--\r\n").encode()


def multipart_fields(body: bytes) -> list[tuple[str, str]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {MULTIPART}\r\n\r\n".encode() + body
    )
    assert message.is_multipart(), body
    return [(part.get_param("name", header="content-disposition"), part.get_content()) for part in message.iter_parts()]


def assert_error(response, status, message, www_authenticate=None):
    assert response.status == status, (response.status, response.body)
    assert response.json()["message"] == message
    assert response.headers.get("WWW-Authenticate") == www_authenticate


# -- key-auth: key_in_body --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"q=hello&apikey=alice-key"),
        (f"{FORM}; charset=utf-8", b"apikey=alice%2Dkey"),
        (JSON, b'{"model": "m", "apikey": "alice-key"}'),
        (MULTIPART, multipart(("q", "hello"), ("apikey", "alice-key"))),
    ],
    ids=["form", "form-encoded", "json", "multipart"],
)
def test_key_in_body_authenticates(gateway, content_type, body):
    document = echoed(post(gateway, "/body-key", content_type, body))
    assert document["headers"]["x-consumer-username"] == ["alice"]
    # Not hidden: the body reaches the upstream as it was sent, with its length.
    assert document["body"] == body
    assert document["headers"]["content-length"] == [str(len(body))]


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        (FORM, b"apikey=alice-key&apikey=bob-key", "Duplicate API key found"),
        (JSON, b'{"apikey": ["alice-key", "bob-key"]}', "Duplicate API key found"),
        (JSON, b'{"apikey": {"k": "alice-key"}}', "Duplicate API key found"),
        (MULTIPART, multipart(("apikey", "alice-key"), ("apikey", "bob-key")), "Duplicate API key found"),
        (FORM, b"apikey[]=alice-key&apikey[1]=bob-key", "No API key found in request"),
        (FORM, b"apikey", "No API key found in request"),
        (FORM, b"apikey=", "No API key found in request"),
        (JSON, b'{"apikey": 12345}', "No API key found in request"),
        (JSON, b'["apikey", "alice-key"]', "No API key found in request"),
        (FORM, b"apikey=wrong", "Unauthorized"),
        ("text/plain", b"apikey=alice-key", "No API key found in request"),
    ],
    ids=["form-dup", "json-array", "json-object", "multipart-dup", "brackets", "flag", "empty", "json-number",
         "json-not-object", "unknown", "other-type"],
)
def test_key_in_body_refusals(gateway, content_type, body, message):
    assert_error(post(gateway, "/body-key", content_type, body), 401, message, "Key")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [(JSON, b'{"apikey": "alice-key"'), (MULTIPART, b"--elsewhere\r\n\r\nx\r\n"), ("multipart/form-data", b"x")],
    ids=["bad-json", "bad-multipart", "no-boundary"],
)
def test_unreadable_body_is_400(gateway, content_type, body):
    assert_error(post(gateway, "/body-key", content_type, body), 400, "Cannot process request body")
    # With anonymous set, an unreadable body falls back to the anonymous consumer (Kong).
    document = echoed(post(gateway, "/body-key-anon", content_type, body))
    assert document["headers"]["x-anonymous-consumer"] == ["true"]
    assert document["headers"]["x-consumer-username"] == ["guest"]


def test_key_in_header_still_works_without_a_body(gateway):
    document = echoed(gateway.request("GET", "/body-key", {"apikey": "bob-key"}))
    assert document["headers"]["x-consumer-username"] == ["bob"]
    # A body of another type is not read, and streams through as it is.
    document = echoed(post(gateway, "/body-key?apikey=bob-key", "text/plain", b"just text"))
    assert (document["headers"]["x-consumer-username"], document["body"]) == (["bob"], b"just text")


def test_name_order_beats_location(gateway):
    # The first key name in the body wins over the second name in a header (behavior.md 4).
    document = echoed(post(gateway, "/body-key-hidden", FORM, b"apikey=alice-key", {"x-key": "bob-key"}))
    assert document["headers"]["x-consumer-username"] == ["alice"]


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (FORM, b"a=1&apikey=alice-key&b=%20two", b"a=1&b=%20two"),
        (JSON, b'{"a": 1, "apikey": "alice-key", "b": [true, null]}', b'{"a":1,"b":[true,null]}'),
    ],
    ids=["form", "json"],
)
def test_hide_credentials_removes_the_key_from_the_body(gateway, content_type, body, expected):
    document = echoed(post(gateway, "/body-key-hidden", content_type, body))
    assert document["headers"]["x-consumer-username"] == ["alice"]
    assert document["body"] == expected
    assert document["headers"]["content-length"] == [str(len(expected))]


def test_hide_credentials_removes_a_multipart_part(gateway):
    body = multipart(("q", "hello"), ("apikey", "alice-key"), ("file", "data"))
    document = echoed(post(gateway, "/body-key-hidden", MULTIPART, body))
    assert document["headers"]["x-consumer-username"] == ["alice"]
    assert multipart_fields(document["body"]) == [("q", "hello"), ("file", "data")]


def test_hide_credentials_strips_every_location(gateway):
    # Found in the header; the same name is removed from the query and the body as well (Kong).
    document = echoed(post(gateway, "/body-key-hidden?apikey=other&z=1", FORM, b"apikey=copy&keep=1",
                           {"apikey": "bob-key"}))
    assert document["headers"]["x-consumer-username"] == ["bob"]
    assert "apikey" not in document["headers"]
    assert document["path"] == "/echo?z=1"
    assert document["body"] == b"keep=1"


def test_chunked_body_is_read_and_sent_with_a_length(gateway):
    body = b"apikey=alice-key&text=" + b"x" * 100_000
    chunks = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    request = (
        b"POST /body-key HTTP/1.1\r\nHost: t\r\nContent-Type: " + FORM.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    )
    reply = gateway.raw(request)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    document = json.loads(payload)
    headers = {name.lower(): value for name, value in document["headers"]}
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert document["body"].encode("latin-1") == body
    assert headers["x-consumer-username"] == "alice"


def test_body_arriving_slowly_is_waited_for(gateway):
    body = b'{"apikey": "alice-key", "messages": ["' + b"m" * 5000 + b'"]}'
    head = (
        b"POST /body-key HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        for start in range(0, len(body), 2000):
            time.sleep(0.1)
            sock.sendall(body[start:start + 2000])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b'"X-Consumer-Username", "alice"' in reply


def test_body_over_the_buffer_bound_is_413_and_the_gateway_goes_on(gateway):
    body = b"apikey=alice-key&pad=" + b"p" * MAX_BUFFERED_BODY
    response = post(gateway, "/body-key", FORM, body)
    assert_error(response, 413, "Payload too large")
    assert response.headers["Connection"] == "close"
    # A body exactly at the bound is buffered and passes.
    fits = b"apikey=alice-key&pad="
    fits += b"p" * (MAX_BUFFERED_BODY - len(fits))
    document = echoed(post(gateway, "/body-key", FORM, fits))
    assert len(document["body"]) == MAX_BUFFERED_BODY
    # A large body on a route no plugin reads bodies on streams through (no bound).
    large = b"x" * (3 * MAX_BUFFERED_BODY)
    assert echoed(post(gateway, "/plain", FORM, large))["body"] == large


def test_pipelined_requests_with_bodies(gateway):
    def request(key):
        body = b"apikey=" + key
        return (b"POST /body-key HTTP/1.1\r\nHost: t\r\nContent-Type: " + FORM.encode()
                + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    reply = gateway.raw(request(b"alice-key") + request(b"nobody") + request(b"bob-key")
                        + b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout=10)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"401", b"200", b"200"]
    assert reply.index(b'"alice"') < reply.index(b"Unauthorized") < reply.index(b'"bob"')


def test_key_auth_then_a_body_edit(gateway):
    document = echoed(post(gateway, "/body-key-then-edit", JSON, b'{"apikey": "alice-key"}', {"x-tier": "gold"}))
    assert json.loads(document["body"]) == {"apikey": "alice-key", "tier": "gold"}


# -- request-transformer: body edits ----------------------------------------------------------


def test_form_body_edits(gateway):
    body = b"drop=1&old=o&r=orig&multi=first&keep=a%26b"
    document = echoed(post(gateway, "/body-edits", FORM, body, {"x-source": "src"}))
    edited = document["body"]
    assert edited == b"new=o&r=replaced-src&multi=first&keep=a%26b&added=1&multi=second"
    assert document["headers"]["content-length"] == [str(len(edited))]


def test_json_body_edits(gateway):
    body = b'{"drop": 1, "old": "o", "r": "orig", "multi": "first", "keep": {"n": [1, 2]}, "new": "lost"}'
    document = echoed(post(gateway, "/body-edits", JSON, body, {"x-source": "src"}))
    assert json.loads(document["body"]) == {
        "new": "o", "r": "replaced-src", "multi": ["first", "second"], "keep": {"n": [1, 2]}, "added": "1",
    }
    assert document["headers"]["content-length"] == [str(len(document["body"]))]


def test_multipart_body_edits(gateway):
    body = multipart(("drop", "1"), ("old", "o"), ("r", "orig"), ("keep", "k"))
    document = echoed(post(gateway, "/body-edits", MULTIPART, body, {"x-source": "src"}))
    assert multipart_fields(document["body"]) == [
        ("new", "o"), ("r", "replaced-src"), ("keep", "k"), ("added", "1"), ("multi", "second"),
    ]


def test_body_edits_create_a_body_and_leave_others_alone(gateway):
    # A JSON request without a body gets the added members; Content-Length is set.
    document = echoed(gateway.request("POST", "/body-edits", {"Content-Type": JSON}))
    assert json.loads(document["body"]) == {"added": "1", "r": "not-added", "multi": ["second"]}
    # Malformed JSON and bodies of other types go on untouched.
    for content_type, body in ((JSON, b'{"drop": '), ("text/plain", b"drop=1")):
        document = echoed(post(gateway, "/body-edits", content_type, body))
        assert document["body"] == body


def test_http_method_get_moves_form_fields_into_the_query(gateway):
    document = echoed(post(gateway, "/body-to-query?x=0", FORM, b"a=1&b=two%20words"))
    assert document["method"] == "GET"
    assert document["path"] == "/echo?x=0&a=1&b=two%20words&q=1"


def test_pipelined_chunked_body_keeps_its_framing(gateway):
    # The second request's chunked body is held while the first is answered, then framed again
    # when it goes upstream (no plugin reads bodies on this route).
    body_parts = [b"first part ", b"second part"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in body_parts) + b"0\r\n\r\n"
    reply = gateway.raw(
        b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /plain HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
        timeout=10,
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"200", b"200"]
    assert b'"body": "first part second part"' in reply


def test_body_keys_stay_out_of_logs_and_errors(gateway):
    # Runs after the tests above (same module gateway): none of the keys they sent in bodies,
    # accepted or refused, reached the gateway's log; refusals never echo the body.
    response = post(gateway, "/body-key", FORM, b"apikey=secret-key-in-body")
    assert b"secret-key-in-body" not in response.body
    response = post(gateway, "/body-key", JSON, b'{"apikey": "secret-key-in-body"')
    assert b"secret-key-in-body" not in response.body
    logs = gateway.logs()
    assert "secret-key-in-body" not in logs and "alice-key" not in logs and "bob-key" not in logs
