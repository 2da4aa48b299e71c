"""The plugins fastgate runs, by their Kong names.

`PLUGINS` maps a plugin name to its class; each class has a `Config` msgspec Struct that the
configuration loader checks the plugin's `config` against. It is empty until the first plugin
lands, so every plugin named in a configuration is reported as not supported yet.
"""

PLUGINS: dict[str, type] = {}

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
