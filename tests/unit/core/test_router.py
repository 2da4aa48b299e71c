"""Router behaviour (Kong 3.x traditional_compatible), run against both implementations.

Every test takes the `impl` fixture: `compiled` is fastgate._core.router (an import failure is an
error, never a skip) and `pure` is the reference fastgate._core._pure.router. Kong sources named
below: spec/fixtures/router_path_handling_tests.lua and spec/01-unit/08-router_spec.lua.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from typing import Any

import pytest

from fastgate._core._pure import router as pure_router
from tests.unit.core.conftest import load_core_module

IDS = "e8fb37f1-102d-461e-9c51-6608a6bb81{:02d}"


@pytest.fixture
def impl(core_module) -> Any:
    return core_module("router")


@dataclasses.dataclass
class Route:
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    name: str | None = None
    paths: list[str] | None = None
    methods: list[str] | None = None
    hosts: list[str] | None = None
    headers: dict[str, list[str]] | None = None
    strip_path: bool = True
    preserve_host: bool = False
    regex_priority: int = 0
    protocols: list[str] = dataclasses.field(default_factory=lambda: ["http", "https"])
    https_redirect_status_code: int = 426


@dataclasses.dataclass
class Service:
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    name: str | None = "svc"
    protocol: str = "http"
    host: str = "upstream.test"
    port: int | None = 80
    path: str | None = None


SERVICE = Service()


def route(n: int, **fields: Any) -> Route:
    return Route(id=IDS.format(n), **fields)


def make_router(impl: Any, *routes: Route, service: Service | None = SERVICE) -> Any:
    return impl.Router([(r, service) for r in routes])


def matched_id(router: Any, target: str | bytes, host: bytes = b"domain.org", **kw: Any) -> Any:
    if isinstance(target, str):
        target = target.encode()
    m = router.match(kw.pop("method", b"GET"), host, target, **kw)
    return None if m is None else m.route.id


# ------------------------------------------------------------------------------------------
# Path handling truth table: spec/fixtures/router_path_handling_tests.lua as of Kong 3.x, where
# v0 is the only path_handling left. (The 2.x file also labelled v0 three rows of /service/ with
# strip on a request ending in "/" as "/service"; get_upstream_uri_v0 gives "/service/", and so
# does the current file.)

FT = (False, True)
PATH_HANDLING = [
    # service_path, route_path, strip_path, request_path, expected_path
    ("/", "/", FT, "/", "/"),
    ("/", "/", FT, "/route", "/route"),
    ("/", "/", FT, "/route/", "/route/"),
    ("/", "/", FT, "/routereq", "/routereq"),
    ("/", "/", FT, "/route/req", "/route/req"),
    ("/", "/route", (False,), "/route", "/route"),
    ("/", "/route", (False,), "/route/", "/route/"),
    ("/", "/route", (False,), "/routereq", "/routereq"),
    ("/", "/route", (True,), "/route", "/"),
    ("/", "/route", (True,), "/route/", "/"),
    ("/", "/route", (True,), "/routereq", "/req"),
    ("/", "/route/", (False,), "/route/", "/route/"),
    ("/", "/route/", (False,), "/route/req", "/route/req"),
    ("/", "/route/", (True,), "/route/", "/"),
    ("/", "/route/", (True,), "/route/req", "/req"),
    ("/srv", "/rou", (False,), "/roureq", "/srv/roureq"),
    ("/srv", "/rou", (True,), "/roureq", "/srv/req"),
    ("/srv/", "/rou", (False,), "/rou", "/srv/rou"),
    ("/srv/", "/rou", (True,), "/rou", "/srv"),
    ("/service", "/", FT, "/", "/service"),
    ("/service", "/", FT, "/route", "/service/route"),
    ("/service", "/", FT, "/route/", "/service/route/"),
    ("/service", "/", FT, "/routereq", "/service/routereq"),
    ("/service", "/", FT, "/route/req", "/service/route/req"),
    ("/service", "/route", (False,), "/route", "/service/route"),
    ("/service", "/route", (False,), "/route/", "/service/route/"),
    ("/service", "/route", (False,), "/routereq", "/service/routereq"),
    ("/service", "/route", (True,), "/route", "/service"),
    ("/service", "/route", (True,), "/route/", "/service/"),
    ("/service", "/route", (True,), "/routereq", "/service/req"),
    ("/service", "/route/", (False,), "/route/", "/service/route/"),
    ("/service", "/route/", (False,), "/route/req", "/service/route/req"),
    ("/service", "/route/", (True,), "/route/", "/service/"),
    ("/service", "/route/", (True,), "/route/req", "/service/req"),
    ("/service/", "/", FT, "/route/", "/service/route/"),
    ("/service/", "/", FT, "/", "/service/"),
    ("/service/", "/", FT, "/route", "/service/route"),
    ("/service/", "/", FT, "/routereq", "/service/routereq"),
    ("/service/", "/", FT, "/route/req", "/service/route/req"),
    ("/service/", "/route", (False,), "/route", "/service/route"),
    ("/service/", "/route", (False,), "/route/", "/service/route/"),
    ("/service/", "/route", (False,), "/routereq", "/service/routereq"),
    ("/service/", "/route", (True,), "/route", "/service"),
    ("/service/", "/route", (True,), "/route/", "/service/"),
    ("/service/", "/route", (True,), "/routereq", "/service/req"),
    ("/service/", "/route/", (False,), "/route/", "/service/route/"),
    ("/service/", "/route/", (False,), "/route/req", "/service/route/req"),
    ("/service/", "/route/", (True,), "/route/", "/service/"),
    ("/service/", "/route/", (True,), "/route/req", "/service/req"),
    # Routes that match on the host only.
    ("/", None, FT, "/", "/"),
    ("/", None, FT, "/route", "/route"),
    ("/", None, FT, "/route/", "/route/"),
    ("/service", None, FT, "/", "/service"),
    ("/service", None, FT, "/route", "/service/route"),
    ("/service", None, FT, "/route/", "/service/route/"),
    ("/service/", None, FT, "/", "/service/"),
    ("/service/", None, FT, "/route", "/service/route"),
    ("/service/", None, FT, "/route/", "/service/route/"),
]
PATH_CASES = [
    pytest.param(service_path, route_path, strip, request, expected, id=f"{i}-{strip}")
    for i, (service_path, route_path, strips, request, expected) in enumerate(PATH_HANDLING, 1)
    for strip in strips
]


PATH_ARGS = ("service_path", "route_path", "strip", "request_path", "expected")


@pytest.mark.parametrize(PATH_ARGS, PATH_CASES)
def test_path_handling(impl, service_path, route_path, strip, request_path, expected):
    r = Route(paths=[route_path] if route_path else None, hosts=["localbin.com"], strip_path=strip)
    router = make_router(impl, r, service=Service(path=service_path))
    m = router.match(b"GET", b"localbin.com", request_path.encode())
    assert m.route is r
    assert m.upstream_path == expected.encode()


@pytest.mark.parametrize(PATH_ARGS, [case for case in PATH_CASES if case.values[1] is not None])
def test_path_handling_regex(impl, service_path, route_path, strip, request_path, expected):
    # Kong runs the same table with the path turned into a regex that matches the same prefix.
    r = Route(paths=["~/[0]?" + route_path[1:]], strip_path=strip)
    router = make_router(impl, r, service=Service(path=service_path))
    m = router.match(b"GET", b"localbin.com", request_path.encode())
    assert m.route is r
    assert m.upstream_path == expected.encode()


# ------------------------------------------------------------------------------------------
# Normalisation


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/h%65llo", b"/hello"),
        (b"/a/../b", b"/b"),
        (b"//a//b", b"/a/b"),
        (b"/a%2Fb", b"/a%2Fb"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/%2e%2e/x", b"/x"),
        (b"/a/%2E%2e/x", b"/x"),
        (b"/a%20b", b"/a b"),
        (b"/a/./b/.", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/../../..", b"/"),
        (b"/..", b"/"),
        (b"/.", b"/"),
        (b".", b""),
        (b"../a", b"a"),
        (b"/a..b/.c", b"/a..b/.c"),
        (b"/%zz%4", b"/%zz%4"),
        (b"/%", b"/%"),
        (b"/%%41", b"/%A"),
        (b"/%252e", b"/%252e"),
        (b"/%3f%23%5b", b"/%3F%23%5B"),
        (b"/%41%7e%2d", b"/A~-"),
        (b"/a%2F..%2Fb", b"/a%2F..%2Fb"),
    ],
)
def test_normalize_path(impl, raw, normal):
    assert impl.normalize_path(raw) == normal


@pytest.mark.parametrize("path", [b"/", b"", b"/hello/world", b"/a.b/c.d", b"/a-b_c~d"])
def test_normalize_fast_path_returns_input(impl, path):
    assert impl.normalize_path(path) is path


def test_normalize_matches_reference_on_random_paths(impl):
    rng = random.Random(7)
    alphabet = [b"/", b".", b"a", b"%", b"2", b"e", b"E", b"f", b"F", b"4", b"1", b"z", b"?"]
    for _ in range(3000):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        assert impl.normalize_path(raw) == pure_router.normalize_path(raw), raw


def test_matching_uses_the_normalised_path_and_keeps_the_query(impl):
    r = route(1, paths=["/hello"], strip_path=False)
    router = make_router(impl, r)
    m = router.match(b"GET", b"h", b"/x/../h%65llo/a%20b?q=%20&r=/../")
    assert m.route is r
    assert m.upstream_path == b"/hello/a%20b?q=%20&r=/../"
    assert router.match(b"GET", b"h", b"/foo/../hello").route is r


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        (b"/a%20b", b"/a%20b"),
        (b"/caf%C3%A9", b"/caf%C3%A9"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/a%22b%3C%7B", b"/a%22b%3C%7B"),
        (b"/foo?", b"/foo?"),
        (b"/foo?a=1?b", b"/foo?a=1?b"),
        (b"/keep/!$&'()*+,;=:@[]~", b"/keep/!$&'()*+,;=:@[]~"),
    ],
)
def test_upstream_path_is_re_escaped(impl, target, upstream):
    router = make_router(impl, route(1, paths=["/"]))
    assert router.match(b"GET", b"h", target).upstream_path == upstream


def test_upstream_path_unchanged_is_the_request_path(impl):
    router = make_router(impl, route(1, paths=["/"], strip_path=False))
    assert router.match(b"GET", b"h", b"/a/b").upstream_path == b"/a/b"


# ------------------------------------------------------------------------------------------
# Priority (behavior.md 2.2, router_spec "edge-cases")


def test_host_and_uri_beat_method(impl):
    routes = [
        route(1, hosts=["domain-1.org", "domain-2.org"]),
        route(2, methods=["TRACE"]),
        route(3, paths=["/my-route"]),
        route(4, paths=["/route-4"], hosts=["domain-1.org", "domain-2.org"]),
        route(5, hosts=["domain-1.org", "domain-2.org"], methods=["POST", "PUT", "PATCH"]),
        route(6, methods=["POST", "PUT", "PATCH"], paths=["/route-6"]),
        route(7, hosts=["domain-with-uri-1.org"], methods=["POST"], paths=["/my-route-uri"]),
    ]
    router = make_router(impl, *routes)
    assert matched_id(router, "/", b"domain-2.org", method=b"TRACE") == IDS.format(1)
    assert matched_id(router, "/my-route", method=b"TRACE") == IDS.format(3)
    assert matched_id(router, "/route-4", b"domain-1.org", method=b"TRACE") == IDS.format(4)
    assert matched_id(router, "/", b"domain-1.org", method=b"POST") == IDS.format(5)
    assert matched_id(router, "/route-6", method=b"PUT") == IDS.format(6)
    uri_host = b"domain-with-uri-1.org"
    assert matched_id(router, "/my-route-uri", uri_host, method=b"POST") == IDS.format(7)
    assert matched_id(router, "/", b"nothing.org") is None


def test_more_headers_beat_longer_paths(impl):
    router = make_router(
        impl,
        route(1, headers={"version": ["v1"]}, paths=["/my-route/hello"]),
        route(2, headers={"version": ["v1"], "location": ["us-east"]}, paths=["/my-route"]),
    )
    headers = {b"version": [b"v1"], b"location": [b"us-east"]}
    assert matched_id(router, "/my-route/hello", headers=headers) == IDS.format(2)
    assert matched_id(router, "/my-route/hello", headers={b"version": [b"v1"]}) == IDS.format(1)


def test_evaluates_routes_with_more_headers_first(impl):
    two = {"version": ["v1", "v2"], "user_agent": ["foo", "bar"]}
    router = make_router(
        impl, route(1, headers=two), route(2, headers={**two, "location": ["east", "west"]})
    )
    headers = {b"version": [b"v1"], b"user-agent": [b"foo"], b"location": [b"north", b"west"]}
    assert matched_id(router, "/", headers=headers) == IDS.format(2)


def test_plain_host_beats_wildcard_host(impl):
    router = make_router(
        impl,
        route(1, hosts=["*.route.com"]),
        route(2, hosts=["route.*"]),
        route(3, hosts=["plain.route.com"]),
        route(4, hosts=["route.com"]),
    )
    assert matched_id(router, "/", b"route.com") == IDS.format(4)
    assert matched_id(router, "/", b"route.org") == IDS.format(2)
    assert matched_id(router, "/", b"plain.route.com") == IDS.format(3)
    assert matched_id(router, "/", b"foo.route.com") == IDS.format(1)


def test_wildcard_host_with_path_is_not_shadowed_by_plain_host(impl):
    router = make_router(
        impl,
        route(1, hosts=["*.route.com"], paths=["/path1"]),
        route(2, hosts=["plain.route.com"], paths=["/path2"]),
    )
    assert matched_id(router, "/path1", b"plain.route.com") == IDS.format(1)
    assert matched_id(router, "/path2", b"plain.route.com") == IDS.format(2)


def test_regex_beats_prefix_at_equal_weight(impl):
    router = make_router(
        impl,
        route(1, paths=["/route/persons"]),
        route(2, paths=[r"~/route/persons/\d+/profile"]),
        route(3, paths=["/route/fixture"]),
        route(4, paths=["~/route/(fixture)"]),
    )
    assert matched_id(router, "/route/persons/123/profile") == IDS.format(2)
    assert matched_id(router, "/route/persons/abc") == IDS.format(1)
    assert matched_id(router, "/route/fixture") == IDS.format(4)


def test_regex_with_host_beats_prefix_with_host(impl):
    router = make_router(
        impl,
        route(1, hosts=["route.com"], paths=["/pat"]),
        route(2, hosts=["route.com"], paths=["/path"], methods=["POST"]),
        route(3, hosts=["route.com"], paths=["~/(path)"]),
    )
    assert matched_id(router, "/path", b"route.com") == IDS.format(3)
    assert matched_id(router, "/path", b"route.com", method=b"POST") == IDS.format(2)


def test_regex_priority_orders_regexes(impl):
    router = make_router(
        impl,
        route(9, paths=[r"~/api/\w+"], regex_priority=0),
        route(1, paths=[r"~/api/(?<name>\w+)"], regex_priority=5),
        route(2, paths=[r"~/api/.*"], regex_priority=-1),
    )
    m = router.match(b"GET", b"h", b"/api/users")
    assert m.route.id == IDS.format(1)
    assert m.captures == {0: "/api/users", 1: "users", "name": "users"}


def test_regex_priority_is_ignored_for_prefix_paths(impl):
    router = make_router(
        impl,
        route(1, paths=["/a"], regex_priority=100),
        route(2, paths=["/a/b"]),
        route(3, paths=["/c"], regex_priority=100),
        route(4, paths=["/c"]),
    )
    assert matched_id(router, "/a/b/c") == IDS.format(2)
    assert matched_id(router, "/c") == IDS.format(4)


def test_longest_prefix_wins(impl):
    router = make_router(impl, route(1, paths=["/my-route/hello"]), route(2, paths=["/my-route"]))
    assert matched_id(router, "/my-route/hello") == IDS.format(1)
    assert matched_id(router, "/my-route/hello/world") == IDS.format(1)
    assert matched_id(router, "/my-route") == IDS.format(2)
    assert matched_id(router, "/my-route/world") == IDS.format(2)


def test_prefix_is_not_segment_aware(impl):
    router = make_router(impl, route(1, paths=["/foo"]))
    assert matched_id(router, "/foobar") == IDS.format(1)
    assert matched_id(router, "/fo") is None
    assert matched_id(router, "/x/foo") is None


def test_many_matching_prefix_lengths(impl):
    # More matching prefix lengths than the compiled scan takes in one batch (32).
    routes = [
        route(k, paths=["/" + "a" * k], methods=["GET" if k == 3 else "POST"]) for k in range(1, 45)
    ]
    router = make_router(impl, *routes)
    assert matched_id(router, "/" + "a" * 60, method=b"GET") == IDS.format(3)
    assert matched_id(router, "/" + "a" * 60, method=b"POST") == IDS.format(44)
    assert matched_id(router, "/aaaaa", method=b"POST") == IDS.format(5)
    assert matched_id(router, "/aa", method=b"GET") is None


def test_root_path_is_a_catch_all(impl):
    router = make_router(impl, route(15, paths=["/"]), route(3, paths=["/my-route"]))
    assert matched_id(router, "/") == IDS.format(15)
    assert matched_id(router, "/foobar/baz") == IDS.format(15)
    assert matched_id(router, "/my-route/hello") == IDS.format(3)


def test_half_host_and_uri_match_does_not_supersede(impl):
    router = make_router(
        impl,
        route(1, hosts=["host1.com"], paths=["/v1/path"]),
        route(2, hosts=["host2.com"], paths=["/"]),
    )
    assert matched_id(router, "/v1/path", b"host1.com") == IDS.format(1)
    assert matched_id(router, "/v1/path", b"host2.com") == IDS.format(2)


def test_method_does_not_supersede_uri_or_wildcard_host(impl):
    router = make_router(
        impl,
        route(1, methods=["GET"]),
        route(2, paths=["/example"]),
        route(3, hosts=["domain.*"]),
    )
    assert matched_id(router, "/example/status/200") == IDS.format(2)
    assert matched_id(router, "/", b"nothing.com") == IDS.format(1)
    # Same weight (1): the larger UUID wins.
    assert matched_id(router, "/", b"domain.com") == IDS.format(3)


def test_empty_match_fields_count_as_unset(impl):
    # The config loader gives unset match fields as [] / {}: an empty hosts list must not earn
    # the plain-host rank, or method-only route 1 would beat wildcard route 2 despite its UUID.
    router = make_router(
        impl,
        route(1, methods=["GET"], hosts=[], paths=[], headers={}),
        route(2, hosts=["domain.*"], methods=[], paths=[], headers={}),
    )
    assert matched_id(router, "/", b"domain.com") == IDS.format(2)
    assert matched_id(router, "/", b"other.com") == IDS.format(1)


def test_larger_uuid_breaks_ties(impl):
    low = Route(id="00000000-0000-4000-8000-000000000001", paths=["/same"])
    high = Route(id="F0000000-0000-4000-8000-000000000000", paths=["/same"])
    mid = Route(id="a0000000-0000-4000-8000-000000000000", paths=["/same"])
    for order in ([low, high, mid], [mid, high, low]):
        router = make_router(impl, *order)
        assert router.match(b"GET", b"h", b"/same").route is high


def test_multi_path_route_is_split_by_prefix_length(impl):
    # With one priority per route (max length 8) route 1 would win; split, "/a" ranks below "/a/bb".
    router = make_router(impl, route(1, paths=["/a", "/bbbbbbb"]), route(2, paths=["/a/bb"]))
    assert matched_id(router, "/a/bb/foobar") == IDS.format(2)
    assert matched_id(router, "/bbbbbbb/x") == IDS.format(1)
    assert matched_id(router, "/a/x") == IDS.format(1)


def test_split_regex_and_prefix_paths_rank_separately(impl):
    router = make_router(
        impl,
        route(1, paths=["/users", r"~/items/\d+$"]),
        route(2, paths=["/users/admin"]),
        route(3, paths=["/items/"]),
    )
    assert matched_id(router, "/users/admin/x") == IDS.format(2)
    assert matched_id(router, "/users/x") == IDS.format(1)
    assert matched_id(router, "/items/12") == IDS.format(1)
    assert matched_id(router, "/items/ab") == IDS.format(3)


def test_split_sub_routes_get_derived_uuids():
    r = Route(id=IDS.format(1), paths=["/a", "~/b", "/cc", "/dd", "~/e"])
    subs = pure_router.compile_routes([(r, SERVICE)])
    ns = uuid.UUID("7f145bf9-0dce-4f91-98eb-debbce4b9f6b")
    expected = {uuid.uuid5(ns, f"{r.id}#{i}").bytes for i in (1, 2, 3)}
    assert {sub.key[-1] for sub in subs} == expected
    assert sorted(len(sub.prefixes or sub.regexes) for sub in subs) == [1, 2, 2]
    same_kind = Route(id=IDS.format(2), paths=["/aa", "/bb"])
    (sub,) = pure_router.compile_routes([(same_kind, SERVICE)])
    assert sub.key[-1] == uuid.UUID(same_kind.id).bytes


# ------------------------------------------------------------------------------------------
# Predicates


def test_methods_are_exact(impl):
    router = make_router(impl, route(1, methods=["GET", "POST"], paths=["/m"]))
    assert matched_id(router, "/m", method=b"POST") == IDS.format(1)
    assert matched_id(router, "/m", method=b"get") is None
    assert matched_id(router, "/m", method=b"PUT") is None


def test_wildcard_hosts(impl):
    router = make_router(impl, route(1, hosts=["*.route.com"]), route(2, hosts=["route.*"]))
    assert matched_id(router, "/", b"foo.route.com") == IDS.format(1)
    assert matched_id(router, "/", b"x.y.route.com") == IDS.format(1)
    assert matched_id(router, "/", b"foo.route.com:123") == IDS.format(1)
    assert matched_id(router, "/", b"route.com") == IDS.format(2)
    assert matched_id(router, "/", b"route.org:8000") == IDS.format(2)
    assert matched_id(router, "/", b"xroute.com") is None
    assert matched_id(router, "/", b"routes.org") is None


def test_hosts_are_not_case_folded(impl):
    router = make_router(impl, route(1, hosts=["domain.org"]))
    assert matched_id(router, "/", b"domain.org") == IDS.format(1)
    assert matched_id(router, "/", b"Domain.org") is None


def test_host_port_matches_the_listening_port(impl):
    router = make_router(
        impl,
        route(13, hosts=["domain-1.org:321", "domain-2.org"]),
        route(14, hosts=["domain-3.org:321"]),
        route(1, hosts=["domain-1.org"]),
        route(4, hosts=["*.route.net:123"]),
    )
    assert matched_id(router, "/", b"domain-1.org", port=321) == IDS.format(13)
    assert matched_id(router, "/", b"domain-1.org:80", port=80) == IDS.format(1)
    assert matched_id(router, "/", b"domain-3.org:321", port=321) == IDS.format(14)
    assert matched_id(router, "/", b"domain-3.org:321", port=123) is None
    assert matched_id(router, "/", b"foo.route.net", port=123) == IDS.format(4)
    assert matched_id(router, "/", b"foo.route.net", port=456) is None


def test_ipv6_and_empty_hosts(impl):
    router = make_router(impl, route(1, hosts=["[::1]"]), route(2, paths=["/"]))
    assert matched_id(router, "/", b"[::1]:8000") == IDS.format(1)
    assert matched_id(router, "/", b"[::1]") == IDS.format(1)
    assert matched_id(router, "/", b"") == IDS.format(2)
    assert matched_id(router, "/", b"[::2]:8000") == IDS.format(2)


@pytest.mark.parametrize(
    ("route_host", "request_host", "hit"),
    [
        ("a.com", b"a.com:8000", True),
        ("a.com", b"a.com:", False),
        ("a.com:", b"a.com:", True),
        ("a.com", b"a.com:80x", False),
        ("[::1]", b"[::1]:80", True),
        ("[::1]", b"[::1]:", False),
        ("[::1]", b"[::1]x", False),
    ],
)
def test_host_port_split(impl, route_host, request_host, hit):
    router = make_router(impl, route(1, hosts=[route_host]))
    assert (matched_id(router, "/", request_host) is not None) is hit


def test_header_names_and_values_are_case_insensitive(impl):
    router = make_router(
        impl,
        route(1, headers={"USER_AGENT": ["foo", "bar"]}),
        route(2, headers={"user-agent": ["BAZ"]}),
    )
    assert router.header_names == frozenset({b"user-agent"})
    assert matched_id(router, "/", headers={b"user-agent": [b"FOO"]}) == IDS.format(1)
    assert matched_id(router, "/", headers={b"user-agent": [b"baz"]}) == IDS.format(2)
    assert matched_id(router, "/", headers={b"user-agent": [b"qux"]}) is None
    assert matched_id(router, "/") is None


def test_header_multiple_values(impl):
    router = make_router(
        impl,
        route(9, headers={"location": ["my-location-1", "my-location-2"]}),
        route(10, headers={"location": ["my-location-1"], "version": ["v1", "v2"]}),
    )
    both = {b"location": [b"my-location-3", b"my-location-1"], b"version": [b"v2"]}
    assert matched_id(router, "/", headers=both) == IDS.format(10)
    fallback = {b"location": [b"my-location-3", b"my-location-2"], b"version": [b"v2"]}
    assert matched_id(router, "/", headers=fallback) == IDS.format(9)
    assert matched_id(router, "/", headers={b"location": [b"my-location-3", b"foo"]}) is None


def test_header_regex_is_an_unanchored_search_on_lowercased_values(impl):
    ua = r"~*windows|linux|os\s+x\s*[\d\._]+|solaris|bsd"
    router = make_router(
        impl, route(15, headers={"user-agent": [ua]}), route(1, headers={"x": ["~*^AB$"]})
    )
    chrome = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"
    assert matched_id(router, "/", headers={b"user-agent": [chrome]}) == IDS.format(15)
    assert matched_id(router, "/", headers={b"user-agent": [b"curl/8"]}) is None
    # The pattern itself is lowercased too, as Kong does.
    assert matched_id(router, "/", headers={b"x": [b"Ab"]}) == IDS.format(1)
    assert matched_id(router, "/", headers={b"x": [b"ab\n"]}) is None


def test_header_regex_captures_join_the_captures(impl):
    router = make_router(impl, route(1, paths=["/h"], headers={"x-v": [r"~*v(\d)"]}))
    m = router.match(b"GET", b"h", b"/h", {b"x-v": [b"V7"]})
    assert m.captures == {0: "v7", 1: "7"}


def test_uri_captures(impl):
    router = make_router(
        impl,
        route(1, paths=[r"~/users/(?<user_id>\d+)/profile/?(?<scope>[a-z]*)"], strip_path=False),
    )
    m = router.match(b"GET", b"h", b"/users/1984/profile")
    assert m.captures == {
        0: "/users/1984/profile", 1: "1984", 2: "", "user_id": "1984", "scope": ""
    }
    m = router.match(b"GET", b"h", b"/users/1984/profile/email")
    assert m.captures == {
        0: "/users/1984/profile/email", 1: "1984", 2: "email", "user_id": "1984", "scope": "email"
    }
    assert m.stripped_prefix == b""


def test_uri_captures_are_normalised(impl):
    router = make_router(impl, route(1, paths=[r"~/users/(?P<fullname>[a-zA-Z\s\d%]+)/profile"]))
    m = router.match(b"GET", b"h", b"/users/%6aohn%20doe/profile")
    assert m.captures == {0: "/users/john doe/profile", 1: "john doe", "fullname": "john doe"}


def test_no_captures_without_groups_or_for_prefixes(impl):
    router = make_router(impl, route(1, paths=[r"~/users/\d+/profile"]), route(2, paths=["/hello"]))
    assert router.match(b"GET", b"h", b"/users/1/profile").captures is None
    assert router.match(b"GET", b"h", b"/hello/world").captures is None
    router = make_router(impl, route(3, paths=[r"~/opt(/x)?"]))
    assert router.match(b"GET", b"h", b"/opt").captures is None


def test_strip_regex_match(impl):
    router = make_router(impl, route(1, paths=[r"~/users/(\d+)/profile"]))
    m = router.match(b"GET", b"h", b"/users/123/profile/hello/world")
    assert m.stripped_prefix == b"/users/123/profile"
    assert m.upstream_path == b"/hello/world"


def test_regex_is_anchored_at_the_start_only(impl):
    router = make_router(
        impl, route(1, paths=["~/prefix/[0-9]+"]), route(2, paths=[r"~/items/\d+$"])
    )
    assert matched_id(router, "/prefix/123") == IDS.format(1)
    assert matched_id(router, "/prefix/123/more") == IDS.format(1)
    assert matched_id(router, "/extra/prefix/123") is None
    assert matched_id(router, "/items/5") == IDS.format(2)
    # Rust's `$` is the end of the text: a decoded trailing newline does not match.
    assert matched_id(router, "/items/5%0A") is None


def test_regex_alternation_binds_the_anchor_to_the_first_branch(impl):
    # Kong compiles `~/a|/b` to `^/a|/b`, so the second branch may match anywhere.
    router = make_router(impl, route(1, paths=["~/a|/b"], strip_path=False))
    assert router.match(b"GET", b"h", b"/x/b").captures is None
    assert matched_id(router, "/x/b") == IDS.format(1)
    assert matched_id(router, "/x/a") is None


def test_reserved_characters_stay_encoded_for_matching(impl):
    router = make_router(
        impl, route(1, paths=["/endel%2Fst"]), route(2, paths=["~/regex-reserved%2Fabc"])
    )
    m = router.match(b"GET", b"h", b"/endel%2fst")
    assert m.route.id == IDS.format(1)
    assert (m.stripped_prefix, m.upstream_path) == (b"/endel%2Fst", b"/")
    assert matched_id(router, "/regex-reserved%2Fabc") == IDS.format(2)
    assert matched_id(router, "/regex-reserved/abc") is None


def test_invalid_utf8_matches_nothing(impl):
    router = make_router(impl, route(1, paths=["/"]))
    assert matched_id(router, "/ok%C3%A9") == IDS.format(1)
    assert matched_id(router, "/bad%FF") is None
    assert matched_id(router, b"/bad\xc3") is None
    # Without a path predicate anywhere the path is not a field, so it is not checked.
    router = make_router(impl, route(2, hosts=["h"]))
    assert matched_id(router, "/bad%FF", b"h") == IDS.format(2)
    router = make_router(impl, route(3, headers={"x": ["a"]}), route(4, paths=["/"]))
    assert matched_id(router, "/", headers={b"x": [b"a"]}) == IDS.format(3)
    assert matched_id(router, "/", headers={b"x": [b"\xff"]}) is None


# ------------------------------------------------------------------------------------------
# Outcomes


def test_preserve_host(impl):
    service = Service(host="example.org")
    router = make_router(
        impl,
        route(1, preserve_host=True, hosts=["preserve.com"]),
        route(2, preserve_host=False, hosts=["discard.com"]),
        route(3, preserve_host=True, paths=["/nohost"]),
        service=service,
    )
    assert router.match(b"GET", b"preserve.com:123", b"/").upstream_host == b"preserve.com:123"
    assert router.match(b"GET", b"discard.com", b"/").upstream_host == b"example.org"
    assert router.match(b"GET", b"", b"/nohost").upstream_host == b"example.org"


@pytest.mark.parametrize(
    ("protocol", "port", "host"),
    [
        ("http", 80, b"example.org"),
        ("http", 8080, b"example.org:8080"),
        ("https", 443, b"example.org"),
        ("https", 8443, b"example.org:8443"),
        ("https", 80, b"example.org:80"),
        ("http", None, b"example.org"),
    ],
)
def test_upstream_host_default_ports(impl, protocol, port, host):
    service = Service(host="example.org", protocol=protocol, port=port)
    router = make_router(impl, route(1, paths=["/"]), service=service)
    assert router.match(b"GET", b"client", b"/").upstream_host == host


def test_https_only_route_answers_426(impl):
    r = route(1, paths=["/secure"], protocols=["https"])
    router = make_router(impl, r)
    m = router.match(b"GET", b"example.com", b"/secure")
    assert (m.route, m.error_status, m.error_message) == (r, 426, "Please use HTTPS protocol")
    assert m.error_headers == ((b"Connection", b"Upgrade"), (b"Upgrade", b"TLS/1.2, HTTP/1.1"))
    m = router.match(b"GET", b"example.com", b"/secure", scheme=b"https")
    assert (m.error_status, m.error_message, m.error_headers) == (0, None, ())


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_https_only_route_redirects(impl, status):
    r = route(1, paths=["/r"], protocols=["https"], https_redirect_status_code=status)
    router = make_router(impl, r)
    m = router.match(b"GET", b"Example.COM:8000", b"/r/x?a=1")
    assert (m.error_status, m.error_message) == (status, "Please use HTTPS protocol")
    assert m.error_headers == ((b"Location", b"https://example.com/r/x?a=1"),)


def test_http_only_route_accepts_https(impl):
    # handler.lua only refuses an https-only route over plain http.
    router = make_router(impl, route(1, paths=["/"], protocols=["http"]))
    assert router.match(b"GET", b"h", b"/", scheme=b"https").error_status == 0


def test_serviceless_route_answers_503(impl):
    r = route(8, paths=["/serviceless"])
    router = make_router(impl, r, service=None)
    m = router.match(b"GET", b"h", b"/serviceless")
    assert (m.route, m.service, m.captures) == (r, None, None)
    assert (m.error_status, m.error_headers) == (503, ())
    assert m.error_message == "no Service found with those values"
    assert m.upstream_host == b""


def test_https_check_comes_before_the_service_check(impl):
    router = make_router(impl, route(1, paths=["/"], protocols=["https"]), service=None)
    assert router.match(b"GET", b"h", b"/").error_status == 426
    assert router.match(b"GET", b"h", b"/", scheme=b"https").error_status == 503


def test_proxied_match_fields(impl):
    r = route(1, paths=["/my-route"], name="r1")
    service = Service(host="example.org", port=8080, path="/api")
    m = make_router(impl, r, service=service).match(b"GET", b"h", b"/my-route/x?y=1")
    assert (m.route, m.service) == (r, service)
    assert (m.upstream_path, m.stripped_prefix) == (b"/api/x?y=1", b"/my-route")
    assert m.upstream_host == b"example.org:8080"
    assert (m.captures, m.error_status, m.error_message, m.error_headers) == (None, 0, None, ())
    with pytest.raises(AttributeError):
        m.upstream_path = b"/"


def test_no_route(impl):
    assert make_router(impl).match(b"GET", b"h", b"/") is None
    router = make_router(impl, route(1, paths=["/a"], methods=["GET"]))
    assert router.match(b"POST", b"h", b"/a") is None
    assert router.match(b"GET", b"h", b"/b") is None


# ------------------------------------------------------------------------------------------
# Differential: random routes and requests, compiled vs pure


def _random_routes(rng: random.Random, count: int) -> list[tuple[Route, Service | None]]:
    prefixes = [
        "/", "/a", "/a/b", "/ab", "/api", "/api/v1", "/api/v1/items", "/foo", "/foobar", "/x%2Fy",
        "/caf%C3%A9",
    ]
    regexes = [
        r"~/api/v\d+/items/(?<id>\d+)$", r"~/a/(\w+)", r"~/(foo|bar)", "~/x|/y", "~/[0]?api",
        r"~/api/(?:v1|v2)/(?P<rest>.*)", r"~(?i)/API", r"~/a/b\.c", r"~/opt(/x)?",
    ]
    hosts = ["a.com", "b.com", "*.a.com", "a.*", "a.com:8000", "*.b.com:8443", "[::1]"]
    header_sets = [{"x-v": ["1", "2"]}, {"X_Env": [r"~*pro?d"]}, {"x-v": ["2"], "x-env": ["prod"]}]
    services = [
        None,
        Service(path=None),
        Service(path="/"),
        Service(path="/svc", port=8080),
        Service(path="/svc/", protocol="https", port=443),
    ]
    out = []
    for _ in range(count):
        paths = None
        if rng.random() < 0.8:
            paths = [rng.choice(prefixes + regexes) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        r = Route(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            paths=paths,
            methods=rng.choice([None, None, ["GET"], ["POST", "PUT"]]),
            hosts=rng.choice([None, None, rng.sample(hosts, rng.randrange(1, 3))]),
            headers=rng.choice([None, None, None, rng.choice(header_sets)]),
            strip_path=rng.random() < 0.5,
            preserve_host=rng.random() < 0.3,
            regex_priority=rng.randrange(-2, 3),
            protocols=rng.choice([["http", "https"], ["http", "https"], ["https"], ["http"]]),
            https_redirect_status_code=rng.choice([426, 301, 308]),
        )
        if r.paths is None and r.hosts is None and r.methods is None and r.headers is None:
            r.methods = ["GET"]
        out.append((r, rng.choice(services)))
    return out


def _random_request(rng: random.Random) -> tuple[Any, ...]:
    targets = [
        b"/", b"/a", b"/a/b/c", b"/ab?x=1", b"/api/v1/items/42", b"/api/v2/items/7?", b"/API/x",
        b"/foo/../bar", b"/foobar/baz", b"/x%2fy/z", b"/x/y", b"/caf%C3%A9/", b"/a/b.c",
        b"/%2e%2e/api",
        b"/opt", b"/opt/x", b"//a//b", b"/a/./b/", b"/api/v1/items/5%0A", b"/bad%FF", b"/sp%20ace",
    ]
    hosts = [
        b"a.com", b"A.com", b"x.a.com", b"a.org", b"b.com", b"y.b.com:8443", b"a.com:8000",
        b"[::1]:80", b"",
    ]
    headers = rng.choice(
        [
            None, {}, {b"x-v": [b"1"]}, {b"x-env": [b"PROD"]},
            {b"x-v": [b"3", b"2"], b"x-env": [b"prd", b"prod"]},
        ]
    )
    return (
        rng.choice([b"GET", b"POST", b"PUT", b"DELETE"]),
        rng.choice(hosts),
        rng.choice(targets),
        headers,
        rng.choice([0, 80, 8000, 8443]),
        rng.choice([b"http", b"https"]),
    )


def _outcome(m: Any) -> Any:
    if m is None:
        return None
    return (
        m.route.id, m.service, m.upstream_path, m.upstream_host, m.stripped_prefix, m.captures,
        m.error_status, m.error_message, m.error_headers,
    )


@pytest.mark.parametrize("seed", range(6))
def test_compiled_matches_reference(seed):
    compiled = load_core_module("router", "compiled")
    rng = random.Random(seed)
    routes = _random_routes(rng, 300)
    fast, reference = compiled.Router(routes), pure_router.Router(routes)
    assert fast.header_names == reference.header_names
    matched = 0
    for _ in range(1500):
        request = _random_request(rng)
        expected = _outcome(reference.match(*request))
        assert _outcome(fast.match(*request)) == expected, request
        matched += expected is not None
    assert matched > 500
