"""Every FASTGATE_* environment variable, decoded in one place.

A bad value stops start-up with a message naming the variable and the form it expects
(`SettingsError`); nothing else in fastgate reads the environment directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

__all__ = ["ListenAddress", "Settings", "SettingsError", "load_settings", "extensions_disabled"]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class ListenAddress(msgspec.Struct, frozen=True):
    host: str
    port: int
    ssl: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (" ssl" if self.ssl else "")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    config: str | None = None
    proxy_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 8000),)
    # None means "off": no admin listener at all.
    admin_listen: tuple[ListenAddress, ...] | None = (ListenAddress("127.0.0.1", 8001),)
    workers: Annotated[int, msgspec.Meta(ge=1, le=1024)] = msgspec.field(
        default_factory=lambda: os.cpu_count() or 1
    )
    ssl_cert: str | None = None
    ssl_cert_key: str | None = None
    log_level: LogLevel = "info"
    no_extensions: bool = False
    graceful_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # A team's own body for gateway-made errors: {message}, {status}, {request_id} replaced.
    error_template: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    error_content_type: Annotated[str, msgspec.Meta(min_length=1)] = "application/json; charset=utf-8"
    # The team's own plugins: comma-separated module:Class entries (fastgate/plugins/__init__.py).
    plugins: str = ""


# (variable, Settings field, expected form shown in errors, default shown in the README)
VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    ("FASTGATE_CONFIG", "config", "a path to a YAML or JSON file", "unset"),
    ("FASTGATE_PROXY_LISTEN", "proxy_listen", "comma-separated host:port entries, each optionally ending in ' ssl'", "0.0.0.0:8000"),
    ("FASTGATE_ADMIN_LISTEN", "admin_listen", "'off' or comma-separated host:port entries", "127.0.0.1:8001"),
    ("FASTGATE_WORKERS", "workers", "an integer from 1 to 1024", "number of CPUs"),
    ("FASTGATE_SSL_CERT", "ssl_cert", "a path to a PEM certificate (chain)", "unset"),
    ("FASTGATE_SSL_CERT_KEY", "ssl_cert_key", "a path to the PEM private key of FASTGATE_SSL_CERT", "unset"),
    ("FASTGATE_LOG_LEVEL", "log_level", "one of debug, info, warning, error, critical", "info"),
    ("FASTGATE_NO_EXTENSIONS", "no_extensions", "a boolean: 1/0, true/false, yes/no, on/off", "0"),
    ("FASTGATE_GRACEFUL_TIMEOUT", "graceful_timeout", "a number of seconds >= 0", "30"),
    ("FASTGATE_ERROR_TEMPLATE", "error_template", "a non-empty body template using {message}, {status} and {request_id}", "unset (Kong's JSON)"),
    ("FASTGATE_ERROR_CONTENT_TYPE", "error_content_type", "a media type", "application/json; charset=utf-8"),
    ("FASTGATE_PLUGINS", "plugins", "comma-separated module:Class entries", "unset"),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """One line per bad variable: `FASTGATE_X: expected <form>, got '<value>'`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _parse_listen(raw: str, allow_off: bool) -> tuple[ListenAddress, ...] | None:
    if allow_off and raw.strip().lower() == "off":
        return None
    entries = []
    for entry in raw.split(","):
        words = entry.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != "ssl"):
            raise ValueError
        host, sep, port_text = words[0].rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            raise ValueError
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError
            host = host[1:-1]
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError
        entries.append(ListenAddress(host, port, ssl=len(words) == 2))
    return tuple(entries)


def _raw_value(field: str, raw: str) -> object:
    if field == "proxy_listen":
        return _parse_listen(raw, allow_off=False)
    if field == "admin_listen":
        return _parse_listen(raw, allow_off=True)
    if field == "no_extensions":
        return _parse_bool(raw)
    if field == "workers":
        return int(raw.strip())
    if field == "graceful_timeout":
        return float(raw.strip())
    if field == "log_level":
        return raw.strip().lower()
    return raw


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Decode the FASTGATE_* variables of `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    problems: list[str] = []
    for variable, field, form, _ in VARIABLES:
        if variable not in env:
            continue
        raw = env[variable]
        try:
            value = _raw_value(field, raw)
            # Per-field conversion so that every bad variable is reported, not only the first.
            msgspec.convert({field: value}, Settings)
        except (ValueError, msgspec.ValidationError):
            problems.append(f"{variable}: expected {form}, got {raw!r}")
            continue
        values[field] = value
    if problems:
        raise SettingsError(problems)
    settings = msgspec.convert(values, Settings)
    listeners = settings.proxy_listen + (settings.admin_listen or ())
    if any(address.ssl for address in listeners) and not (settings.ssl_cert and settings.ssl_cert_key):
        raise SettingsError(
            ["FASTGATE_SSL_CERT: expected a certificate and FASTGATE_SSL_CERT_KEY a key, "
             "because a listener ends in ' ssl'"]
        )
    return settings


def extensions_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """FASTGATE_NO_EXTENSIONS alone, for the import-time choice of fastgate._core."""
    env = os.environ if environ is None else environ
    raw = env.get("FASTGATE_NO_EXTENSIONS")
    if raw is None:
        return False
    try:
        return _parse_bool(raw)
    except ValueError:
        form = next(v[2] for v in VARIABLES if v[0] == "FASTGATE_NO_EXTENSIONS")
        raise SettingsError([f"FASTGATE_NO_EXTENSIONS: expected {form}, got {raw!r}"]) from None
