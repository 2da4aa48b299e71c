"""The plugins fastgate runs, by their Kong names.

A plugin is a class with:

* `NAME` (Kong's plugin name) and `PRIORITY` (Kong's number; higher runs first, all phases);
* `Config`: a msgspec Struct with Kong's field names and defaults; the configuration loader
  checks a plugin's `config` against it (unknown fields are errors; `__post_init__` may refuse
  a combination by raising ValueError);
* `CONSUMER_SCOPED`: False when the plugin may not be scoped to a consumer or consumer group
  (Kong's `no_consumer`: the auth plugins and cors);
* `__init__(self, config, context)`: made once per configured instance when a snapshot is
  compiled; `context` is a `PluginContext` (consumers, the key index);
* the phase methods it needs, each optional:
  - `access(exchange)` -> None to go on, an `Exit` to answer, or an asyncio future whose result
    is one of those (the request waits, nothing else does, and no Task is made for it);
  - `response(exchange, status, parts)`: edit the response head in place (`parts` is a flat
    list name, b": ", value, b"\\r\\n", ...), for proxied and gateway-made responses alike;
  - `body(exchange, chunk) -> bytes`: each response body chunk as it passes;
  - `log(exchange, status)`: after the response went out, off the client's path;
* `watched_headers` (optional): canonical request header names (lower case, `-` for `_`) the
  plugin reads from `exchange.headers`;
* `exchange.plugin_data`: a dict (None until a plugin sets one) for a plugin's own per-request
  state between its phases; the Exchange is a compiled class without room for new attributes;
* `exchange.response_headers`: header parts (name, b": ", value, b"\r\n", ...) the access phase
  adds to the client's response, proxied or answered by the gateway (the rate-limit headers);
* `exchange.read_body()` in `access`, for a plugin that must see the whole request body before
  it decides: the body (b"" without one), or None while it is still arriving, in which case
  `access` returns None having changed nothing and is called again once the body is complete
  (buffered up to 1 MiB, past which the client gets 413). Setting `exchange.body` replaces the
  body the upstream gets (sent with its own Content-Length). Requests on routes whose plugins
  never call it stream their bodies unbuffered.

The built-in plugins subclass the compiled handlers of fastgate/_core/_pure/plugins.py. A team's
own plugin is a plain Python class with the same interface, named in FASTGATE_PLUGINS.
"""

from __future__ import annotations

import importlib

from fastgate.plugins.acl import Acl
from fastgate.plugins.correlation_id import CorrelationId
from fastgate.plugins.cors import Cors
from fastgate.plugins.key_auth import KeyAuth
from fastgate.plugins.rate_limiting import RateLimiting
from fastgate.plugins.rate_limiting_advanced import RateLimitingAdvanced
from fastgate.plugins.request_termination import RequestTermination
from fastgate.plugins.request_transformer import RequestTransformer
from fastgate.plugins.response_transformer import ResponseTransformer

BUILT_IN = (
    Acl, CorrelationId, Cors, KeyAuth, RateLimiting, RateLimitingAdvanced, RequestTermination, RequestTransformer,
    ResponseTransformer,
)

PLUGINS: dict[str, type] = {plugin.NAME: plugin for plugin in BUILT_IN}

# Kong's bundled plugins (kong/constants.lua, 3.10) and the Enterprise ones fastgate plans to
# implement: naming one of these gets "not supported yet" rather than "unknown plugin".
KONG_PLUGIN_NAMES: frozenset[str] = frozenset({
    "acl", "acme", "ai-prompt-decorator", "ai-prompt-guard", "ai-prompt-template", "ai-proxy",
    "ai-request-transformer", "ai-response-transformer", "aws-lambda", "azure-functions",
    "basic-auth", "bot-detection", "correlation-id", "cors", "datadog", "file-log",
    "grpc-gateway", "grpc-web", "hmac-auth", "http-log", "ip-restriction", "jwt", "key-auth",
    "ldap-auth", "loggly", "oauth2", "opentelemetry", "post-function", "pre-function",
    "prometheus", "proxy-cache", "rate-limiting", "redirect", "request-size-limiting",
    "request-termination", "request-transformer", "response-ratelimiting",
    "response-transformer", "session", "standard-webhooks", "statsd", "syslog", "tcp-log",
    "udp-log", "zipkin",
    # Enterprise
    "rate-limiting-advanced",
})

_REQUIRED = ("NAME", "PRIORITY", "Config")


class PluginLoadError(Exception):
    pass


def load_custom(spec: str) -> list[str]:
    """Register the plugins named in FASTGATE_PLUGINS: comma-separated `module:Class`.
    Returns their names; PluginLoadError names the entry that failed."""
    names = []
    for entry in filter(None, (item.strip() for item in spec.split(","))):
        module_name, colon, class_name = entry.partition(":")
        if not colon or not module_name or not class_name:
            raise PluginLoadError(f"FASTGATE_PLUGINS: '{entry}' is not 'module:Class'")
        try:
            plugin = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise PluginLoadError(f"FASTGATE_PLUGINS: cannot load '{entry}': {exc}") from exc
        missing = [attribute for attribute in _REQUIRED if not hasattr(plugin, attribute)]
        if missing:
            raise PluginLoadError(f"FASTGATE_PLUGINS: '{entry}' lacks {', '.join(missing)}")
        if plugin.NAME in PLUGINS and PLUGINS[plugin.NAME] is not plugin:
            raise PluginLoadError(f"FASTGATE_PLUGINS: '{entry}': a plugin named '{plugin.NAME}' exists already")
        PLUGINS[plugin.NAME] = plugin
        names.append(plugin.NAME)
    return names
