"""API-key index micro-benchmarks: compiled vs pure `KeyIndex.lookup` among 1,000,000 keys.

    taskset -c 0 .venv/bin/python -m pytest bench/test_bench_keys.py --benchmark-only \
        --benchmark-columns=median,mean,rounds

Keys look like `sk_live_` + 24 hex digits; half are written plainly and half as `sha256:`
digests, as a config file would hold them. Each index is built once (a module fixture, about
0.2 s compiled and 1.4 s pure) and its build time is kept in the benchmark's extra_info. The
`present` group looks up the key in the middle of the config, `absent` a key of the same shape
that is not there. The same key is asked every round, so the index stays in the CPU caches;
these are the costs of hashing and the call, not of a cache miss into 40 MB of digests.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from typing import Any

import pytest

N = 1_000_000
IMPLS = {"compiled": "fastgate._core.keys", "pure": "fastgate._core._pure.keys"}


def _key(i: int) -> str:
    return f"sk_live_{(i * 0x9E3779B97F4A7C15) % 2**96:024x}"


@pytest.fixture(scope="module")
def entries() -> list[tuple[str, int]]:
    return [
        (_key(i) if i % 2 else "sha256:" + hashlib.sha256(_key(i).encode()).hexdigest(), i)
        for i in range(N)
    ]


@pytest.fixture(scope="module", params=list(IMPLS))
def built(request: pytest.FixtureRequest, entries: list[tuple[str, int]]) -> tuple[str, Any, float]:
    module = importlib.import_module(IMPLS[request.param])
    start = time.perf_counter()
    index = module.KeyIndex(entries)
    return request.param, index, time.perf_counter() - start


@pytest.mark.parametrize(("case", "key", "expected"), [
    ("present", _key(N // 2).encode(), N // 2),
    ("absent", _key(N + 1).encode(), None),
])
def test_lookup(benchmark, built, case, key, expected):
    impl, index, build_seconds = built
    benchmark.group = f"{case} key among {N:,}"
    benchmark.extra_info.update(impl=impl, keys=len(index), build_seconds=round(build_seconds, 3),
                                sha256=importlib.import_module(IMPLS[impl]).SHA256_SOURCE)
    # A first call off the clock: a cold first call that takes over 5 µs makes pytest-benchmark
    # calibrate to one call per round, which then times mostly its own timer (~180 vs ~100 ns).
    assert index.lookup(key) == expected
    assert benchmark(index.lookup, key) == expected
