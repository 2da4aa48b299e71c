"""Router micro-benchmarks: compiled vs pure `Router.match`, grouped per mix and table size.

    taskset -c 0 .venv/bin/python -m pytest bench/test_bench_router.py --benchmark-only \
        --benchmark-columns=median,mean,rounds

Mixes of 10, 1,000 and 10,000 routes: `prefix` (paths such as /svc{i}/v1, four shapes of
different lengths), `regex` (~/api/v{i}/items/(?<id>\\d+)$) and `host` (one plain host per
route, path /). Every request hits the route in the middle of its table. The `regex` groups
also time a plain Python loop calling `.match` on the same compiled patterns in route order
until one hits, the floor a regex router has to beat.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import uuid
from typing import Any

import pytest

SIZES = [10, 1_000, 10_000]
MIXES = ["prefix", "regex", "host"]
IMPLS = {"compiled": "fastgate._core.router", "pure": "fastgate._core._pure.router"}


@dataclasses.dataclass
class Route:
    id: str
    paths: list[str] | None = None
    hosts: list[str] | None = None
    name: str | None = None
    methods: list[str] | None = None
    headers: dict[str, list[str]] | None = None
    strip_path: bool = True
    preserve_host: bool = False
    regex_priority: int = 0
    protocols: list[str] = dataclasses.field(default_factory=lambda: ["http", "https"])
    https_redirect_status_code: int = 426


@dataclasses.dataclass
class Service:
    id: str = "6f1c2a52-5a8e-4a55-8b1e-3d2f0c1b9a77"
    name: str = "upstream"
    protocol: str = "http"
    host: str = "upstream.internal"
    port: int = 8080
    path: str | None = "/base"


def _prefix_path(i: int) -> str:
    return (f"/svc{i}", f"/svc{i}/v1", f"/api/svc{i}/v2/items", f"/s{i}/x")[i % 4]


def _routes(mix: str, size: int) -> list[Route]:
    ids = [str(uuid.UUID(int=i * 7919 + 1, version=4)) for i in range(size)]
    if mix == "prefix":
        return [Route(ids[i], paths=[_prefix_path(i)]) for i in range(size)]
    if mix == "regex":
        return [Route(ids[i], paths=[rf"~/api/v{i}/items/(?<id>\d+)$"]) for i in range(size)]
    return [Route(ids[i], hosts=[f"svc{i}.example.com"], paths=["/"]) for i in range(size)]


def _request(mix: str, size: int) -> tuple[bytes, bytes, bytes]:
    mid = size // 2
    if mix == "prefix":
        return b"GET", b"gateway.example.com", f"{_prefix_path(mid)}/users/42?page=2".encode()
    if mix == "regex":
        return b"GET", b"gateway.example.com", f"/api/v{mid}/items/12345?page=2".encode()
    return b"GET", f"svc{mid}.example.com".encode(), b"/orders/7?page=2"


@functools.cache
def _case(impl: str, mix: str, size: int) -> tuple[Any, tuple[bytes, bytes, bytes], Route]:
    routes = _routes(mix, size)
    router = importlib.import_module(IMPLS[impl]).Router([(r, Service()) for r in routes])
    return router, _request(mix, size), routes[size // 2]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_match(benchmark, impl, mix, size):
    router, request, expected = _case(impl, mix, size)
    benchmark.group = f"{mix}-{size}"
    benchmark.extra_info.update(impl=impl, mix=mix, size=size)
    m = benchmark(router.match, *request)
    assert m.route is expected


@pytest.mark.parametrize("size", SIZES)
def test_regex_baseline_re_loop(benchmark, size):
    compile_path_regex = importlib.import_module(IMPLS["pure"]).compile_path_regex
    patterns = [compile_path_regex(r.paths[0]) for r in _routes("regex", size)]
    path = _request("regex", size)[2].partition(b"?")[0]

    def first_match(path: bytes) -> Any:
        for pattern in patterns:
            m = pattern.match(path)
            if m is not None:
                return m
        return None

    benchmark.group = f"regex-{size}"
    benchmark.extra_info.update(impl="re-loop", mix="regex", size=size)
    assert benchmark(first_match, path) is not None
