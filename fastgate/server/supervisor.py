"""The supervisor: validates the config, starts FASTGATE_WORKERS worker processes, serves the
admin API, reloads on SIGHUP, drains on SIGTERM/SIGINT and restarts a worker that crashed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from fastgate import __version__, _core
from fastgate.config import ConfigError
from fastgate.config.compile import COUNTER_SLOTS, use_node_counters
from fastgate.config.load import read_source
from fastgate.server.control import ControlChannel
from fastgate.server.worker import build_snapshot, server_ssl_context
from fastgate.settings import Settings

log = logging.getLogger("fastgate.supervisor")

# How often crashed workers are looked for, and how long a worker may take to say it is ready.
MONITOR_SECONDS = 0.2
READY_TIMEOUT_SECONDS = 30.0
STATUS_TIMEOUT_SECONDS = 2.0
# A worker that keeps crashing is restarted at most this often.
RESTART_BACKOFF_SECONDS = 1.0


class WorkerHandle:
    def __init__(self, index: int, process: subprocess.Popen, channel: ControlChannel):
        self.index = index
        self.process = process
        self.channel = channel
        self.ready = asyncio.Event()
        self.configuration_hash = ""
        self.reader: asyncio.Task | None = None


class Supervisor:
    def __init__(self, settings: Settings, config_path: str, *, on_ready: Callable[[], Awaitable[None]] | None = None):
        self.settings = settings
        self.config_path = config_path
        self.on_ready = on_ready
        self.loop = asyncio.get_running_loop()
        self.source = ""
        self.configuration_hash = ""
        self.workers: dict[int, WorkerHandle] = {}
        self.stopping = asyncio.Event()
        self.ready = False
        self.status_ids = itertools.count(1)
        self.status_waiters: dict[int, asyncio.Future] = {}
        self.admin_runner: web.AppRunner | None = None
        # The node's rate-limit counters: one shared memory segment every worker maps, so the
        # workers count together (a restarted worker maps the same one and loses nothing).
        self.counters_fd = os.memfd_create("fastgate-counters")
        _core.initialise_counters(self.counters_fd, COUNTER_SLOTS)
        # The snapshots the supervisor builds to validate a file use it too (never for a check).
        use_node_counters(_core.SharedCounters(self.counters_fd, COUNTER_SLOTS))

    # -- config ------------------------------------------------------------------------------

    def read_config(self) -> tuple[str, str]:
        """The file's text and its configuration hash; ConfigError when it is not valid."""
        data = read_source(self.config_path)
        snapshot = build_snapshot(data, self.config_path)
        # Valid means it decoded as UTF-8, so the text travels to the workers as it is.
        return data.decode("utf-8-sig"), snapshot.configuration_hash

    def reload(self) -> bool:
        try:
            source, configuration_hash = self.read_config()
        except ConfigError as exc:
            log.error("reload refused, the running configuration keeps serving:\n%s", exc)
            return False
        self.source = source
        self.configuration_hash = configuration_hash
        for worker in self.workers.values():
            worker.channel.send({"op": "config", "source": source, "origin": self.config_path})
        log.info("configuration reloaded (configuration_hash %s)", configuration_hash)
        return True

    # -- workers -----------------------------------------------------------------------------

    async def start_worker(self, index: int) -> WorkerHandle:
        parent, child = socket.socketpair()
        with child:
            process = subprocess.Popen(
                [sys.executable, "-m", "fastgate.server.worker", "--fd", str(child.fileno()), "--index", str(index),
                 "--counters-fd", str(self.counters_fd)],
                pass_fds=[child.fileno(), self.counters_fd],
            )
        channel = await ControlChannel.open(parent)
        worker = WorkerHandle(index, process, channel)
        worker.reader = asyncio.ensure_future(self.read_worker(worker))
        channel.send({"op": "config", "source": self.source, "origin": self.config_path})
        self.workers[index] = worker
        return worker

    async def read_worker(self, worker: WorkerHandle) -> None:
        while True:
            message = await worker.channel.receive()
            if message is None:
                return
            op = message.get("op")
            if op == "ready":
                worker.configuration_hash = message["configuration_hash"]
                worker.ready.set()
            elif op == "reloaded":
                worker.configuration_hash = message["configuration_hash"]
            elif op == "reload_failed":
                log.error("worker %d refused a reload: %s", worker.index, "; ".join(message["problems"]))
            elif op == "status":
                waiter = self.status_waiters.get(message["id"])
                if waiter is not None and not waiter.done():
                    waiter.set_result(message["server"])

    async def monitor(self) -> None:
        while not self.stopping.is_set():
            for index, worker in list(self.workers.items()):
                code = worker.process.poll()
                if code is None or self.stopping.is_set():
                    continue
                log.error("worker %d (pid %d) exited with %s; restarting it", index, worker.process.pid, code)
                worker.channel.close()
                await asyncio.sleep(RESTART_BACKOFF_SECONDS)
                if not self.stopping.is_set():
                    await self.start_worker(index)
            try:
                await asyncio.wait_for(self.stopping.wait(), MONITOR_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def stop_workers(self) -> None:
        for worker in self.workers.values():
            worker.channel.send({"op": "drain"})
        deadline = self.loop.time() + self.settings.graceful_timeout + 5.0
        while self.loop.time() < deadline and any(w.process.poll() is None for w in self.workers.values()):
            await asyncio.sleep(0.05)
        for worker in self.workers.values():
            if worker.process.poll() is None:
                log.error("worker %d did not drain in time; killing it", worker.index)
                worker.process.kill()
            worker.process.wait()
            worker.channel.close()

    # -- admin -------------------------------------------------------------------------------

    async def server_status(self) -> dict:
        totals: dict[str, int] = {}
        waiters = []
        for worker in self.workers.values():
            status_id = next(self.status_ids)
            waiter = self.loop.create_future()
            self.status_waiters[status_id] = waiter
            waiters.append((status_id, waiter))
            worker.channel.send({"op": "status", "id": status_id})
        for status_id, waiter in waiters:
            try:
                server = await asyncio.wait_for(waiter, STATUS_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                continue  # a worker that does not answer is left out of the sums
            finally:
                self.status_waiters.pop(status_id, None)
            for name, value in server.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    async def handle_status(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"message": "starting"}, status=503)
        return web.json_response(
            {
                "server": await self.server_status(),
                "configuration_hash": self.configuration_hash,
                "worker_pids": [worker.process.pid for worker in self.workers.values()],
                "version": __version__,
            }
        )

    async def start_admin(self) -> None:
        listen = self.settings.admin_listen
        if not listen:
            return
        app = web.Application()
        app.router.add_get("/status", self.handle_status)
        self.admin_runner = web.AppRunner(app, access_log=None)
        await self.admin_runner.setup()
        context = server_ssl_context(self.settings) if any(a.ssl for a in listen) else None
        for address in listen:
            site = web.TCPSite(self.admin_runner, address.host, address.port, ssl_context=context if address.ssl else None)
            await site.start()

    # -- lifecycle ---------------------------------------------------------------------------

    async def wait_ready(self) -> str | None:
        """None once every worker is ready; else why not. A worker that dies while starting (a
        port in use, an unreadable certificate) ends the wait at once, not after the timeout."""
        deadline = self.loop.time() + READY_TIMEOUT_SECONDS
        while not all(worker.ready.is_set() for worker in self.workers.values()):
            for worker in self.workers.values():
                if worker.process.poll() is not None:
                    return f"worker {worker.index} exited with {worker.process.returncode} while starting"
            if self.loop.time() > deadline:
                return f"workers did not become ready within {READY_TIMEOUT_SECONDS:.0f} s"
            await asyncio.sleep(MONITOR_SECONDS / 4)
        return None

    async def run(self) -> int:
        try:
            self.source, self.configuration_hash = self.read_config()
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        try:
            await self.start_admin()
        except OSError as exc:
            log.error("cannot listen on the admin address %s: %s",
                      ", ".join(str(a) for a in self.settings.admin_listen), exc)
            return 1
        for index in range(self.settings.workers):
            await self.start_worker(index)
        failure = await self.wait_ready()
        if failure:
            log.error("%s; stopping", failure)
            self.stopping.set()
            await self.stop_workers()
            return 1
        self.ready = True
        log.info("fastgate %s ready: %d workers on %s, admin on %s", __version__, len(self.workers),
                 ", ".join(str(a) for a in self.settings.proxy_listen),
                 ", ".join(str(a) for a in self.settings.admin_listen) if self.settings.admin_listen else "off")
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stopping.set)
        if self.on_ready is not None:
            await self.on_ready()
        await self.monitor()
        log.info("draining (up to %.0f s)", self.settings.graceful_timeout)
        await self.stop_workers()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        log.info("stopped")
        return 0
