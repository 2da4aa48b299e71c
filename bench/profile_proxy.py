"""Profile the proxy under wrk load: where the CPU per request goes.

    python bench/profile_proxy.py cprofile [--seconds 5]   # the pure-Python proxy in this process under
                                                     # cProfile: ranks the Python functions
    python bench/profile_proxy.py perf [--seconds 5]       # `fastgate run` (compiled) under
                                                     # `perf record`: shares by binary and symbol

Needs nginx (the upstream, 127.0.0.1:9001) and wrk. The proxy runs on core 0, nginx and wrk on
core 1, as in bench/e2e.py. py-spy is not used: it attributes this path to the syscall lines
(shared/perf-notes.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.e2e import GATEWAY, JSON_PORT, NGINX_UPSTREAM, free_port, pinned, stop, tree_pids, wait_port  # noqa: E402
from bench.sse_upstream import JSON_BODY  # noqa: E402


def start_upstream(run_dir: Path) -> subprocess.Popen:
    (run_dir / "tmp").mkdir(exist_ok=True)
    (run_dir / "upstream.conf").write_text(NGINX_UPSTREAM.format(run=run_dir, port=JSON_PORT, body=JSON_BODY.decode()))
    process = subprocess.Popen(
        pinned(1, ["nginx", "-p", str(run_dir), "-e", "stderr", "-c", str(run_dir / "upstream.conf"), "-g", "daemon off;"]),
        start_new_session=True,
    )
    wait_port(JSON_PORT)
    return process


def wrk(port: int, seconds: float) -> str:
    return subprocess.run(pinned(1, ["wrk", "-t1", "-c50", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/json"]),
                          capture_output=True, text=True, check=True).stdout


def profile_pure(seconds: float) -> None:
    os.environ["FASTGATE_NO_EXTENSIONS"] = "1"
    import asyncio

    import uvloop

    from fastgate import _core
    from fastgate.config import parse_config
    from fastgate.config.compile import compile_snapshot

    os.sched_setaffinity(0, {0})
    snapshot = compile_snapshot(parse_config(GATEWAY.format(json_port=JSON_PORT, sse_port=JSON_PORT)))
    port = free_port()
    result: dict = {}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        gateway = _core.Gateway(loop, snapshot)
        gateway.start()
        server = await loop.create_server(gateway.protocol_factory(port, b"http"), "127.0.0.1", port)
        await loop.run_in_executor(None, lambda: wrk(port, 1.0))  # warm-up
        profiler = cProfile.Profile()
        profiler.enable()
        result["wrk"] = await loop.run_in_executor(None, lambda: wrk(port, seconds))
        profiler.disable()
        result["requests"] = gateway.stats.total_requests
        server.close()
        gateway.stop()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        result["profile"] = out.getvalue()

    uvloop.run(serve())
    print(result["wrk"])
    print(result["profile"])


def profile_perf(seconds: float) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="fastgate-profile-"))
    port, admin = free_port(), free_port()
    (run_dir / "gateway.yaml").write_text(GATEWAY.format(json_port=JSON_PORT, sse_port=JSON_PORT))
    env = dict(os.environ, FASTGATE_WORKERS="1", FASTGATE_PROXY_LISTEN=f"127.0.0.1:{port}",
               FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}", FASTGATE_LOG_LEVEL="warning")
    gateway = subprocess.Popen(pinned(0, [sys.executable, "-m", "fastgate", "run", "--config", str(run_dir / "gateway.yaml")]),
                               env=env, start_new_session=True)
    try:
        wait_port(port)
        wrk(port, 1.0)
        worker = [pid for pid in tree_pids(gateway.pid) if pid != gateway.pid][-1]
        data = run_dir / "perf.data"
        recorder = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(data), "-p", str(worker),
                                     "--", "sleep", str(seconds)], stderr=subprocess.DEVNULL)
        load = threading.Thread(target=lambda: print(wrk(port, seconds)))
        load.start()
        recorder.wait()
        load.join()
        for sort in ("dso", "dso,symbol"):
            report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
                                     "--percent-limit", "0.4", "-g", "none"], capture_output=True, text=True).stdout
            print("\n".join(line for line in report.splitlines() if line and not line.startswith("#")))
    finally:
        stop(gateway)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cprofile", "perf"])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="fastgate-upstream-"))
    upstream = start_upstream(run_dir)
    try:
        time.sleep(0.2)
        (profile_pure if args.mode == "cprofile" else profile_perf)(args.seconds)
    finally:
        stop(upstream)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
