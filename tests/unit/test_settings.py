import os
from pathlib import Path

import pytest

from fastgate.settings import VARIABLES, ListenAddress, SettingsError, load_settings


def test_defaults():
    settings = load_settings({})
    assert settings.config is None
    assert settings.proxy_listen == (ListenAddress("0.0.0.0", 8000),)
    assert settings.admin_listen == (ListenAddress("127.0.0.1", 8001),)
    assert settings.workers == (os.cpu_count() or 1)
    assert settings.log_level == "info"
    assert settings.no_extensions is False


def test_every_variable_is_decoded():
    settings = load_settings(
        {
            "FASTGATE_CONFIG": "/etc/fastgate/gateway.yaml",
            "FASTGATE_PROXY_LISTEN": "0.0.0.0:8000, [::1]:8443 ssl",
            "FASTGATE_ADMIN_LISTEN": "off",
            "FASTGATE_WORKERS": "3",
            "FASTGATE_SSL_CERT": "/c.pem",
            "FASTGATE_SSL_CERT_KEY": "/k.pem",
            "FASTGATE_LOG_LEVEL": "DEBUG",
            "FASTGATE_NO_EXTENSIONS": "yes",
            "FASTGATE_GRACEFUL_TIMEOUT": "2.5",
            "FASTGATE_ERROR_TEMPLATE": '{"error": {"code": {status}, "text": "{message}"}}',
            "FASTGATE_ERROR_CONTENT_TYPE": "application/problem+json",
            "FASTGATE_PLUGINS": "teamplugins.audit:Audit",
        }
    )
    assert settings.config == "/etc/fastgate/gateway.yaml"
    assert settings.proxy_listen == (ListenAddress("0.0.0.0", 8000), ListenAddress("::1", 8443, ssl=True))
    assert str(settings.proxy_listen[1]) == "[::1]:8443 ssl"
    assert settings.admin_listen is None
    assert settings.workers == 3
    assert (settings.ssl_cert, settings.ssl_cert_key) == ("/c.pem", "/k.pem")
    assert settings.log_level == "debug"
    assert settings.no_extensions is True
    assert settings.graceful_timeout == 2.5
    assert settings.error_template == '{"error": {"code": {status}, "text": "{message}"}}'
    assert settings.error_content_type == "application/problem+json"
    assert settings.plugins == "teamplugins.audit:Audit"
    assert {v[0] for v in VARIABLES} == {
        "FASTGATE_CONFIG", "FASTGATE_PROXY_LISTEN", "FASTGATE_ADMIN_LISTEN", "FASTGATE_WORKERS",
        "FASTGATE_SSL_CERT", "FASTGATE_SSL_CERT_KEY", "FASTGATE_LOG_LEVEL", "FASTGATE_NO_EXTENSIONS",
        "FASTGATE_GRACEFUL_TIMEOUT", "FASTGATE_ERROR_TEMPLATE", "FASTGATE_ERROR_CONTENT_TYPE", "FASTGATE_PLUGINS",
    }


def test_readme_documents_every_variable_with_its_default():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for variable, _, _, default in VARIABLES:
        assert f"| `{variable}` | " in readme, variable
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{variable}` | "))
        assert default in row, (variable, default)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("FASTGATE_PROXY_LISTEN", "8000"),
        ("FASTGATE_PROXY_LISTEN", "0.0.0.0:99999"),
        ("FASTGATE_PROXY_LISTEN", "0.0.0.0:8000 tls"),
        ("FASTGATE_PROXY_LISTEN", "off"),
        ("FASTGATE_ADMIN_LISTEN", "localhost:"),
        ("FASTGATE_WORKERS", "0"),
        ("FASTGATE_WORKERS", "many"),
        ("FASTGATE_LOG_LEVEL", "verbose"),
        ("FASTGATE_NO_EXTENSIONS", "maybe"),
        ("FASTGATE_GRACEFUL_TIMEOUT", "-1"),
        ("FASTGATE_GRACEFUL_TIMEOUT", "soon"),
    ],
)
def test_bad_value_names_the_variable_and_the_form(variable, value):
    with pytest.raises(SettingsError) as info:
        load_settings({variable: value})
    (line,) = info.value.problems
    assert line.startswith(f"{variable}: expected ")
    assert line.endswith(f"got {value!r}")


def test_every_bad_variable_is_reported():
    with pytest.raises(SettingsError) as info:
        load_settings({"FASTGATE_WORKERS": "x", "FASTGATE_LOG_LEVEL": "loud"})
    assert [p.split(":")[0] for p in info.value.problems] == ["FASTGATE_WORKERS", "FASTGATE_LOG_LEVEL"]


def test_ssl_listener_needs_certificate_and_key():
    with pytest.raises(SettingsError, match="FASTGATE_SSL_CERT"):
        load_settings({"FASTGATE_PROXY_LISTEN": "127.0.0.1:8443 ssl"})
