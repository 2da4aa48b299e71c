"""Build the Cython hot path in fastgate/_core.

FASTGATE_NO_EXTENSIONS=1 at install time skips the extensions (pure-Python build); the
runtime switch of the same name forces the pure references even when the extensions exist.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
CORE = HERE / "fastgate" / "_core"


def _extensions():
    if os.environ.get("FASTGATE_NO_EXTENSIONS", "").strip().lower() in {"1", "true", "yes", "on"}:
        print("*** fastgate: pure-Python build (FASTGATE_NO_EXTENSIONS is set) ***")
        return []
    from Cython.Build import cythonize

    # A .pyx is compiled as it is; a .py beside a .pxd of the same name is a pure-Python twin
    # (in _pure/, linked here) that Cython compiles with the .pxd's declarations.
    sources = sorted(CORE.glob("*.pyx")) + sorted(
        py for py in CORE.glob("*.py") if py.with_suffix(".pxd").exists()
    )
    modules = [
        Extension(f"fastgate._core.{source.stem}", [str(source.relative_to(HERE))], extra_compile_args=["-O2"])
        for source in sources
    ]
    return cythonize(
        modules,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )


setup(ext_modules=_extensions())
