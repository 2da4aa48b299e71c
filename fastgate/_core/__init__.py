"""The compiled hot path, or its pure-Python references.

Each compiled module `fastgate._core.<name>` has a twin `fastgate._core._pure.<name>` with the
same interface. The compiled modules are used unless FASTGATE_NO_EXTENSIONS=1 forces the
references or the extensions were not built; `IMPLEMENTATION` says which one is live and
`EXTENSION_ERROR` why the compiled one is missing. The test suite fails when the compiled
modules did not load (tests/test_core_loaded.py) unless the references were forced.
"""

from __future__ import annotations

import importlib

from fastgate.settings import extensions_disabled

MODULES = ("router", "proxy", "keys", "plugins", "limiter")

EXTENSION_ERROR: str | None = None
if extensions_disabled():
    EXTENSION_ERROR = "FASTGATE_NO_EXTENSIONS is set"
else:
    try:
        _modules = [importlib.import_module(f"fastgate._core.{name}") for name in MODULES]
        for _module in _modules:
            if _module.__file__.endswith(".py"):
                raise ImportError(f"{_module.__name__} is not compiled ({_module.__file__})")
    except ImportError as exc:
        EXTENSION_ERROR = f"compiled modules did not load: {exc}"

IMPLEMENTATION = "pure" if EXTENSION_ERROR is not None else "compiled"
# Only names are bound here, never an attribute named like a submodule: importing the compiled
# `fastgate._core.router` directly (as the tests do) would silently rebind it.
_package = "fastgate._core._pure" if EXTENSION_ERROR is not None else "fastgate._core"
_router = importlib.import_module(f"{_package}.router")
_proxy = importlib.import_module(f"{_package}.proxy")
_keys = importlib.import_module(f"{_package}.keys")
_limiter = importlib.import_module(f"{_package}.limiter")
# The plugin runtime and the built-in plugins' handlers, as a module (fastgate/plugins/*.py
# subclass its classes); named plugin_core, not plugins, for the reason above.
plugin_core = importlib.import_module(f"{_package}.plugins")

Router = _router.Router
Match = _router.Match
normalize_path = _router.normalize_path
Gateway = _proxy.Gateway
PluginRun = _proxy.PluginRun
Slot = _proxy.Slot
ErrorTemplate = _proxy.ErrorTemplate
KeyIndex = _keys.KeyIndex
SharedCounters = _limiter.SharedCounters
initialise_counters = _limiter.initialise

__all__ = [
    "EXTENSION_ERROR", "IMPLEMENTATION", "ErrorTemplate", "Gateway", "KeyIndex", "Match", "PluginRun", "Router", "SharedCounters", "Slot", "initialise_counters",
    "normalize_path", "plugin_core",
]
