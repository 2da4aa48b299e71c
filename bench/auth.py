"""Benchmark the access plugins: what key-auth + acl, a team's Python plugin, and rate limiting
cost on top of plain proxying, with 100,000 consumers, measured in one run against the same
gateway.

    python bench/auth.py [--consumers 100000] [--duration 5] [--reps 5] [--connections 50]

- Upstream on core 1: nginx serving GET /json (200-byte JSON) when installed, else
  bench/sse_upstream.py.
- One fastgate worker on core 0 with one config and routes to the same upstream: `/plain/json`
  (no plugin), `/auth/json` (key-auth + acl allow [users]), `/custom/json` (a team's
  plain-Python plugin whose access phase does nothing: the price of the plugin interface for
  interpreted code), `/limited/json` (key-auth + acl + rate-limiting-advanced, local counters,
  a sliding 60 s window per consumer with a limit no run reaches) and, when redis-server is
  installed, `/limited-redis/json` (the same counted in a redis-server on core 1, strategy
  redis, sync_rate 0); and, when nginx is installed, nginx itself proxying to the same upstream
  (one worker, core 0) as the "x nginx" reference. Every consumer has one key and the ACL group
  `users`; the odd-numbered half of the keys is in the file only as `sha256:<hex>`.
- Load on core 1: wrk -t1 with a Lua script that sends a random consumer's key on each request
  (when wrk is installed), else bench/loadgen.py with one key. The scenarios alternate within
  each repetition, in an order that turns each repetition, so that the machine's drift hits all
  of them alike; medians are reported.
- Per scenario: requests/s, p50/p99, the worker's CPU per request, and the ratio to
  `/plain/json`; plus the config's load time, the worker's RSS with all the consumers, and how
  many Redis checks shared each write.
Writes <out>/auth-<UTC time>.json and .md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import (  # noqa: E402
    _UNIT, _WRK_PCT, _WRK_RPS, HERE, JSON_PORT, NGINX_UPSTREAM, SSE_PORT, cpu_seconds, free_port, pinned, rss_kib,
    start, start_nginx_proxy, stop, tree_pids, wait_port,
)

SCENARIOS = ("plain", "auth", "custom", "limited")
# With redis-server installed: the same limit counted in Redis (strategy redis, sync_rate 0).
REDIS_SCENARIO = "limited-redis"
REDIS_PORT = 9003
# With nginx installed: nginx as a plain reverse proxy (one worker, core 0), the reference the
# issue's "x nginx" figures are measured against in the same run.
NGINX_SCENARIO = "nginx"

WRK_SCRIPT = """
local prefix = "{prefix}"
local count = {count}
local path = "{path}"
request = function()
    return wrk.format("GET", path, {{["apikey"] = prefix .. math.random(0, count - 1)}})
end
"""


def gateway_config(json_port: int, consumers: int, redis_port: int | None) -> dict:
    import hashlib

    def service(name: str, plugins: list[dict]) -> dict:
        return {"name": name, "url": f"http://127.0.0.1:{json_port}/json", "routes": [
            {"name": name, "paths": [f"/{name}/json"], "plugins": plugins}]}

    guarded = [{"name": "key-auth"}, {"name": "acl", "config": {"allow": ["users"]}}]
    # A limit per consumer no run reaches: the check's cost, not its denials, is measured.
    def limited(**store) -> list[dict]:
        return guarded + [{"name": "rate-limiting-advanced", "config": {
            "limit": [1_000_000_000], "window_size": [60], **store}}]

    def key(i: int) -> str:
        return f"key-{i}" if i % 2 == 0 else "sha256:" + hashlib.sha256(f"key-{i}".encode()).hexdigest()

    people = [{"username": f"user-{i}", "keyauth_credentials": [{"key": key(i)}], "acls": [{"group": "users"}]}
              for i in range(consumers)]
    return {
        "_format_version": "3.0",
        "services": [service("plain", []), service("auth", guarded), service("custom", [{"name": "bench-noop"}]),
                     service("limited", limited())] + ([service(REDIS_SCENARIO, limited(
                         strategy="redis", sync_rate=0, redis={"host": "127.0.0.1", "port": redis_port}))]
                         if redis_port else []),
        "consumers": people,
    }


def run_wrk(port: int, scenario: str, consumers: int, connections: int, duration: float, run_dir: Path,
            worker_pids: list[int]) -> dict:
    prefix = "key-"
    script = run_dir / f"{scenario}.lua"
    path = "/json" if scenario == NGINX_SCENARIO else f"/{scenario}/json"
    script.write_text(WRK_SCRIPT.format(prefix=prefix, count=consumers, path=path))
    url = f"http://127.0.0.1:{port}{path}"
    before = cpu_seconds(worker_pids)
    if shutil.which("wrk"):
        out = subprocess.run(pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                                        "-s", str(script), url]), capture_output=True, text=True, check=True).stdout
        percentiles = {p: float(v) * _UNIT[u] for p, v, u in _WRK_PCT.findall(out)}
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        result = {"rps": float(_WRK_RPS.search(out).group(1)), "p50_ms": percentiles["50"],
                  "p99_ms": percentiles["99"], "requests": int(re.search(r"(\d+) requests in", out).group(1)),
                  "errors": int(errors.group(1)) if errors else 0, "generator": "wrk (random key per request)"}
    else:
        command = [sys.executable, str(HERE / "loadgen.py"), url, "--connections", str(connections),
                   "--duration", str(duration), "--header", f"apikey: {prefix}1"]
        result = json.loads(subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout)
        result["generator"] = "loadgen (one key)"
    result["cpu_us_per_request"] = (cpu_seconds(worker_pids) - before) / result["requests"] * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumers", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="fastgate-auth-bench-"))
    (run_dir / "tmp").mkdir()
    processes: list[subprocess.Popen] = []
    nginx = shutil.which("nginx")
    try:
        if nginx:
            from bench.sse_upstream import JSON_BODY

            (run_dir / "upstream.conf").write_text(NGINX_UPSTREAM.format(run=run_dir, port=JSON_PORT, body=JSON_BODY.decode()))
            processes.append(start(pinned(1, [nginx, "-p", str(run_dir), "-e", "stderr", "-c",
                                              str(run_dir / "upstream.conf"), "-g", "daemon off;"])))
            json_port = JSON_PORT
        else:
            processes.append(start(pinned(1, [sys.executable, str(HERE / "sse_upstream.py"), str(SSE_PORT)])))
            json_port = SSE_PORT
        wait_port(json_port)
        scenarios = SCENARIOS
        redis_port = None
        if shutil.which("redis-server"):
            processes.append(start(pinned(1, ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                              "--save", "", "--appendonly", "no", "--dir", str(run_dir)])))
            wait_port(REDIS_PORT)
            redis_port = REDIS_PORT
            scenarios = SCENARIOS + (REDIS_SCENARIO,)

        config_path = run_dir / "gateway.json"
        config_path.write_text(json.dumps(gateway_config(json_port, args.consumers, redis_port)))
        port, admin_port = free_port(), free_port()
        env = dict(os.environ, FASTGATE_WORKERS="1", FASTGATE_PROXY_LISTEN=f"127.0.0.1:{port}",
                   FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin_port}", FASTGATE_LOG_LEVEL="warning",
                   FASTGATE_PLUGINS="bench.noop_plugin:Noop",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
        began = time.monotonic()
        gateway = start(pinned(0, [sys.executable, "-m", "fastgate", "run", "--config", str(config_path)]),
                        env=env, log=run_dir / "gateway.log")
        processes.append(gateway)
        wait_port(port, timeout=300)
        load_seconds = time.monotonic() - began
        worker_pids = [pid for pid in tree_pids(gateway.pid) if pid != gateway.pid]

        ports = {scenario: port for scenario in scenarios}
        pids = {scenario: worker_pids for scenario in scenarios}
        if nginx:
            nginx_port, proxy = start_nginx_proxy(nginx, run_dir, json_port)
            processes.append(proxy)
            scenarios = scenarios + (NGINX_SCENARIO,)
            ports[NGINX_SCENARIO] = nginx_port
            pids[NGINX_SCENARIO] = [pid for pid in tree_pids(proxy.pid) if pid != proxy.pid] or [proxy.pid]
        for scenario in scenarios:  # warm-up: pools filled, code paths and key index hot
            run_wrk(ports[scenario], scenario, args.consumers, args.connections, 2.0, run_dir, pids[scenario])
        runs: dict[str, list[dict]] = {scenario: [] for scenario in scenarios}
        for rep in range(args.reps):
            # The order turns each repetition so that drift within one does not favour a scenario.
            turn = rep % len(scenarios)
            for scenario in scenarios[turn:] + scenarios[:turn]:
                runs[scenario].append(run_wrk(ports[scenario], scenario, args.consumers, args.connections,
                                              args.duration, run_dir, pids[scenario]))
        memory = rss_kib(worker_pids[-1])
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as answer:
            server = json.load(answer)["server"]
    finally:
        for process in reversed(processes):
            stop(process)

    plain_rps = statistics.median(r["rps"] for r in runs["plain"])
    nginx_rps = statistics.median(r["rps"] for r in runs[NGINX_SCENARIO]) if NGINX_SCENARIO in runs else None
    plain_cpu = statistics.median(r["cpu_us_per_request"] for r in runs["plain"])
    summary = []
    for scenario, results in runs.items():
        rps = statistics.median(r["rps"] for r in results)
        cpu = statistics.median(r["cpu_us_per_request"] for r in results)
        summary.append({
            "scenario": scenario, "rps": rps, "x_plain": rps / plain_rps,
            "x_nginx": rps / nginx_rps if nginx_rps else None,
            "x_plain_per_rep": [r["rps"] / p["rps"] for r, p in zip(results, runs["plain"])],
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "cpu_us_per_request": cpu, "cpu_us_over_plain": cpu - plain_cpu,
            "errors": sum(r["errors"] for r in results),
        })
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": vars(args) | {"out": str(args.out)},
        "generator": runs["plain"][0]["generator"],
        "config_load_seconds": load_seconds, "worker_memory_kib": memory,
        "redis_checks": server.get("redis_checks", 0), "redis_writes": server.get("redis_writes", 0),
        "summary": summary, "runs": runs,
    }
    lines = [
        f"# key-auth + acl (+ rate-limiting-advanced), {args.consumers:,} consumers (half the keys given as sha256)"
        f" — {report['when']}",
        "",
        f"Load: {report['generator']}, {args.connections} connections, {args.reps} x {args.duration:g} s per scenario "
        f"(the order turning each repetition). Gateway: 1 worker on core 0, up in {load_seconds:.1f} s, worker RSS "
        f"{memory.get('VmRSS', 0) / 1024:.1f} MiB.",
        "",
        "| scenario | req/s | x plain | x plain per rep | x nginx | p50 ms | p99 ms | CPU us/req | us over plain | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        x_nginx = "–" if row["x_nginx"] is None else f"{row['x_nginx']:.3f}"
        lines.append(
            f"| {row['scenario']} | {row['rps']:,.0f} | {row['x_plain']:.3f} | "
            f"{', '.join(f'{x:.2f}' for x in row['x_plain_per_rep'])} | "
            f"{x_nginx} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['cpu_us_per_request']:.1f} | {row['cpu_us_over_plain']:+.1f} | {row['errors']} |"
        )
    if report["redis_writes"]:
        lines += ["", f"Redis: {report['redis_checks']:,} checks in {report['redis_writes']:,} writes "
                      f"({report['redis_checks'] / report['redis_writes']:.1f} checks per write: the round trips "
                      f"of concurrent requests are pipelined)."]
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"auth-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"auth-{stamp}.md").write_text(markdown)
    print(markdown)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
