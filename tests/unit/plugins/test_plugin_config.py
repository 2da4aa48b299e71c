"""The built-in plugins' config schemas as the loader checks them (Kong's fields and rules)."""

from __future__ import annotations

import json

import pytest

from fastgate.config import ConfigError, parse_config
from fastgate.plugins import PLUGINS, PluginLoadError, load_custom


def load(plugins: list[dict], **document):
    return parse_config(json.dumps({
        "_format_version": "3.0",
        "consumers": [{"username": "bob"}],
        "consumer_groups": [{"name": "gold"}],
        "plugins": plugins,
        **document,
    }))


def problems(plugins: list[dict]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(plugins)
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("plugin", "problem"),
    [
        ({"name": "acl", "config": {}},
         "plugins[0].config: at least one of these fields must be non-empty: 'config.allow', 'config.deny'"),
        ({"name": "acl", "config": {"allow": ["a"], "deny": ["b"]}},
         "plugins[0].config: only one of these fields must be non-empty: 'config.allow', 'config.deny'"),
        ({"name": "acl", "config": {"allow": ["a"], "whitelist": ["a"]}}, "plugins[0].config.whitelist: unknown field"),
        ({"name": "key-auth", "config": {"key_names": []}}, "plugins[0].config.key_names: length must be at least 1"),
        ({"name": "key-auth", "config": {"key_names": ["a b"]}}, "plugins[0].config.key_names[0]: invalid value: a b"),
        ({"name": "key-auth", "consumer": "bob"},
         "plugins[0].consumer: value must be null (plugin 'key-auth' cannot be scoped to a consumer)"),
        ({"name": "acl", "consumer_group": "gold", "config": {"allow": ["a"]}},
         "plugins[0].consumer_group: value must be null (plugin 'acl' cannot be scoped to a consumer_group)"),
        ({"name": "cors", "consumer": "bob"},
         "plugins[0].consumer: value must be null (plugin 'cors' cannot be scoped to a consumer)"),
        ({"name": "correlation-id", "consumer": "bob", "consumer_group": "gold"},
         "plugins[0].consumer_group: a plugin is scoped to a consumer or to a consumer group, not both"),
        ({"name": "correlation-id", "config": {"generator": "random"}},
         "plugins[0].config.generator: expected one of: tracker, uuid, uuid#counter"),
        ({"name": "cors", "config": {"origins": ["https://(unclosed"]}},
         "plugins[0].config.origins[0]: 'https://(unclosed' is not a valid regex: missing ), unterminated subpattern at position 8"),
        ({"name": "cors", "config": {"methods": ["FETCH"]}},
         "plugins[0].config.methods[0]: expected one of: CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"),
        ({"name": "request-termination", "config": {"status_code": 600}},
         "plugins[0].config.status_code: value should be between 100 and 599"),
        ({"name": "request-termination", "config": {"message": "m", "body": "b"}},
         "plugins[0].config: message cannot be used with content_type or body"),
        ({"name": "request-termination", "config": {"content_type": "text/plain"}},
         "plugins[0].config: content_type requires a body"),
        ({"name": "request-termination", "config": {"echo": True, "body": "b"}},
         "plugins[0].config: echo cannot be used with content_type and body"),
        ({"name": "request-transformer", "config": {"add": {"headers": ["novalue"]}}},
         "plugins[0].config.add.headers[0]: invalid value: novalue (expected 'name:value')"),
        ({"name": "request-transformer", "config": {"add": {"headers": ["x:$(shared.thing)"]}}},
         "plugins[0].config.add.headers[0]: unknown template source 'shared' (expected one of: headers, query_params, uri_captures)"),
        ({"name": "request-transformer", "config": {"replace": {"uri": "/a/$(string.rep('x', 9))"}}},
         "plugins[0].config.replace.uri: unsupported template expression in '/a/$(string.rep('x', 9))'"),
        ({"name": "request-transformer", "config": {"append": {"body": ["a:$(body.x)"]}}},
         "plugins[0].config.append.body[0]: unknown template source 'body' (expected one of: headers, query_params, uri_captures)"),
        ({"name": "request-transformer", "config": {"rename": {"body": ["a"]}}},
         "plugins[0].config.rename.body[0]: invalid value: a (expected 'old:new')"),
        ({"name": "request-transformer", "config": {"rename": {"headers": ["only-old"]}}},
         "plugins[0].config.rename.headers[0]: invalid value: only-old (expected 'old:new')"),
        ({"name": "rate-limiting", "config": {"limit_by": "ip"}},
         "plugins[0].config: at least one of these fields must be non-empty: 'config.second', 'config.minute', "
         "'config.hour', 'config.day', 'config.month', 'config.year'"),
        ({"name": "rate-limiting", "config": {"minute": 6, "hour": 3}},
         "plugins[0].config: The limit for hour(3.0) cannot be lower than the limit for minute(6.0)"),
        ({"name": "rate-limiting", "config": {"minute": 6, "limit_by": "header"}},
         "plugins[0].config: No header name provided"),
        ({"name": "rate-limiting", "config": {"minute": 6, "limit_by": "consumer-group"}},
         "plugins[0].config.limit_by: expected one of: consumer, credential, header, ip, path, service"),
        ({"name": "rate-limiting", "config": {"minute": 6, "policy": "cluster"}},
         "plugins[0].config: policy: 'cluster' keeps counters in Kong's database and fastgate has none; use 'local' or 'redis'"),
        ({"name": "rate-limiting", "config": {"minute": 6, "policy": "redis"}},
         "plugins[0].config: redis.host is required when policy is 'redis'"),
        ({"name": "rate-limiting", "config": {"minute": 6, "policy": "redis", "redis": {"host": "h"}, "sync_rate": 0.01}},
         "plugins[0].config: sync_rate: -1 (a check in Redis per request) or at least 0.02 (seconds between syncs)"),
        ({"name": "rate-limiting-advanced", "config": {"limit": [5], "window_size": [60], "strategy": "redis",
                                                       "redis": {"host": "h"}, "sync_rate": 0.001}},
         "plugins[0].config: sync_rate: 0 (a check in Redis per request), -1 (counters in memory only) or at least "
         "0.02 (seconds between syncs)"),
        ({"name": "rate-limiting-advanced", "config": {"limit": [5], "window_size": [60], "strategy": "redis",
                                                       "redis": {"host": "h"}}},
         "plugins[0].config: sync_rate is required when strategy is 'redis'"),
        ({"name": "rate-limiting-advanced", "config": {"limit": [5, 10], "window_size": [60]}},
         "plugins[0].config: You must provide the same number of windows and limits"),
        ({"name": "rate-limiting-advanced", "config": {"limit": [5], "window_size": [60], "identifier": "path"}},
         "plugins[0].config: No path provided"),
        ({"name": "rate-limiting-advanced", "config": {"limit": [5], "window_size": [0]}},
         "plugins[0].config.window_size[0]: value must be greater than 0"),
        ({"name": "rate-limiting-advanced", "config": {"window_size": [60]}},
         "plugins[0].config.limit: required field missing"),
        ({"name": "response-transformer", "config": {"add": {"json": ["a:b"]}}},
         "plugins[0].config.add: transforming the response body is not supported by fastgate (it would buffer streams)"),
        ({"name": "response-transformer", "config": {"remove": {"headers": ["Content-Length"]}}},
         "plugins[0].config.remove.headers[0]: 'Content-Length' is set by the proxy (message framing) and cannot be transformed"),
        ({"name": "response-transformer", "config": {"rename": {"headers": ["x-a:Transfer-Encoding"]}}},
         "plugins[0].config.rename.headers[0]: 'Transfer-Encoding' is set by the proxy (message framing) and cannot be transformed"),
    ],
)
def test_each_rule_reports_its_problem(plugin, problem):
    assert problems([plugin]) == [problem]


def test_body_lookup_and_body_edits_are_accepted():
    config = load([
        {"name": "key-auth", "config": {"key_in_body": True, "hide_credentials": True}},
        {"name": "request-transformer", "config": {"remove": {"body": ["a"]}, "add": {"body": ["b:$(headers.x)"]}}},
    ])
    key_auth, transformer = (plugin.config for plugin in config.plugins)
    assert key_auth.key_in_body is True
    assert (transformer.remove.body, transformer.add.body) == (["a"], ["b:$(headers.x)"])


def test_defaults_are_kongs():
    config = load([{"name": name} for name in ("key-auth", "correlation-id", "cors", "request-termination")])
    key_auth, correlation, cors, termination = (plugin.config for plugin in config.plugins)
    assert (key_auth.key_names, key_auth.key_in_header, key_auth.key_in_query, key_auth.key_in_body) == (["apikey"], True, True, False)
    assert (key_auth.hide_credentials, key_auth.anonymous, key_auth.run_on_preflight, key_auth.realm) == (False, None, True, None)
    assert (correlation.header_name, correlation.generator, correlation.echo_downstream) == ("Kong-Request-ID", "uuid#counter", False)
    assert cors.methods == ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
    assert (cors.credentials, cors.preflight_continue, cors.allow_origin_absent, cors.origins) == (False, False, True, None)
    assert (termination.status_code, termination.message, termination.echo) == (503, None, False)


def test_priorities_are_kongs():
    assert {name: plugin.PRIORITY for name, plugin in PLUGINS.items()} == {
        "correlation-id": 100001, "cors": 2000, "key-auth": 1250, "acl": 950, "rate-limiting": 910,
        "rate-limiting-advanced": 910, "request-transformer": 801, "response-transformer": 800,
        "request-termination": 2,
    }


def test_custom_plugins_load_or_fail_clearly(monkeypatch):
    monkeypatch.setattr("fastgate.plugins.PLUGINS", dict(PLUGINS))
    from fastgate import plugins

    assert load_custom("tests.integration.custom_plugins:Audit") == ["team-audit"]
    assert plugins.PLUGINS["team-audit"].PRIORITY == 1000
    for spec, message in (
        ("nocolon", "FASTGATE_PLUGINS: 'nocolon' is not 'module:Class'"),
        ("no.such.module:X", "FASTGATE_PLUGINS: cannot load 'no.such.module:X': No module named 'no'"),
        ("tests.integration.custom_plugins:AuditConfig", "FASTGATE_PLUGINS: 'tests.integration.custom_plugins:AuditConfig' lacks NAME, PRIORITY, Config"),
        ("fastgate.plugins.acl:Acl", None),
    ):
        if message is None:
            assert load_custom(spec) == ["acl"]  # the same class again is fine
            continue
        with pytest.raises(PluginLoadError) as caught:
            load_custom(spec)
        assert str(caught.value) == message
