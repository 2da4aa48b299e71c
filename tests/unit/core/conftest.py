"""Every test of a fastgate._core module runs against the compiled module and its pure twin."""

from __future__ import annotations

import importlib
import importlib.machinery
from collections.abc import Callable
from types import ModuleType

import pytest


def load_core_module(name: str, implementation: str) -> ModuleType:
    """`fastgate._core.<name>` (which must be the compiled extension, never a silent fallback to
    the .py source) or `fastgate._core._pure.<name>`."""
    if implementation == "compiled":
        module = importlib.import_module(f"fastgate._core.{name}")
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__
        return module
    return importlib.import_module(f"fastgate._core._pure.{name}")


@pytest.fixture(params=["compiled", "pure"])
def core_module(request: pytest.FixtureRequest) -> Callable[[str], ModuleType]:
    return lambda name: load_core_module(name, request.param)
