"""key-auth, acl, consumer groups and plugin precedence through a real gateway (behavior.md 3, 4, 5)."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
NAMESPACE = uuid.UUID("00000000-0000-0000-0000-000000000000")


def _sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _add(value: str) -> list[dict]:
    return [{"name": "request-transformer", "config": {"add": {"headers": [f"x-scope:{value}"]}}}]


def CONFIG(upstream):
    echo = f"{upstream.url}/echo"

    def route(name, plugins, **extra):
        return {"name": name, "paths": [f"/{name}"], "plugins": plugins, **extra}

    key_auth = {"name": "key-auth"}
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": "echo", "url": echo,
                "routes": [
                    route("open", []),
                    route("keyed", [key_auth]),
                    route("hidden", [{"name": "key-auth", "config": {
                        "key_names": ["x-api-key", "apikey"], "hide_credentials": True, "realm": "fastgate",
                    }}]),
                    route("header-only", [{"name": "key-auth", "config": {"key_in_query": False}}]),
                    route("preflight-free", [{"name": "key-auth", "config": {"run_on_preflight": False}}]),
                    route("chat", [key_auth, {"name": "acl", "config": {"allow": ["chat"]}}]),
                    route("admin", [key_auth, {"name": "acl", "config": {"allow": ["admin"], "hide_groups_header": True}}]),
                    route("deny", [key_auth, {"name": "acl", "config": {"deny": ["chat"]}}]),
                    route("anon", [
                        {"name": "key-auth", "config": {"anonymous": "anonymous"}},
                        {"name": "acl", "config": {"allow": ["guests", "chat"]}},
                    ]),
                    route("anon-by-id", [{"name": "key-auth", "config": {"anonymous": "{ANON_ID}"}}]),
                    route("bad-anon", [{"name": "key-auth", "config": {"anonymous": "nobody"}}]),
                    route("gold", [key_auth, {"name": "acl", "config": {"allow": ["gold"], "include_consumer_groups": True}}]),
                    route("gold-plain", [key_auth, {"name": "acl", "config": {"allow": ["gold"]}}]),
                    route("acl-only", [{"name": "acl", "config": {"allow": ["chat"]}}]),
                    route("precedence", [key_auth] + _add("route")),
                    route("disabled", [key_auth, {"name": "request-transformer", "enabled": False,
                                                   "config": {"add": {"headers": ["x-scope:disabled"]}}}]),
                    {"name": "public", "paths": ["/public"]},
                    {"name": "private", "paths": ["/private"], "plugins": [key_auth]},
                ],
            },
        ],
        "consumers": [
            {"username": "alice", "custom_id": "a-1", "keyauth_credentials": [{"key": "alice-key"}],
             "acls": [{"group": "chat"}, {"group": "admin"}], "groups": [{"name": "gold"}]},
            {"username": "bob", "keyauth_credentials": [{"key": _sha256("bob-key")}], "acls": [{"group": "chat"}]},
            {"custom_id": "c-3", "keyauth_credentials": [{"key": "carol-key"}],
             "groups": [{"name": "silver"}, {"name": "bronze"}]},
            {"username": "anonymous", "id": "{ANON_ID}", "acls": [{"group": "guests"}]},
            {"username": "nogroups", "keyauth_credentials": [{"key": "nogroups-key"}]},
            # A member through consumer_groups[].consumers (the other membership form).
            {"username": "dave", "keyauth_credentials": [{"key": "dave-key"}]},
        ],
        "consumer_groups": [
            {"name": "gold", "plugins": _add("gold")},
            {"name": "silver", "consumers": [{"username": "dave"}], "plugins": _add("silver")},
            {"name": "bronze", "consumers": [], "plugins": _add("bronze")},
        ],
        "plugins": [
            {"name": "request-transformer", "consumer": "alice",
             "config": {"add": {"headers": ["x-scope:consumer"]}}},
            {"name": "request-transformer", "consumer": "bob", "route": "precedence",
             "config": {"add": {"headers": ["x-scope:route+consumer"]}}},
        ],
    }


ANON_ID = str(uuid.uuid5(NAMESPACE, "anonymous-consumer"))


def config_with_ids(upstream):
    import json

    return json.loads(json.dumps(CONFIG(upstream)).replace("{ANON_ID}", ANON_ID))


@pytest.fixture(scope="module", params=["compiled", "pure"])
def gateway(request, tmp_path_factory):
    from tests.integration.conftest import GatewayProcess

    upstream = request.getfixturevalue("upstream")
    process = GatewayProcess(tmp_path_factory.mktemp("access"), config_with_ids(upstream), impl=request.param)
    yield process
    process.stop()


def upstream_headers(response) -> dict[str, list[str]]:
    assert response.status == 200, (response.status, response.body)
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def assert_error(response, status, message, www_authenticate=None):
    assert response.status == status, (response.status, response.body)
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["message"] == message
    assert REQUEST_ID.match(body["request_id"]) and body["request_id"] == response.headers["X-Fastgate-Request-Id"]
    assert response.headers.get("WWW-Authenticate") == www_authenticate


# -- key-auth ---------------------------------------------------------------------------------


def test_no_key_is_401_with_challenge(gateway):
    assert_error(gateway.request("GET", "/keyed"), 401, "No API key found in request", "Key")


def test_unknown_key_is_401_unauthorized(gateway):
    assert_error(gateway.request("GET", "/keyed", {"apikey": "wrong"}), 401, "Unauthorized", "Key")


def test_empty_key_counts_as_missing(gateway):
    assert_error(gateway.request("GET", "/keyed", {"apikey": ""}), 401, "No API key found in request", "Key")
    assert_error(gateway.request("GET", "/keyed?apikey"), 401, "No API key found in request", "Key")
    assert_error(gateway.request("GET", "/keyed?apikey="), 401, "No API key found in request", "Key")


def test_realm_is_in_the_challenge(gateway):
    assert_error(gateway.request("GET", "/hidden"), 401, "No API key found in request", 'Key realm="fastgate"')


def test_header_key_sets_consumer_headers(gateway):
    headers = upstream_headers(gateway.request("GET", "/keyed", {"apikey": "alice-key"}))
    config_ids = {name: value for name, value in headers.items() if name.startswith("x-consumer")}
    assert config_ids["x-consumer-username"] == ["alice"]
    assert config_ids["x-consumer-custom-id"] == ["a-1"]
    assert len(config_ids["x-consumer-id"]) == 1 and uuid.UUID(config_ids["x-consumer-id"][0])
    assert len(headers["x-credential-identifier"]) == 1
    assert "x-anonymous-consumer" not in headers
    assert headers["apikey"] == ["alice-key"]  # not hidden unless hide_credentials


def test_absent_consumer_fields_send_no_header(gateway):
    headers = upstream_headers(gateway.request("GET", "/keyed", {"apikey": "carol-key"}))
    assert headers["x-consumer-custom-id"] == ["c-3"]
    assert "x-consumer-username" not in headers


def test_query_key_and_sha256_key(gateway):
    headers = upstream_headers(gateway.request("GET", "/keyed?apikey=bob-key"))
    assert headers["x-consumer-username"] == ["bob"]
    assert gateway.request("GET", "/keyed", {"apikey": _sha256("bob-key")}).status == 401


def test_key_names_accept_underscore_for_dash_in_any_case(gateway):
    for name in ("X-API-KEY", "x_api_key", "X_Api-Key"):
        headers = upstream_headers(gateway.request("GET", "/hidden", {name: "alice-key"}))
        assert headers["x-consumer-username"] == ["alice"], name


def test_duplicate_keys_are_refused(gateway):
    response = gateway.raw(b"GET /keyed HTTP/1.1\r\nHost: x\r\napikey: alice-key\r\napikey: bob-key\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 401 ") and b'"Duplicate API key found"' in response
    assert_error(gateway.request("GET", "/keyed?apikey=alice-key&apikey=bob-key"), 401, "Duplicate API key found", "Key")


def test_key_name_order_beats_location(gateway):
    # key_names [x-api-key, apikey]: x-api-key in the query wins over apikey in a header.
    headers = upstream_headers(gateway.request("GET", "/hidden?x-api-key=bob-key", {"apikey": "alice-key"}))
    assert headers["x-consumer-username"] == ["bob"]


def test_hide_credentials_removes_header_and_query_arg(gateway):
    response = gateway.request("GET", "/hidden?a=1&x-api-key=alice-key&b=%20two", {"x-api-key": "ignored-in-favour"})
    # The header comes first (same name, header before query): the header key is wrong.
    assert response.status == 401
    body = upstream_headers(gateway.request("GET", "/hidden?a=1&x%2Dapi%2Dkey=alice-key&b=%20two"))
    echoed = gateway.request("GET", "/hidden?a=1&x%2Dapi%2Dkey=alice-key&b=%20two").json()
    assert echoed["path"] == "/echo?a=1&b=%20two"
    assert "x-consumer-username" in body
    headers = upstream_headers(gateway.request("GET", "/hidden", {"X-Api-Key": "alice-key"}))
    assert "x-api-key" not in headers


def test_key_in_query_off_ignores_the_query(gateway):
    assert_error(gateway.request("GET", "/header-only?apikey=alice-key"), 401, "No API key found in request", "Key")
    assert gateway.request("GET", "/header-only", {"apikey": "alice-key"}).status == 200


def test_run_on_preflight_false_lets_options_through(gateway):
    assert gateway.request("OPTIONS", "/preflight-free").status == 200
    assert gateway.request("GET", "/preflight-free").status == 401
    assert gateway.request("OPTIONS", "/keyed").status == 401


def test_anonymous_by_username_and_by_id(gateway):
    headers = upstream_headers(gateway.request("GET", "/anon"))
    assert headers["x-anonymous-consumer"] == ["true"]
    assert headers["x-consumer-username"] == ["anonymous"]
    assert headers["x-consumer-id"] == [ANON_ID]
    assert "x-credential-identifier" not in headers
    assert headers["x-consumer-groups"] == ["guests"]
    # A wrong key falls back to anonymous too (logical OR).
    assert upstream_headers(gateway.request("GET", "/anon", {"apikey": "nope"}))["x-anonymous-consumer"] == ["true"]
    # A good key is the real consumer.
    real = upstream_headers(gateway.request("GET", "/anon", {"apikey": "bob-key"}))
    assert real["x-consumer-username"] == ["bob"] and "x-anonymous-consumer" not in real
    by_id = upstream_headers(gateway.request("GET", "/anon-by-id"))
    assert by_id["x-consumer-id"] == [ANON_ID] and by_id["x-anonymous-consumer"] == ["true"]


def test_missing_anonymous_consumer_is_500(gateway):
    response = gateway.request("GET", "/bad-anon")
    assert_error(response, 500, "anonymous consumer nobody is configured but doesn't exist")
    assert gateway.request("GET", "/bad-anon", {"apikey": "alice-key"}).status == 200


def test_client_cannot_impersonate_a_consumer(gateway):
    forged = {
        "X-Consumer-ID": "forged", "X-Consumer-Username": "root", "X-Consumer-Custom-ID": "forged",
        "X-Credential-Identifier": "forged", "X-Anonymous-Consumer": "false", "X-Consumer-Groups": "admin",
        "X_Consumer_Groups": "admin", "X-Authenticated-Groups": "admin",
    }
    headers = upstream_headers(gateway.request("GET", "/chat", {"apikey": "bob-key", **forged}))
    assert headers["x-consumer-username"] == ["bob"]
    assert headers["x-consumer-groups"] == ["chat"]
    assert "forged" not in str(headers) and "root" not in str(headers) and "admin" not in str(headers)
    assert "x-anonymous-consumer" not in headers and "x-authenticated-groups" not in headers
    anonymous = upstream_headers(gateway.request("GET", "/anon", forged))
    assert anonymous["x-consumer-username"] == ["anonymous"] and "root" not in str(anonymous)
    # Forged groups do not pass an ACL either.
    assert gateway.request("GET", "/admin", {"apikey": "bob-key", **forged}).status == 403
    # Without auth plugins the headers pass untouched (Kong's behaviour, behavior.md 13.5).
    assert upstream_headers(gateway.request("GET", "/open", forged))["x-consumer-username"] == ["root"]


# -- acl --------------------------------------------------------------------------------------


def test_acl_allow(gateway):
    headers = upstream_headers(gateway.request("GET", "/chat", {"apikey": "alice-key"}))
    assert headers["x-consumer-groups"] == ["chat, admin"]
    assert_error(gateway.request("GET", "/chat", {"apikey": "carol-key"}), 403, "You cannot consume this service")
    assert_error(gateway.request("GET", "/chat"), 401, "No API key found in request", "Key")


def test_acl_hide_groups_header(gateway):
    headers = upstream_headers(gateway.request("GET", "/admin", {"apikey": "alice-key"}))
    assert "x-consumer-groups" not in headers
    assert_error(gateway.request("GET", "/admin", {"apikey": "bob-key"}), 403, "You cannot consume this service")


def test_acl_deny(gateway):
    assert_error(gateway.request("GET", "/deny", {"apikey": "bob-key"}), 403, "You cannot consume this service")
    # No groups in deny mode: allowed, with an empty X-Consumer-Groups.
    headers = upstream_headers(gateway.request("GET", "/deny", {"apikey": "nogroups-key"}))
    assert headers["x-consumer-groups"] == [""]


def test_acl_without_consumer_is_401(gateway):
    assert_error(gateway.request("GET", "/acl-only"), 401, "Unauthorized")


def test_acl_consumer_groups_count_only_when_included(gateway):
    headers = upstream_headers(gateway.request("GET", "/gold", {"apikey": "alice-key"}))
    assert headers["x-consumer-groups"] == ["chat, admin, gold"]
    assert_error(gateway.request("GET", "/gold-plain", {"apikey": "alice-key"}), 403, "You cannot consume this service")
    assert_error(gateway.request("GET", "/gold", {"apikey": "bob-key"}), 403, "You cannot consume this service")


# -- precedence (behavior.md 3.1) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "scope"),
    [
        ("bob-key", "route+consumer"),  # level 3 beats the route's own instance (10)
        ("alice-key", "consumer"),  # consumer (8) beats her group gold (9) and the route (10)
        ("carol-key", "bronze"),  # groups silver and bronze tie at 9: the alphabetically first wins
        ("nogroups-key", "route"),  # nothing consumer-specific: the route's instance
        ("dave-key", "silver"),  # member through the group's own consumers list
    ],
)
def test_one_instance_per_plugin_by_precedence(gateway, key, scope):
    headers = upstream_headers(gateway.request("GET", "/precedence", {"apikey": key}))
    assert headers["x-scope"] == [scope]


def test_consumer_scoped_instances_apply_on_every_route(gateway):
    assert upstream_headers(gateway.request("GET", "/keyed", {"apikey": "alice-key"}))["x-scope"] == ["consumer"]
    assert upstream_headers(gateway.request("GET", "/keyed", {"apikey": "carol-key"}))["x-scope"] == ["bronze"]
    assert "x-scope" not in upstream_headers(gateway.request("GET", "/keyed", {"apikey": "bob-key"}))


def test_disabled_instance_does_nothing(gateway):
    headers = upstream_headers(gateway.request("GET", "/disabled", {"apikey": "nogroups-key"}))
    assert "x-scope" not in headers


# -- security: no path trick reaches a protected route without a key --------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/private", "/public/../private", "/public/%2e%2e/private", "/public/%2E%2E/private", "//private",
        "/public/./../private", "/public//..//private", "/%70rivate", "/public/..%2fprivate/../../private",
    ],
)
def test_path_tricks_do_not_bypass_key_auth(gateway, path):
    response = gateway.request("GET", path)
    if response.status == 200:
        # It went to the public route: the upstream path must stay under /echo (the public
        # route strips /public and never maps onto the private one).
        echoed = response.json()["path"]
        assert "private" not in echoed.replace("%2f", "/").lower().split("/")[1:2], echoed
        pytest.fail(f"{path} was proxied without a key: {echoed}")
    assert_error(response, 401, "No API key found in request", "Key")


@pytest.mark.parametrize("path", ["/PRIVATE", "/Private", "/public%2F..%2Fprivate", "/public%2fprivate"])
def test_paths_that_are_not_the_private_route_never_reach_it(gateway, path):
    response = gateway.request("GET", path)
    if response.status == 200:
        # Routed as public: forwarded as-is under the public route, not decoded into /private.
        assert response.json()["path"].lower() != "/echo/private" and "x-consumer-id" not in str(response.body)
    else:
        assert response.status in (401, 404)


def test_keys_never_appear_in_error_bodies_or_logs(gateway):
    secret = "s3cr3t-not-a-key-1234"
    for headers, path in (({"apikey": secret}, "/keyed"), ({}, f"/keyed?apikey={secret}"),
                          ({"apikey": secret}, "/chat")):
        response = gateway.request("GET", path, headers)
        assert response.status == 401 and secret.encode() not in response.body
        assert all(secret not in value for value in response.headers.values())
    assert_error(gateway.request("GET", "/chat", {"apikey": "carol-key"}), 403, "You cannot consume this service")
    logs = gateway.logs()
    assert secret not in logs and "alice-key" not in logs and "carol-key" not in logs
