"""fastgate.config: Kong 3.x declarative files -> the normalised Config, or every problem."""

import hashlib
import json
import uuid
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest
import yaml

from fastgate.config import Config, ConfigError, load_config, parse_config
from fastgate.plugins import PLUGINS

FILES = Path(__file__).parent / "files"
GATEWAY = FILES / "gateway.yaml"
def _sha256_form(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


BOB_KEY_SHA256 = "9b94dc1a51a38769f135edf04033ad7f2f487b6c25929be7a861cfc1ab10cf98"  # sha256("bob-key")


class RateLimiting:
    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        minute: Annotated[int, msgspec.Meta(gt=0)] | None = None
        policy: Literal["local", "cluster", "redis"] = "local"


@pytest.fixture
def plugins(monkeypatch):
    """A stand-in for rate-limiting with a two-field schema, so that these tests show the
    loader's rules alone (the real plugin's config is tested in tests/unit/plugins)."""
    monkeypatch.setitem(PLUGINS, "rate-limiting", RateLimiting)


def problems(document: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps({"_format_version": "3.0", **document}))
    assert str(caught.value) == "\n".join(map(str, caught.value.problems))
    return [str(problem) for problem in caught.value.problems]


# -- valid files


def test_realistic_file_is_flattened_with_defaults_and_resolved_references(plugins):
    config = load_config(GATEWAY)
    chat, billing = config.services
    assert (chat.protocol, chat.host, chat.port, chat.path) == ("https", "llm.internal", 443, "/v1")
    assert (chat.read_timeout, chat.connect_timeout, chat.retries, chat.enabled) == (300000, 60000, 5, True)
    assert (billing.protocol, billing.host, billing.port, billing.path) == ("http", "billing.internal", 8081, "/api")

    completions, models, invoices = config.routes
    assert [completions.service, models.service, invoices.service] == [chat.id, chat.id, billing.id]
    assert models.name is None and models.paths == ["~/models/(?<model>[a-z0-9-]+)$"]
    assert (completions.protocols, completions.strip_path, completions.preserve_host) == (["http", "https"], True, False)
    assert (completions.https_redirect_status_code, completions.path_handling, completions.regex_priority) == (426, "v0", 0)
    assert (completions.hosts, completions.headers) == ([], {})
    assert (invoices.strip_path, invoices.headers) == (False, {"x-tenant": ["acme", "~*^beta-"]})

    alice, batch = config.consumers
    assert batch.id == "6f1c1f0e-8a0b-4c1e-9d7e-2f3c4b5a6d7e" and batch.username is None
    assert [(c.consumer, c.key, c.ttl) for c in config.keyauth_credentials] == [
        (alice.id, _sha256_form("alice-key"), None), (alice.id, f"sha256:{BOB_KEY_SHA256}", None),
        (batch.id, _sha256_form("batch-key"), 3600),
    ]
    assert [(acl.consumer, acl.group) for acl in config.acls] == [(alice.id, "chat-users"), (alice.id, "billing-readers")]
    (gold,) = config.consumer_groups
    assert config.consumer_group_members == [(gold.id, batch.id), (gold.id, alice.id)]

    scopes = [(p.name, p.route, p.service, p.consumer, p.consumer_group) for p in config.plugins]
    assert scopes == [
        ("rate-limiting", None, chat.id, None, None),
        ("key-auth", completions.id, None, None, None),
        ("rate-limiting", None, None, None, gold.id),
        ("rate-limiting", completions.id, None, alice.id, None),
        ("acl", None, billing.id, None, None),
    ]
    assert config.plugins[3].config == RateLimiting.Config(minute=5, policy="local")
    assert config.plugins[1].config == PLUGINS["key-auth"].Config(key_names=["x-api-key"])
    assert config.plugins[0].protocols == ["grpc", "grpcs", "http", "https"] and config.plugins[0].enabled


def all_ids(config: Config) -> list[str]:
    groups = (config.services, config.routes, config.consumers, config.keyauth_credentials, config.acls,
              config.consumer_groups, config.plugins)
    return [entity.id for group in groups for entity in group]


def test_ids_are_deterministic_unique_uuids(plugins):
    ids = all_ids(load_config(GATEWAY))
    assert ids == all_ids(load_config(GATEWAY))
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(identifier)) == identifier for identifier in ids)


def test_json_with_tabs_loads_like_yaml(plugins, tmp_path):
    as_json = tmp_path / "gateway.json"
    as_json.write_text(json.dumps(yaml.safe_load(GATEWAY.read_text()), indent="\t"))
    assert load_config(as_json) == load_config(GATEWAY)


def test_behavior_md_example_without_plugins_loads():
    config = parse_config("""
_format_version: "3.0"
services:
- name: echo
  url: http://upstream:8080/api
  routes:
  - name: r1
    paths: ["/v1"]
consumers:
- username: bob
  custom_id: "42"
  keyauth_credentials: [{key: secret}]
  acls: [{group: admin}]
""")
    (service,), (route,), (bob,) = config.services, config.routes, config.consumers
    assert (service.host, service.port, service.path, route.service) == ("upstream", 8080, "/api", service.id)
    assert (bob.username, bob.custom_id) == ("bob", "42")
    assert [(c.consumer, c.key) for c in config.keyauth_credentials] == [(bob.id, _sha256_form("secret"))]
    assert [(a.consumer, a.group) for a in config.acls] == [(bob.id, "admin")]


@pytest.mark.parametrize("document", [
    {"_comment": "x", "_ignore": [1], "_transform": False, "upstreams": [], "services": [
        {"name": "s", "host": "h", "_comment": "x", "created_at": 1, "tls_verify": None, "routes": [
            {"paths": ["/", "~/(?<id>\\d+)$", "/a%2Fb", "/café"], "snis": [], "path_handling": "v1"}]}]},
    {"routes": [{"hosts": ["*.a.com:8000", "a.*", "[::1]:80", "10.0.0.1"], "methods": ["GET"]}]},
    {"services": [{"name": "s", "url": "http://[::1]"}, {"name": "t", "url": "https://h:8443/p"}]},
    {"consumers": [{"username": "bob", "keyauth_credentials": [{"key": "k"}]}],
     "keyauth_credentials": [{"consumer": "bob", "key": f"sha256:{BOB_KEY_SHA256}"}]},
], ids=["ignored-and-empty-keys", "hosts", "urls", "plain-and-hashed-keys"])
def test_valid_edge_cases_load(document):
    parse_config(json.dumps({"_format_version": "3.0", **document}))


# -- every rule, one problem each

SERVICE = {"name": "s", "host": "upstream"}


def service(**fields):
    return {"services": [{**SERVICE, **fields}]}


def route(**fields):
    return service(routes=[{"paths": ["/"], **fields}])


def consumer(**fields):
    return {"consumers": [{"username": "bob", **fields}]}


R = "services[0].routes[0]"
C = "consumers[0]"
UUID = "6f1c1f0e-8a0b-4c1e-9d7e-2f3c4b5a6d7e"

RULES = [
    # top level
    ({"_format_version": "4.0"}, "_format_version: expected one of: 1.1, 2.1, 3.0"),
    ({"_format_version": 3}, "_format_version: expected a string"),
    ({"_format_version": "2.1"}, "_format_version: format version '2.1' is not supported by fastgate, use \"3.0\""),
    ({"_transform": "yes"}, "_transform: expected a boolean"),
    ({"_workspace": "default"}, "_workspace: '_workspace' is not supported by fastgate"),
    ({"upstreams": [{"name": "u"}]}, "upstreams: 'upstreams' is not supported by fastgate"),
    ({"jwt_secrets": [{"key": "k"}]}, "jwt_secrets: 'jwt_secrets' is not supported by fastgate"),
    ({"servicez": []}, "servicez: unknown field"),
    ({"services": {"name": "s"}}, "services: expected an array"),
    ({"services": ["s"]}, "services[0]: expected a record"),
    # services
    (service(protocol="grpc"), "services[0].protocol: protocol 'grpc' is not supported by fastgate"),
    (service(protocol="ftp"), "services[0].protocol: expected one of: http, https"),
    ({"services": [{"name": "s"}]}, "services[0].host: required field missing"),
    (service(host="upstream:80"), "services[0].host: must not have a port"),
    (service(host="up stream"), "services[0].host: invalid value: up stream"),
    (service(port=70000), "services[0].port: value should be between 0 and 65535"),
    (service(port="80"), "services[0].port: expected an integer"),
    (service(path="api"), "services[0].path: should start with: /"),
    (service(path="/a//b"), "services[0].path: must not have empty segments"),
    (service(path="/a b"), "services[0].path: invalid path: '/a b' (characters outside of the reserved list of RFC 3986 found)"),
    (service(path="/a%zz"), "services[0].path: invalid url-encoded value: '%zz'"),
    (service(retries=32768), "services[0].retries: value should be between 0 and 32767"),
    (service(connect_timeout=0), "services[0].connect_timeout: value should be between 1 and 2147483646"),
    (service(enabled="yes"), "services[0].enabled: expected a boolean"),
    (service(name="a b"), "services[0].name: invalid value 'a b': the only accepted ascii characters are alphanumerics or ., -, _, and ~"),
    (service(name=""), "services[0].name: length must be at least 1"),
    (service(tags=["a,b"]), "services[0].tags[0]: invalid tag 'a,b': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"),
    (service(id="nope"), "services[0].id: expected a valid UUID"),
    (service(tls_verify=True), "services[0].tls_verify: 'tls_verify' is not supported by fastgate"),
    (service(ca_certificates=[UUID]), "services[0].ca_certificates: 'ca_certificates' is not supported by fastgate"),
    (service(color="red"), "services[0].color: unknown field"),
    ({"services": [{"url": "http://h", "host": "h", "port": 80}]}, "services[0].url: cannot be set together with 'host', 'port'"),
    ({"services": [{"url": "grpc://h"}]}, "services[0].url: protocol 'grpc' is not supported by fastgate"),
    ({"services": [{"url": "upstream:8080"}]}, "services[0].url: invalid url: expected scheme://host[:port][/path]"),
    ({"services": [{"url": "http://h:http"}]}, "services[0].url: invalid port number"),
    ({"services": [{"url": "http://h/a//b"}]}, "services[0].url: must not have empty segments"),
    ({"services": [{"url": "http://u:p@h/"}]}, "services[0].url: must not have a query string, fragment or user info"),
    ({"services": [SERVICE, SERVICE]}, "services[1].name: uniqueness violation: 'services' entity with name set to 's' already declared"),
    ({"services": [{**SERVICE, "id": UUID}, {"host": "h", "id": UUID}]},
     f"services[1].id: uniqueness violation: 'services' entity with primary key set to '{UUID}' already declared"),
    # routes
    (route(paths=["v1"]), f"{R}.paths[0]: must start with / or ~/"),
    (route(paths=["/a//b"]), f"{R}.paths[0]: must not have empty segments"),
    (route(paths=["/a/../b"]), f"{R}.paths[0]: non-normalized path, consider use '/b' instead"),
    (route(paths=["/h%65llo/%2f"]), f"{R}.paths[0]: non-normalized path, consider use '/hello/%2F' instead"),
    (route(paths=["/caf%C3%A9"]), f"{R}.paths[0]: non-normalized path, consider use '/café' instead"),
    (route(paths=["/a%zz"]), f"{R}.paths[0]: invalid url-encoded value: '%zz'"),
    (route(paths=["~/(a"]), f"{R}.paths[0]: invalid regex: missing ), unterminated subpattern at position 1"),
    (route(methods=["get"]), f"{R}.methods[0]: invalid value: get"),
    (route(hosts=["*.*.a.com"]), f"{R}.hosts[0]: invalid wildcard: must have at most one wildcard"),
    (route(hosts=["a.*.com"]), f"{R}.hosts[0]: invalid wildcard: must be placed at leftmost or rightmost label"),
    (route(hosts=["a.com:99999"]), f"{R}.hosts[0]: invalid port number"),
    (route(hosts=["a com"]), f"{R}.hosts[0]: invalid value: a com"),
    (route(headers={"Host": ["a"]}), f"{R}.headers.Host: cannot contain 'host' header, which must be specified in the 'hosts' attribute"),
    (route(headers={"x v": ["a"]}), f'{R}.headers["x v"]: bad header name \'x v\', allowed characters are A-Z, a-z, 0-9, \'_\', and \'-\''),
    (route(headers={"x-v": ["~*("]}), f"{R}.headers.x-v[0]: invalid regex: missing ), unterminated subpattern at position 0"),
    (route(headers={"x-v": "a"}), f"{R}.headers.x-v: expected an array"),
    (route(protocols=["grpc"]), f"{R}.protocols[0]: protocol 'grpc' is not supported by fastgate"),
    (route(protocols=[]), f"{R}.protocols: length must be at least 1"),
    (route(https_redirect_status_code=300), f"{R}.https_redirect_status_code: expected one of: 301, 302, 307, 308, 426"),
    (route(path_handling="v2"), f"{R}.path_handling: expected one of: v0, v1"),
    (route(request_buffering="no"), f"{R}.request_buffering: expected a boolean"),
    (route(snis=["a.com"]), f"{R}.snis: 'snis' is not supported by fastgate"),
    (route(sources=[{"ip": "10.0.0.1"}]), f"{R}.sources: 'sources' is not supported by fastgate"),
    (route(paths=None), f"{R}: must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"),
    (route(paths=[], protocols=["https"]), f"{R}: must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'https'"),
    (route(service="s"), f"{R}.service: value must be null"),
    ({"routes": [{"paths": ["/"], "service": "nope"}]}, "routes[0].service: invalid reference 'service: nope' (no such entry in 'services')"),
    ({**route(name="r"), "routes": [{"name": "r", "paths": ["/"]}]},
     "routes[0].name: uniqueness violation: 'routes' entity with name set to 'r' already declared"),
    # consumers, credentials, acls
    ({"consumers": [{"tags": ["t"]}]}, f"{C}: at least one of these fields must be non-empty: 'custom_id', 'username'"),
    ({"consumers": [{"username": "bob"}, {"username": "bob"}]},
     "consumers[1].username: uniqueness violation: 'consumers' entity with username set to 'bob' already declared"),
    ({"consumers": [{"custom_id": "7"}, {"custom_id": "7"}]},
     "consumers[1].custom_id: uniqueness violation: 'consumers' entity with custom_id set to '7' already declared"),
    (consumer(basicauth_credentials=[{"username": "u"}]), f"{C}.basicauth_credentials: 'basicauth_credentials' is not supported by fastgate"),
    (consumer(groups=[{"name": "gold"}]), f"{C}.groups[0].name: invalid reference 'consumer_group: gold' (no such entry in 'consumer_groups')"),
    (consumer(keyauth_credentials=[{"key": "k", "consumer": "bob"}]), f"{C}.keyauth_credentials[0].consumer: value must be null"),
    (consumer(keyauth_credentials=[{}]), f"{C}.keyauth_credentials[0].key: required field missing"),
    (consumer(keyauth_credentials=[{"key": "sha256:abc"}]), f"{C}.keyauth_credentials[0].key: expected 'sha256:' followed by 64 hexadecimal digits"),
    (consumer(keyauth_credentials=[{"key": "k", "ttl": -1}]), f"{C}.keyauth_credentials[0].ttl: value should be between 0 and 100000000"),
    (consumer(keyauth_credentials=[{"key": "bob-key"}, {"key": f"sha256:{BOB_KEY_SHA256.upper()}"}]),
     f"{C}.keyauth_credentials[1].key: uniqueness violation: 'keyauth_credentials' entity with the same key already declared at {C}.keyauth_credentials[0]"),
    ({"keyauth_credentials": [{"key": "k"}]}, "keyauth_credentials[0].consumer: required field missing"),
    ({"keyauth_credentials": [{"key": "k", "consumer": "nope"}]},
     "keyauth_credentials[0].consumer: invalid reference 'consumer: nope' (no such entry in 'consumers')"),
    (consumer(acls=[{"group": "g", "consumer": "bob"}]), f"{C}.acls[0].consumer: value must be null"),
    (consumer(acls=[{"tags": ["t"]}]), f"{C}.acls[0].group: required field missing"),
    ({**consumer(acls=[{"group": "g"}]), "acls": [{"consumer": "bob", "group": "g"}]},
     "acls[0].group: uniqueness violation: 'acls' entity with group set to 'g' already declared for this consumer"),
    ({"acls": [{"group": "g", "consumer": UUID}]}, f"acls[0].consumer: invalid reference 'consumer: {UUID}' (no such entry in 'consumers')"),
    # consumer groups
    ({"consumer_groups": [{"tags": ["t"]}]}, "consumer_groups[0].name: required field missing"),
    ({"consumer_groups": [{"name": "g"}, {"name": "g"}]},
     "consumer_groups[1].name: uniqueness violation: 'consumer_groups' entity with name set to 'g' already declared"),
    ({"consumer_groups": [{"name": "g", "consumers": [{"username": "nope"}]}]},
     "consumer_groups[0].consumers[0].username: invalid reference 'consumer: nope' (no such entry in 'consumers')"),
    ({"consumer_groups": [{"name": "g", "consumers": [{}]}]},
     "consumer_groups[0].consumers[0]: at least one of these fields must be non-empty: 'id', 'username'"),
    # plugins
    ({"plugins": [{"name": "prometheus"}]}, "plugins[0].name: plugin 'prometheus' is not supported yet"),
    ({"plugins": [{"name": "basic-auth"}]}, "plugins[0].name: plugin 'basic-auth' is not supported yet"),
    ({"plugins": [{"name": "foo"}]}, "plugins[0].name: unknown plugin 'foo'"),
    ({"plugins": [{"config": {}}]}, "plugins[0].name: required field missing"),
    (service(plugins=[{"name": "correlation-id", "service": "s"}]), "services[0].plugins[0].service: value must be null"),
    (route(plugins=[{"name": "correlation-id", "consumer": "bob"}]), f"{R}.plugins[0].consumer: value must be null"),
    ({"plugins": [{"name": "correlation-id", "service": "nope"}]}, "plugins[0].service: invalid reference 'service: nope' (no such entry in 'services')"),
    ({"plugins": [{"name": "correlation-id", "consumer_group": "g"}]},
     "plugins[0].consumer_group: invalid reference 'consumer_group: g' (no such entry in 'consumer_groups')"),
    ({"plugins": [{"name": "correlation-id", "ordering": {"before": {"access": ["acl"]}}}]}, "plugins[0].ordering: 'ordering' is not supported by fastgate"),
    ({"plugins": [{"name": "correlation-id", "protocols": ["ws"]}]},
     "plugins[0].protocols[0]: expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp"),
    ({"plugins": [{"name": "acl", "config": [1]}]}, "plugins[0].config: expected a map"),
]


@pytest.mark.parametrize("document, problem", RULES, ids=[line for _, line in RULES])
def test_each_rule_reports_its_problem(plugins, document, problem):
    assert problems(document) == [problem]


@pytest.mark.parametrize("text, problem", [
    ('_format_version: "3.0"\nservices: []\nservices: []\n', "<config>: line 3, column 1: duplicate key 'services'"),
    ('{"_format_version": "3.0", "routes": [], "routes": []}', "<config>: duplicate key 'routes'"),
    ("_format_version: 3.0\n", "_format_version: expected a string"),
    ("services: []\n", "_format_version: required field missing"),
    ("_format_version: [\n", "<config>: line 2, column 1: expected the node content, but found '<stream end>'"),
    ("", "<config>: the configuration is empty"),
    ("- a\n", "<config>: expected a mapping at the top level"),
    (b"\xff", "<config>: not UTF-8 text: invalid start byte at byte 0"),
])
def test_text_problems(text, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [str(p) for p in caught.value.problems] == [problem]


def test_unreadable_file_names_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert [str(p) for p in caught.value.problems] == [f"{missing}: cannot read the file: No such file or directory"]


@pytest.mark.parametrize("config, problem", [
    ({"minute": 0}, "plugins[0].config.minute: value must be greater than 0"),
    ({"policy": "memcached"}, "plugins[0].config.policy: expected one of: cluster, local, redis"),
    ({"hour": 1}, "plugins[0].config.hour: unknown field"),
])
def test_plugin_config_is_checked_against_the_plugin_schema(plugins, config, problem):
    assert problems({"plugins": [{"name": "rate-limiting", "config": config}]}) == [problem]


def test_plugins_are_unique_per_scope(plugins):
    document = {**consumer(plugins=[{"name": "rate-limiting"}]),
                "plugins": [{"name": "rate-limiting", "consumer": "bob"}, {"name": "rate-limiting"}]}
    assert problems(document) == [
        "plugins[0].name: uniqueness violation: 'plugins' entity with name set to 'rate-limiting' already "
        "declared for the same route, service, consumer and consumer_group"
    ]


def test_every_independent_problem_is_reported(plugins):
    document = {
        "_format_version": "2.1",
        "upstreams": [{"name": "u"}],
        "services": [
            {"name": "a", "host": "h", "port": -1, "protocol": "tcp", "routes": [
                {"paths": ["/x/./y", "api"], "methods": ["get"], "service": "a"},
                {"name": "twin", "hosts": ["a.*.b"]},
            ]},
            {"name": "a", "url": "http://h", "path": "/p"},
        ],
        "routes": [{"name": "twin", "paths": ["/"], "service": "ghost"}],
        "consumers": [{"custom_id": "c", "keyauth_credentials": [{"key": "sha256:00"}], "acls": [{}]}],
        "plugins": [{"name": "rate-limiting", "config": {"minute": -5, "policy": "x"}}, {"name": "prometheus"}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps(document))
    assert sorted(map(str, caught.value.problems)) == sorted([
        "upstreams: 'upstreams' is not supported by fastgate",
        "services[0].protocol: protocol 'tcp' is not supported by fastgate",
        "services[0].port: value should be between 0 and 65535",
        "services[0].routes[0].paths[0]: non-normalized path, consider use '/x/y' instead",
        "services[0].routes[0].paths[1]: must start with / or ~/",
        "services[0].routes[0].methods[0]: invalid value: get",
        "services[0].routes[1].hosts[0]: invalid wildcard: must be placed at leftmost or rightmost label",
        "consumers[0].keyauth_credentials[0].key: expected 'sha256:' followed by 64 hexadecimal digits",
        "consumers[0].acls[0].group: required field missing",
        "plugins[0].config.minute: value must be greater than 0",
        "plugins[0].config.policy: expected one of: cluster, local, redis",
        '_format_version: format version \'2.1\' is not supported by fastgate, use "3.0"',
        "services[0].routes[0].service: value must be null",
        "services[1].url: cannot be set together with 'path'",
        "services[1].name: uniqueness violation: 'services' entity with name set to 'a' already declared",
        "routes[0].service: invalid reference 'service: ghost' (no such entry in 'services')",
        "routes[0].name: uniqueness violation: 'routes' entity with name set to 'twin' already declared",
        "plugins[1].name: plugin 'prometheus' is not supported yet",
    ])


def test_a_regex_the_validator_accepts_is_one_the_router_compiles():
    from fastgate.config.compile import compile_snapshot

    config = parse_config(
        '_format_version: "3.0"\n'
        "services: [{name: s, url: 'http://u.test', routes: [{name: r, paths: ['~/v(?<n>\\d+)(?<=1)/x']}]}]\n"
    )
    match = compile_snapshot(config).router.match(b"GET", b"h", b"/v11/x")
    assert match is not None and match.captures["n"] == "11"
    assert compile_snapshot(config).router.match(b"GET", b"h", b"/v12/x") is None
