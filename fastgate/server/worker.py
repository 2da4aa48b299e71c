"""A worker process: one uvloop event loop serving every proxy listener (SO_REUSEPORT).

Started by the supervisor as `python -m fastgate.server.worker --fd N --index I --counters-fd C`
(C: the node's shared rate-limit counters); it takes its
config and orders over the control channel on fd N (see control.py):
  supervisor -> worker: config {source}, status {id}, drain {}
  worker -> supervisor: ready {configuration_hash}, reloaded {configuration_hash},
                        reload_failed {problems}, status {id, server}
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys

import uvloop

from fastgate import _core, redis_counters
from fastgate.config import ConfigError, parse_config
from fastgate.config.compile import COUNTER_SLOTS, Snapshot, compile_snapshot, use_node_counters
from fastgate.server.control import ControlChannel
from fastgate.plugins import load_custom
from fastgate.settings import Settings, load_settings

log = logging.getLogger("fastgate.worker")

# While draining, how often the worker looks whether its last connection has gone.
DRAIN_POLL_SECONDS = 0.05
LISTEN_BACKLOG = 4096


def build_snapshot(source: str | bytes, origin: str) -> Snapshot:
    return compile_snapshot(parse_config(source, origin))


def redis_configs(snapshot: Snapshot) -> list:
    """The `redis` configs of the snapshot's rate-limiting instances that count in Redis."""
    configs = []
    for chain in snapshot.chains.values():
        for slot in chain:
            runs = [slot.static] + [run for _, run in (slot.by_consumer or {}).values()] + [
                run for _, run in (slot.by_group or {}).values()
            ]
            configs.extend(run.instance.redis_config for run in runs
                           if run is not None and getattr(run.instance, "redis_config", None) is not None)
    return configs


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_cert, settings.ssl_cert_key)
    return context


class Worker:
    def __init__(self, settings: Settings, channel: ControlChannel, index: int):
        self.settings = settings
        self.channel = channel
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.gateway = None
        self.servers: list[asyncio.AbstractServer] = []
        self.drained = asyncio.Event()
        self.draining = False

    async def run(self) -> int:
        first = await self.channel.receive()
        if first is None or first.get("op") != "config":
            log.error("worker %d: no configuration from the supervisor", self.index)
            return 1
        snapshot = build_snapshot(first["source"], first.get("origin", "<config>"))
        await redis_counters.open_all(self.loop, redis_configs(snapshot))
        self.gateway = _core.Gateway(self.loop, snapshot)
        if self.settings.error_template is not None:
            self.gateway.error_template = _core.ErrorTemplate(
                self.settings.error_template, self.settings.error_content_type
            )
        context = None
        if any(address.ssl for address in self.settings.proxy_listen):
            context = server_ssl_context(self.settings)
        for address in self.settings.proxy_listen:
            scheme = b"https" if address.ssl else b"http"
            try:
                server = await self.loop.create_server(
                    self.gateway.protocol_factory(address.port, scheme),
                    address.host,
                    address.port,
                    reuse_port=True,
                    backlog=LISTEN_BACKLOG,
                    ssl=context if address.ssl else None,
                )
            except OSError as exc:
                log.error("worker %d: cannot listen on %s: %s", self.index, address, exc)
                return 1
            self.servers.append(server)
        self.gateway.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.begin_drain)
        # The supervisor owns reloads; a stray SIGHUP must not kill a worker.
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)
        self.channel.send({"op": "ready", "pid": os.getpid(), "configuration_hash": snapshot.configuration_hash})
        log.info("worker %d (pid %d) serving on %s", self.index, os.getpid(),
                 ", ".join(str(a) for a in self.settings.proxy_listen))
        listener = asyncio.ensure_future(self.listen())
        await self.drained.wait()
        listener.cancel()
        return 0

    async def listen(self) -> None:
        while True:
            message = await self.channel.receive()
            if message is None:
                log.warning("worker %d: supervisor gone, draining", self.index)
                self.begin_drain()
                return
            op = message.get("op")
            if op == "config":
                self.reload(message["source"], message.get("origin", "<config>"))
            elif op == "status":
                # The Redis connections of the rate-limiting plugins (up / down / outages so far).
                server = {**self.gateway.status(), **redis_counters.status()}
                self.channel.send({"op": "status", "id": message["id"], "server": server})
            elif op == "drain":
                self.begin_drain()

    def reload(self, source: str, origin: str) -> None:
        try:
            snapshot = build_snapshot(source, origin)
        except ConfigError as exc:
            # The supervisor validated this source already, so this is not expected; the
            # running snapshot keeps serving either way.
            self.channel.send({"op": "reload_failed", "problems": [str(p) for p in exc.problems]})
            return
        # A Redis server new to this worker starts connecting now; until it answers, its checks
        # count on this node (the connect is not awaited: a reload never waits on the network).
        for config in redis_configs(snapshot):
            redis_counters.connection(self.loop, config)
        self.gateway.set_snapshot(snapshot)
        self.channel.send({"op": "reloaded", "configuration_hash": snapshot.configuration_hash})

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        for server in self.servers:
            server.close()
        self.gateway.begin_drain()
        asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        deadline = self.loop.time() + self.settings.graceful_timeout
        while self.gateway.clients and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if self.gateway.clients:
            log.warning("worker %d: %d connections still open after %.0f s, closing them",
                        self.index, len(self.gateway.clients), self.settings.graceful_timeout)
            for client in list(self.gateway.clients):
                client.transport.abort()
        self.gateway.stop()
        self.drained.set()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )


async def _main(fd: int, index: int, counters_fd: int | None) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    if counters_fd is not None:
        use_node_counters(_core.SharedCounters(counters_fd, COUNTER_SLOTS))
    load_custom(settings.plugins)  # the supervisor loaded them once already: they load
    channel = await ControlChannel.open(socket.socket(fileno=fd))
    return await Worker(settings, channel, index).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgate-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    # The node's shared rate-limit counters (supervisor.py); without it, counters of its own.
    parser.add_argument("--counters-fd", type=int, default=None)
    args = parser.parse_args(argv)
    return uvloop.run(_main(args.fd, args.index, args.counters_fd))


if __name__ == "__main__":
    raise SystemExit(main())
