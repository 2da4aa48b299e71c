"""Rate-limit counters in Redis, for the `redis` policy / strategy: exact across nodes.

As measured in shared/perf-notes.md ("rate limiting against Redis on the fast path"): one
connection per worker and Redis server, our own pipelined RESP protocol on uvloop, replies
parsed by hiredis.Reader and matched in order to the waiting checks, each check resuming its
request from the reply callback (no Task per request); the commands of one loop iteration leave
in one write, and a check's command is pre-built bytes plus its keys.

Each check is one EVALSHA of a script that decides and counts atomically (the same decisions as
the local counters of fastgate/_core/_pure/limiter.py), so gateways on several nodes sharing
one Redis together admit exactly the limit.

Failure: every check has the configured timeout, watched by one timer armed for the oldest
pending check (they expire in order). A timeout or a lost connection fails every pending check
and marks the server down: checks then fail at once (the plugin counts locally when
fault_tolerant, else answers 500) while a probe reconnects every second, reloads the scripts and
PINGs; when it answers, Redis is used again. An outage is logged once, when it starts, and once
when it ends; GET /status counts the workers that see Redis up or down.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
import time
from collections import deque

import hiredis

log = logging.getLogger("fastgate.redis")

# KEYS: one counter per period (its window start in the name). ARGV: the limits, then the
# counters' lifetimes in seconds. Returns {denied period (1-based) or 0, usage before ...}.
# A request over a limit counts nowhere (as the local counters).
FIXED_SCRIPT = b"""
local n = #KEYS
local result = {0}
for i = 1, n do result[i + 1] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for i = 1, n do
  if tonumber(ARGV[i]) - result[i + 1] <= 0 then result[1] = i return result end
end
for i = 1, n do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[n + i]) end
end
return result
"""
# KEYS: per window, its current then its previous counter. ARGV: the limits, the lifetimes, the
# penalty flag ('1': a denied request stays counted), then the previous windows' weights.
# Returns {denied window (1-based) or 0, rate, ...} (rates as strings: Lua numbers would be
# truncated to integers).
SLIDING_SCRIPT = b"""
local n = #KEYS / 2
local result = {0}
local counted = {}
for i = 1, n do
  local current
  if result[1] == 0 then
    current = redis.call('INCR', KEYS[2 * i - 1])
    if current == 1 then redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[n + i]) end
    counted[#counted + 1] = KEYS[2 * i - 1]
  else
    current = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  end
  local rate = current + tonumber(redis.call('GET', KEYS[2 * i]) or '0') * tonumber(ARGV[2 * n + 1 + i])
  result[i + 1] = tostring(rate)
  if result[1] == 0 and rate > tonumber(ARGV[i]) then result[1] = i end
end
if result[1] > 0 and ARGV[2 * n + 1] == '0' then
  for _, key in ipairs(counted) do redis.call('DECR', key) end
end
return result
"""
# sync_rate > 0. KEYS: counters; ARGV: what this worker counted in each since its last sync, then
# each counter's lifetime. Adds them and returns every counter's total.
SYNC_SCRIPT = b"""
local n = #KEYS
local totals = {}
for i = 1, n do
  local delta = tonumber(ARGV[i])
  if delta > 0 then
    totals[i] = redis.call('INCRBY', KEYS[i], delta)
    if totals[i] == delta then redis.call('EXPIRE', KEYS[i], ARGV[n + i]) end
  else
    totals[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
return totals
"""
FIXED_SHA = hashlib.sha1(FIXED_SCRIPT).hexdigest().encode()
SYNC_SHA = hashlib.sha1(SYNC_SCRIPT).hexdigest().encode()
SLIDING_SHA = hashlib.sha1(SLIDING_SCRIPT).hexdigest().encode()
# While Redis is down, a probe reconnects this often.
PROBE_SECONDS = 1.0
# Checks waiting for replies on one connection: past this, new checks fail at once (the plugin
# decides locally or answers 500) instead of queueing without bound.
MAX_PENDING = 65536


def command(*parts: bytes) -> bytes:
    """One RESP command."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def bulk(parts) -> bytes:
    """The RESP encoding of some arguments, to splice into a pre-built command."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


class RedisError(Exception):
    """A check that got no usable reply (timeout, lost connection, an error reply)."""


class RedisCounters(asyncio.Protocol):
    """One worker's pipelined connection to one Redis server."""

    def __init__(self, loop, host, port, timeout_ms, username=None, password=None, database=0,
                 tls=False, tls_verify=False, server_name=None):
        self.loop = loop
        self.host = host
        self.port = port
        self.timeout = timeout_ms / 1000.0
        self.setup = []
        if password is not None:
            self.setup.append(command(b"AUTH", username.encode(), password.encode()) if username
                              else command(b"AUTH", password.encode()))
        if database:
            self.setup.append(command(b"SELECT", b"%d" % database))
        self.tls_context = None
        if tls:
            self.tls_context = ssl.create_default_context()
            if not tls_verify:
                self.tls_context.check_hostname = False
                self.tls_context.verify_mode = ssl.CERT_NONE
        self.server_name = server_name or host
        self.transport = None
        self.reader = hiredis.Reader()
        self.up = False
        self.outages = 0
        # Checks sent and the writes they took: how well round trips are shared (GET /status).
        self.checks = 0
        self.writes = 0
        self.pending = deque()  # (deadline, callback) in the order the replies will come
        self.out = []
        self.flush_scheduled = False
        self.timer = None
        self.probe = None
        # Done once the first connection attempt is in use or has failed (the worker waits for
        # it before it takes traffic, so the first requests are counted in Redis too).
        self.first_attempt = loop.create_future()
        self.connect()

    # -- connection --------------------------------------------------------------------------

    def connect(self):
        self.probe = None
        self.loop.create_task(self._connect())  # one Task per connection attempt, not per check

    async def _connect(self):
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: self, self.host, self.port, ssl=self.tls_context,
                    server_hostname=self.server_name if self.tls_context else None,
                ),
                self.timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.went_down(f"cannot connect: {exc or type(exc).__name__}")

    def connection_made(self, transport):
        self.transport = transport
        self.reader = hiredis.Reader()
        # The scripts are loaded on every connection (a restarted Redis has none), then a PING:
        # its PONG puts the server back in use.
        for setup in self.setup:
            self._send(setup, self._setup_answered)
        self.load_scripts()
        self._send(command(b"PING"), self._ping_answered)

    def load_scripts(self):
        for script in (FIXED_SCRIPT, SLIDING_SCRIPT, SYNC_SCRIPT):
            self._send(command(b"SCRIPT", b"LOAD", script), self._setup_answered)

    def _setup_answered(self, reply):
        if isinstance(reply, Exception):
            self.went_down(f"setup failed: {reply}")

    def _ping_answered(self, reply):
        if reply == b"PONG" and self.transport is not None:
            if not self.up and self.outages:
                log.warning("Redis %s:%d is back: rate limits count there again", self.host, self.port)
            self.up = True
            if not self.first_attempt.done():
                self.first_attempt.set_result(True)

    def connection_lost(self, exc):
        self.transport = None
        self.went_down(f"connection lost: {exc}" if exc else "connection closed")

    def went_down(self, why):
        if self.up or self.outages == 0:
            self.outages += 1
            log.warning("Redis %s:%d is unavailable (%s): rate limits count on this node until it is back",
                        self.host, self.port, why)
        self.up = False
        if not self.first_attempt.done():
            self.first_attempt.set_result(False)
        transport = self.transport
        self.transport = None
        if transport is not None:
            transport.abort()
        failed = self.pending
        self.pending = deque()
        self.out = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        error = RedisError(why)
        for _, callback in failed:
            callback(error)
        if self.probe is None:
            self.probe = self.loop.call_later(PROBE_SECONDS, self.connect)

    # -- checks ------------------------------------------------------------------------------

    def call(self, request: bytes, callback) -> bool:
        """Send `request`; `callback(reply)` runs with the reply, or with a RedisError when it
        fails or times out. False (and no callback) when Redis is down or too far behind."""
        if not self.up or len(self.pending) >= MAX_PENDING:
            return False
        self.checks += 1
        self._send(request, callback)
        return True

    def _send(self, request, callback):
        self.out.append(request)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        deadline = self.loop.time() + self.timeout
        self.pending.append((deadline, callback))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self.expire)

    def flush(self):
        """Every command of this loop iteration in one write."""
        self.flush_scheduled = False
        if self.out and self.transport is not None:
            self.writes += 1
            self.transport.write(b"".join(self.out))
        self.out = []

    def data_received(self, data):
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.went_down(f"protocol error: {exc}")
                return
            if reply is False:
                break
            if not pending:
                self.went_down("a reply nobody waited for")
                return
            _, callback = pending.popleft()
            if isinstance(reply, hiredis.ReplyError):
                if reply.args and str(reply.args[0]).startswith("NOSCRIPT"):
                    # Redis lost the scripts (SCRIPT FLUSH, a failover): load them again.
                    self.load_scripts()
                reply = RedisError(str(reply))
            callback(reply)

    def expire(self):
        """The timer of the oldest pending check fired."""
        self.timer = None
        if not self.pending:
            return
        deadline = self.pending[0][0]
        if deadline <= self.loop.time():
            self.went_down(f"no reply within {self.timeout * 1000:.0f} ms")
        else:
            self.timer = self.loop.call_at(deadline, self.expire)


# Counters one sync carries at most (more go in the next script call of the same write).
SYNC_BATCH = 1000


class SyncedCounts:
    """sync_rate > 0: this worker counts on its own and adds its counts to Redis every
    `interval` seconds (one pipelined write), reading back the totals. A check sees the totals
    of the last sync plus this worker's counts since, so it is approximate: between two syncs
    each of the W workers of all the nodes may admit up to what the limit had left at the last
    sync, i.e. at most (W - 1) x (L - total at the last sync) over L per window and interval.
    While Redis is down the counts are kept and added at the first sync that gets through."""

    def __init__(self, loop, connection, interval):
        self.loop = loop
        self.connection = connection
        self.interval = interval
        self.deltas: dict[bytes, int] = {}
        self.totals: dict[bytes, int] = {}
        self.expiries: dict[bytes, float] = {}  # key -> when its window is over (time.time())
        self.lifetimes: dict[bytes, int] = {}
        self.timer = loop.call_later(interval, self.sync)

    def count(self, key):
        return self.totals.get(key, 0) + self.deltas.get(key, 0)

    def watch(self, key, lifetime, expires_at):
        """Have `key`'s total read back at every sync until `expires_at`."""
        if key not in self.lifetimes:
            self.lifetimes[key] = lifetime
            self.expiries[key] = expires_at

    def add(self, key, lifetime, expires_at):
        self.watch(key, lifetime, expires_at)
        self.deltas[key] = self.deltas.get(key, 0) + 1

    def sync(self):
        self.timer = self.loop.call_later(self.interval, self.sync)
        now = time.time()
        for key in [key for key, expiry in self.expiries.items() if expiry <= now]:
            # A window that is over: its counter no longer decides anything here.
            self.totals.pop(key, None)
            self.deltas.pop(key, None)
            del self.lifetimes[key]
            del self.expiries[key]
        keys = list(self.expiries)
        if not keys:
            return
        deltas, self.deltas = self.deltas, {}
        for start in range(0, len(keys), SYNC_BATCH):
            batch = keys[start:start + SYNC_BATCH]
            counts = [deltas.get(key, 0) for key in batch]
            request = command(b"EVALSHA", SYNC_SHA, b"%d" % len(batch), *batch,
                              *[b"%d" % count for count in counts], *[b"%d" % self.lifetimes[key] for key in batch])
            if not self.connection.call(request, functools.partial(self.synced, batch, counts)):
                self.keep(batch, counts)

    def synced(self, keys, counts, reply):
        if isinstance(reply, Exception):
            self.keep(keys, counts)
            return
        for key, total in zip(keys, reply):
            if key in self.expiries:
                self.totals[key] = total

    def keep(self, keys, counts):
        """Counts that did not reach Redis go with the next sync."""
        for key, count in zip(keys, counts):
            if count and key in self.expiries:
                self.deltas[key] = self.deltas.get(key, 0) + count


_synced: dict[tuple, SyncedCounts] = {}


def synced_counts(loop, redis, owner, interval) -> SyncedCounts:
    """This worker's counts for one plugin instance (`owner`: its id) with sync_rate > 0, kept
    across reloads of the same instance."""
    key = (owner, interval) + _config_key(redis)
    found = _synced.get(key)
    if found is None:
        found = _synced[key] = SyncedCounts(loop, connection(loop, redis), interval)
    return found


def _config_key(redis) -> tuple:
    return (redis.host, redis.port, redis.timeout, redis.username, redis.password, redis.database, redis.ssl,
            redis.ssl_verify, redis.server_name)


_connections: dict[tuple, RedisCounters] = {}


def connection(loop, redis) -> RedisCounters:
    """This worker's connection to the server of a plugin's `redis` config (made on first use,
    shared by every plugin instance and kept across reloads)."""
    key = _config_key(redis)
    found = _connections.get(key)
    if found is None:
        found = _connections[key] = RedisCounters(
            loop, redis.host, redis.port, redis.timeout, redis.username, redis.password, redis.database,
            redis.ssl, redis.ssl_verify, redis.server_name,
        )
    return found


async def open_all(loop, configs) -> None:
    """Open the connections of these `redis` configs and wait for their first attempts (each
    bounded by its timeout)."""
    attempts = [connection(loop, config).first_attempt for config in configs]
    if attempts:
        await asyncio.gather(*attempts)


def status() -> dict:
    """For GET /status (summed over the workers)."""
    return {
        "redis_connections_up": sum(1 for each in _connections.values() if each.up),
        "redis_connections_down": sum(1 for each in _connections.values() if not each.up),
        "redis_outages": sum(each.outages for each in _connections.values()),
        "redis_checks": sum(each.checks for each in _connections.values()),
        "redis_writes": sum(each.writes for each in _connections.values()),
    }
