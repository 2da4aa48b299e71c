"""rate-limiting and rate-limiting-advanced (behavior.md 6), local counters, through real
gateways: Kong's headers and bodies, identifiers, consumer-group tiers, and exactness under
concurrency with one worker and with four sharing the node's counters."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from tests.integration.conftest import GatewayProcess

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def CONFIG(upstream):
    def route(name, *plugins):
        return {"name": name, "paths": [f"/{name}"], "plugins": list(plugins)}

    def limits(**config):
        return {"name": "rate-limiting", "config": config}

    def advanced(**config):
        return {"name": "rate-limiting-advanced", "config": config}

    key_auth = {"name": "key-auth"}
    return {
        "_format_version": "3.0",
        "services": [{"name": "echo", "url": f"{upstream.url}/echo", "routes": [
            route("six-a-minute", limits(minute=6, limit_by="ip")),
            route("periods", limits(minute=3, hour=10, day=50, limit_by="ip")),
            route("hidden", limits(hour=1, limit_by="ip", hide_client_headers=True,
                                   error_code=403, error_message="slow down")),
            route("per-consumer", key_auth, limits(day=2)),
            route("per-header", limits(day=1, limit_by="header", header_name="x-tenant")),
            route("day-50", limits(day=50, limit_by="ip")),
            route("tiers", key_auth, advanced(limit=[100], window_size=[86400])),
            route("sliding", advanced(limit=[2, 50], window_size=[3600, 86400], identifier="ip")),
            route("no-penalty", advanced(limit=[2], window_size=[86400], identifier="ip", disable_penalty=True,
                                         window_type="fixed", retry_after_jitter_max=0)),
            route("group-shared", key_auth),
            route("adv-50", advanced(limit=[50], window_size=[86400], identifier="ip", window_type="fixed")),
            route("shared-a", advanced(limit=[3], window_size=[86400], identifier="ip", namespace="team-quota")),
            route("shared-b", advanced(limit=[3], window_size=[86400], identifier="ip", namespace="team-quota")),
            route("jitter", advanced(limit=[1], window_size=[86400], identifier="ip", window_type="fixed",
                                     retry_after_jitter_max=30)),
            route("adv-hidden", advanced(limit=[1], window_size=[86400], identifier="ip", hide_client_headers=True,
                                         error_code=503, error_message="over quota")),
            route("calendar", limits(month=1000, year=5000, limit_by="ip")),
            route("transformed", advanced(limit=[10], window_size=[86400], identifier="ip"),
                  {"name": "response-transformer", "config": {
                      "remove": {"headers": ["RateLimit-Reset"]},
                      "rename": {"headers": ["X-RateLimit-Remaining-Day:X-Left"]}}}),
        ]}],
        "consumers": [
            {"username": "alice", "keyauth_credentials": [{"key": "alice-key"}], "groups": [{"name": "gold"}]},
            {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}], "groups": [{"name": "free"}]},
            {"username": "carol", "keyauth_credentials": [{"key": "carol-key"}], "groups": [{"name": "free"}]},
            {"username": "dave", "keyauth_credentials": [{"key": "dave-key"}]},
            {"username": "erin", "keyauth_credentials": [{"key": "erin-key"}]},
            {"username": "frank", "keyauth_credentials": [{"key": "frank-key"}], "groups": [{"name": "team"}]},
            {"username": "grace", "keyauth_credentials": [{"key": "grace-key"}], "groups": [{"name": "team"}]},
        ],
        "consumer_groups": [
            # An AI API's tiers: the group-scoped instance replaces the route's for its members.
            {"name": "gold", "plugins": [advanced(limit=[5], window_size=[86400])]},
            {"name": "free", "plugins": [advanced(limit=[2], window_size=[86400])]},
            # One counter for the whole group.
            {"name": "team", "plugins": [advanced(limit=[3], window_size=[86400], identifier="consumer-group")]},
        ],
    }


@pytest.fixture
def gateway(module_gateway):
    return module_gateway


def start_of_a_fresh_minute():
    """Wait, if the current minute has under 3 s left, until the next one starts: the tests of
    per-minute windows then run inside one window (a request takes milliseconds)."""
    left = 60 - time.time() % 60
    if left < 3:
        time.sleep(left + 0.05)


def test_rate_limiting_admits_the_limit_with_kongs_headers(gateway):
    start_of_a_fresh_minute()
    statuses, remaining = [], []
    for _ in range(8):
        sent_at = time.time()
        response = gateway.request("GET", "/six-a-minute")
        statuses.append(response.status)
        remaining.append(response.headers["X-RateLimit-Remaining-Minute"])
        assert response.headers["X-RateLimit-Limit-Minute"] == "6"
        assert response.headers["RateLimit-Limit"] == "6"
        assert response.headers["RateLimit-Remaining"] == remaining[-1]
        # Kong's reset: the window's seconds left, max(1, 60 - whole seconds elapsed in it).
        expected_reset = max(1, 60 - int(sent_at % 60))
        assert int(response.headers["RateLimit-Reset"]) in (expected_reset, expected_reset - 1)
    assert statuses == [200] * 6 + [429] * 2
    assert remaining == ["5", "4", "3", "2", "1", "0", "0", "0"]
    denied = gateway.request("GET", "/six-a-minute")
    body = denied.json()
    assert body["message"] == "API rate limit exceeded"
    assert REQUEST_ID.match(body["request_id"]) and body["request_id"] == denied.headers["X-Fastgate-Request-Id"]
    assert denied.headers["Retry-After"] == denied.headers["RateLimit-Reset"]


def test_every_period_gets_headers_and_the_tightest_one_leads(gateway):
    start_of_a_fresh_minute()
    response = gateway.request("GET", "/periods")
    assert [response.headers[f"X-RateLimit-Limit-{name}"] for name in ("Minute", "Hour", "Day")] == ["3", "10", "50"]
    assert [response.headers[f"X-RateLimit-Remaining-{name}"] for name in ("Minute", "Hour", "Day")] == ["2", "9", "49"]
    assert (response.headers["RateLimit-Limit"], response.headers["RateLimit-Remaining"]) == ("3", "2")
    gateway.request("GET", "/periods")
    gateway.request("GET", "/periods")
    denied = gateway.request("GET", "/periods")
    assert denied.status == 429
    # Denied by the minute: it shows 0; the others show what is left without this request,
    # which counted nowhere (three allowed).
    assert denied.headers["X-RateLimit-Remaining-Minute"] == "0"
    assert (denied.headers["X-RateLimit-Remaining-Hour"], denied.headers["X-RateLimit-Remaining-Day"]) == ("7", "47")


def test_hidden_headers_and_a_custom_error(gateway):
    assert "X-RateLimit-Remaining-Hour" not in gateway.request("GET", "/hidden").headers
    denied = gateway.request("GET", "/hidden")
    assert (denied.status, denied.json()["message"]) == (403, "slow down")
    assert "RateLimit-Remaining" not in denied.headers and "Retry-After" not in denied.headers


def test_each_consumer_has_its_own_counter(gateway):
    for key in ("dave-key", "erin-key"):
        assert [gateway.request("GET", "/per-consumer", {"apikey": key}).status for _ in range(3)] == [200, 200, 429]


def test_limit_by_header_falls_back_to_the_client_address(gateway):
    assert gateway.request("GET", "/per-header", {"x-tenant": "a"}).status == 200
    assert gateway.request("GET", "/per-header", {"x-tenant": "a"}).status == 429
    assert gateway.request("GET", "/per-header", {"x-tenant": "b"}).status == 200
    assert gateway.request("GET", "/per-header").status == 200  # no header: counted by address
    assert gateway.request("GET", "/per-header").status == 429


def test_consumer_group_tiers(gateway):
    # gold members get 5 a day, free members 2, each consumer counted on its own; dave, in no
    # group, gets the route's own 100.
    def run(key, times):
        return [gateway.request("GET", "/tiers", {"apikey": key}).status for _ in range(times)]

    assert run("alice-key", 6) == [200] * 5 + [429]
    assert run("bob-key", 3) == [200, 200, 429]
    assert run("carol-key", 3) == [200, 200, 429]
    response = gateway.request("GET", "/tiers", {"apikey": "dave-key"})
    assert response.headers["X-RateLimit-Limit-Day"] == "100"


def test_consumer_group_identifier_shares_one_counter(gateway):
    # frank and grace are in "team", whose instance counts the whole group: 3 a day together.
    statuses = [gateway.request("GET", "/group-shared", {"apikey": key}).status
                for key in ("frank-key", "grace-key", "frank-key", "grace-key")]
    assert statuses == [200, 200, 200, 429]


def test_sliding_windows_and_penalty(gateway):
    first = gateway.request("GET", "/sliding")
    assert first.headers["X-RateLimit-Limit-Hour"] == "2" and first.headers["X-RateLimit-Limit-Day"] == "50"
    assert first.headers["X-RateLimit-Remaining-Hour"] == "1"
    assert gateway.request("GET", "/sliding").status == 200
    denied = gateway.request("GET", "/sliding")
    assert denied.status == 429
    assert int(denied.headers["Retry-After"]) >= 1
    # With the penalty (the default) the denied request counted in the hour: remaining stays 0.
    assert gateway.request("GET", "/sliding").headers["X-RateLimit-Remaining-Hour"] == "0"


def test_disable_penalty_does_not_count_denied_requests(gateway):
    assert [gateway.request("GET", "/no-penalty").status for _ in range(5)] == [200, 200, 429, 429, 429]
    assert gateway.request("GET", "/no-penalty").headers["X-RateLimit-Remaining-Day"] == "0"


async def _burst(port: int, path: str, count: int) -> list[tuple[int, str]]:
    """`count` requests at once, each on its own connection: (status, request id) each."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one():
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                await response.read()
                return response.status, response.headers["X-Fastgate-Request-Id"]

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("path", ["/day-50", "/adv-50"])
def test_exactly_the_limit_passes_under_concurrency(gateway, path):
    statuses = [status for status, _ in asyncio.run(_burst(gateway.port, path, 200))]
    assert (statuses.count(200), statuses.count(429)) == (50, 150)


@pytest.fixture(scope="module")
def four_workers(upstream, tmp_path_factory):
    gateway = GatewayProcess(tmp_path_factory.mktemp("four"), CONFIG(upstream), workers=4)
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("path", ["/day-50", "/adv-50"])
def test_four_workers_share_the_nodes_counters(four_workers, path):
    answers = asyncio.run(_burst(four_workers.port, path, 200))
    statuses = [status for status, _ in answers]
    assert (statuses.count(200), statuses.count(429)) == (50, 150)
    # The connections were spread over the workers (SO_REUSEPORT): a request id starts with
    # its worker's 16-hex prefix, and more than one worker answered.
    assert len({request_id[:16] for _, request_id in answers}) > 1


def test_other_plugins_see_the_rate_limit_headers(gateway):
    # response-transformer edits them like any response header (they keep the header layout).
    response = gateway.request("GET", "/transformed")
    assert "RateLimit-Reset" not in response.headers and "X-RateLimit-Remaining-Day" not in response.headers
    assert response.headers["X-Left"] == "9" and response.headers["X-RateLimit-Limit-Day"] == "10"


def test_a_namespace_shares_counters_across_instances(gateway):
    statuses = [gateway.request("GET", path).status for path in ("/shared-a", "/shared-b", "/shared-a", "/shared-b")]
    assert statuses == [200, 200, 200, 429]


def test_retry_after_jitter(gateway):
    assert gateway.request("GET", "/jitter").status == 200
    waits = []
    for _ in range(12):
        denied = gateway.request("GET", "/jitter")
        assert denied.status == 429
        reset = int(denied.headers["RateLimit-Reset"])
        waits.append(int(denied.headers["Retry-After"]) - reset)
    assert all(0 <= wait <= 30 for wait in waits) and len(set(waits)) > 1, waits


def test_advanced_hidden_headers_and_custom_error(gateway):
    assert "X-RateLimit-Remaining-Day" not in gateway.request("GET", "/adv-hidden").headers
    denied = gateway.request("GET", "/adv-hidden")
    assert (denied.status, denied.json()["message"]) == (503, "over quota")
    assert "Retry-After" not in denied.headers and "RateLimit-Limit" not in denied.headers


def test_calendar_month_and_year_windows(gateway):
    import calendar
    import time as clock

    response = gateway.request("GET", "/calendar")
    assert (response.headers["X-RateLimit-Limit-Month"], response.headers["X-RateLimit-Remaining-Month"]) == ("1000", "999")
    assert (response.headers["X-RateLimit-Limit-Year"], response.headers["X-RateLimit-Remaining-Year"]) == ("5000", "4999")
    # The month leads (least left); its reset counts from the 1st of the month, UTC, with
    # Kong's 30-day month: 2,592,000 s minus the seconds since.
    now = clock.gmtime()
    since = clock.time() - calendar.timegm((now.tm_year, now.tm_mon, 1, 0, 0, 0))
    assert abs(int(response.headers["RateLimit-Reset"]) - max(1, 2_592_000 - int(since))) <= 2
