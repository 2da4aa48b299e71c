"""The gateway must run the compiled hot path: fail when the extensions did not load."""

import importlib.machinery
import subprocess
import sys

import fastgate._core as core
from fastgate.settings import extensions_disabled

COMPILED_MODULES = ["router", "proxy", "keys", "plugins", "limiter"]


def test_compiled_modules_loaded():
    if extensions_disabled():
        assert core.IMPLEMENTATION == "pure"
        return
    assert core.EXTENSION_ERROR is None, core.EXTENSION_ERROR
    assert core.IMPLEMENTATION == "compiled"
    for name in COMPILED_MODULES:
        module = __import__(f"fastgate._core.{name}", fromlist=["_"])
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


def test_no_extensions_forces_the_references():
    code = (
        "import fastgate._core as c; "
        "print(c.IMPLEMENTATION, c.Router.__module__, c.Gateway.__module__, c.KeyIndex.__module__, "
        "c.plugin_core.__name__)"
    )
    env = {"FASTGATE_NO_EXTENSIONS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "pure", "fastgate._core._pure.router", "fastgate._core._pure.proxy", "fastgate._core._pure.keys",
        "fastgate._core._pure.plugins",
    ]
