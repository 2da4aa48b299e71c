"""One rate-limit check (count + decide) in the node's shared counters, compiled vs pure.

    taskset -c 0 .venv/bin/python -m pytest bench/test_bench_limiter.py --benchmark-only

The issue's target: under 1 us median compiled, for the sliding window of
rate-limiting-advanced, among 10,000 live keys (one key per consumer).
"""

from __future__ import annotations

import itertools
import os

import pytest

from tests.unit.core.conftest import load_core_module

KEYS = 10_000
SLOTS = 32_768


@pytest.mark.parametrize("implementation", ["compiled", "pure"])
@pytest.mark.parametrize("kind", ["sliding-1-window", "fixed-2-windows"])
def test_check(benchmark, implementation, kind):
    benchmark.group = f"limiter-{kind}"
    limiter = load_core_module("limiter", implementation)
    fd = os.memfd_create("fastgate-bench-counters")
    limiter.initialise(fd, SLOTS)
    counters = limiter.SharedCounters(fd, SLOTS)
    keys = itertools.cycle([(b"ns|consumer-%d|60" % i, b"ns|consumer-%d|3600" % i) for i in range(KEYS)])
    if kind == "sliding-1-window":
        def check():
            counters.take_sliding(next(keys)[:1], (60_000,), (60_000,), (1e12,), (0.5,), True)
    else:
        def check():
            counters.take_fixed(next(keys), (60_000, 0), (60_000, 3_600_000), (1e12, 1e12))
    try:
        benchmark(check)
    finally:
        counters.close()
        os.close(fd)
