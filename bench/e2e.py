"""End-to-end benchmark: direct upstream, fastgate, nginx and the best-effort aiohttp proxy,
measured side by side in one run (every figure is a ratio from the same run).

    python bench/e2e.py [--duration 5] [--reps 3] [--connections 50] [--rate 10000]
                        [--sse-streams 100] [--out bench/results]

- Upstreams on core 1: nginx serving GET /json (a 200-byte JSON body) on 127.0.0.1:9001 when
  nginx is installed (else bench/sse_upstream.py serves /json), and bench/sse_upstream.py for
  SSE on 127.0.0.1:9002. The ports are the ones ../shared/baselines uses.
- Proxies on core 0, one worker each: fastgate (`fastgate run`, FASTGATE_WORKERS=1), nginx
  `proxy_pass` (when installed), ../shared/baselines/best_proxy.py (when present).
- Load on core 1: wrk -t1 -cC -dD --latency when installed, else bench/loadgen.py; requests/s,
  p50/p99 and the proxy's CPU per request (utime+stime of its process tree from /proc).
  Then an open-loop run at the same offered rate (--rate) for each target, for latency at
  equal load, with bench/loadgen.py --rate.
- SSE: --sse-streams concurrent streams of 20 events 10 ms apart per target (after a warm-up
  round), then 100 streams one at a time on a blocking socket, then 20 one at a time through
  fastgate and nginx while wrk loads them: time to first event, gap distortion
  (|arrival gap - send gap|) and events per read.
- RSS of the fastgate worker after the runs.
Writes <out>/e2e-<UTC time>.json and .md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINES = ROOT.parent / "shared" / "baselines"
JSON_PORT, SSE_PORT = 9001, 9002
CLK_TCK = os.sysconf("SC_CLK_TCK")

NGINX_UPSTREAM = """
worker_processes 1;
pid {run}/upstream.pid;
error_log stderr warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {run}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /json {{
            default_type application/json;
            return 200 '{body}';
        }}
        location / {{ return 404; }}
    }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
pid {run}/proxy.pid;
error_log stderr warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {run}/tmp;
    proxy_temp_path {run}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream up_json {{ server 127.0.0.1:{json_port}; keepalive 64; keepalive_requests 1000000; }}
    upstream up_sse {{ server 127.0.0.1:{sse_port}; keepalive 64; keepalive_requests 1000000; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /sse {{ proxy_pass http://up_sse; proxy_buffering off; proxy_cache off; }}
        location / {{ proxy_pass http://up_json; }}
    }}
}}
"""

GATEWAY = """
_format_version: "3.0"
services:
  - name: json
    url: http://127.0.0.1:{json_port}
    routes: [{{name: json, paths: ["/json"], strip_path: false}}]
  - name: sse
    url: http://127.0.0.1:{sse_port}
    routes: [{{name: sse, paths: ["/sse"], strip_path: false}}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(core: int, command: list[str]) -> list[str]:
    if os.cpu_count() and os.cpu_count() > 1 and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *command]
    return command


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return total / CLK_TCK


def rss_kib(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    return {name: int(re.search(rf"{name}:\s+(\d+)", status).group(1)) for name in ("VmRSS", "VmHWM")}


class Target:
    def __init__(self, name: str, port: int, process: subprocess.Popen | None):
        self.name = name
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_PCT = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_load(target: Target, path: str, connections: int, duration: float, rate: float | None = None) -> dict:
    """Closed loop (wrk or loadgen) or, with `rate`, open loop (loadgen) against `target`."""
    pids = tree_pids(target.process.pid) if target.process else []
    cpu_before = cpu_seconds(pids)
    url = target.url + path
    if rate is None and shutil.which("wrk"):
        out = subprocess.run(pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]),
                             capture_output=True, text=True, check=True).stdout
        percentiles = {p: float(v) * _UNIT[u] for p, v, u in _WRK_PCT.findall(out)}
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        result = {"rps": float(_WRK_RPS.search(out).group(1)), "p50_ms": percentiles["50"],
                  "p99_ms": percentiles["99"], "requests": requests,
                  "errors": int(errors.group(1)) if errors else 0, "generator": "wrk"}
    else:
        command = [sys.executable, str(HERE / "loadgen.py"), url, "--connections", str(connections),
                   "--duration", str(duration)]
        if rate is not None:
            command += ["--rate", str(rate)]
        result = json.loads(subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout)
        result["generator"] = "loadgen (open loop)" if rate else "loadgen"
    cpu = cpu_seconds(pids) - cpu_before
    result["cpu_us_per_request"] = cpu / result["requests"] * 1e6 if pids and result["requests"] else None
    return result


class _StreamReads:
    """Arrival times of the events of one SSE stream, fed read by read."""

    def __init__(self):
        self.sent_at = time.monotonic()
        self.events: list[tuple[float, float]] = []  # (arrival, upstream send time)
        self.max_per_read = 0
        self.tail = b""

    def feed(self, data: bytes) -> bool:
        """Record one read; True once the stream has ended."""
        now = time.monotonic()
        found = re.findall(rb"data: \d+ ([\d.]+)\n\n", data)
        self.max_per_read = max(self.max_per_read, len(found))
        self.events.extend((now, float(t)) for t in found)
        self.tail = (self.tail + data)[-64:]
        return b"[DONE]" in self.tail and (self.tail.endswith(b"\r\n\r\n") or self.tail.endswith(b"\n\n"))

    def result(self) -> dict:
        events = self.events
        gaps = [abs((b[0] - a[0]) - (b[1] - a[1])) * 1000 for a, b in zip(events, events[1:])]
        return {"ttfe_ms": (events[0][0] - self.sent_at) * 1000 if events else None, "events": len(events),
                "gap_distortion_ms": gaps, "max_events_per_read": self.max_per_read}


async def _sse_stream(port: int, path: str) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reads = _StreamReads()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    while (data := await reader.read(65536)) and not reads.feed(data):
        pass
    writer.close()
    return reads.result()


def _sse_stream_blocking(port: int, path: str) -> dict:
    """One stream on a plain blocking socket: no event loop between the kernel and the clock,
    which is what a lone stream's time to first event should measure."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reads = _StreamReads()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        while (data := sock.recv(65536)) and not reads.feed(data):
            pass
    return reads.result()


def run_sse(port: int, streams: int, events: int = 20, interval: float = 0.01, one_at_a_time: bool = False) -> dict:
    """`streams` SSE streams at once (or one after the other), each `events` events apart by
    `interval` s: time to first event, gap distortion, events per read."""
    path = f"/sse?n={events}&interval={interval}"

    async def all_streams():
        return await asyncio.gather(*(_sse_stream(port, path) for _ in range(streams)))

    if one_at_a_time:
        results = [_sse_stream_blocking(port, path) for _ in range(streams)]
    else:
        results = asyncio.run(all_streams())
    ttfe = sorted(r["ttfe_ms"] for r in results if r["ttfe_ms"] is not None)
    gaps = sorted(g for r in results for g in r["gap_distortion_ms"])

    def pct(values, fraction):
        return values[min(len(values) - 1, int(len(values) * fraction))] if values else None

    return {
        "streams": streams,
        "intact_streams": sum(r["events"] == events for r in results),
        "ttfe_p50_ms": pct(ttfe, 0.5), "ttfe_p99_ms": pct(ttfe, 0.99),
        "gap_distortion_p50_ms": pct(gaps, 0.5), "gap_distortion_p99_ms": pct(gaps, 0.99),
        "max_events_per_read": max(r["max_events_per_read"] for r in results),
    }


def start_nginx_proxy(nginx: str, run_dir: Path, json_port: int) -> tuple[int, subprocess.Popen]:
    """nginx as the reference reverse proxy, one worker on core 0: its port and process."""
    proxy_port = free_port()
    (run_dir / "proxy.conf").write_text(
        NGINX_PROXY.format(run=run_dir, port=proxy_port, json_port=json_port, sse_port=SSE_PORT))
    proxy = start(pinned(0, [nginx, "-p", str(run_dir), "-e", "stderr", "-c", str(run_dir / "proxy.conf"),
                             "-g", "daemon off;"]))
    wait_port(proxy_port)
    return proxy_port, proxy


def start(command: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    # 5,000 req/s is what bench/loadgen.py itself sustains with room to spare on one core.
    parser.add_argument("--rate", type=float, default=5000.0, help="offered req/s for the equal-load latency run")
    parser.add_argument("--sse-streams", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="fastgate-bench-"))
    (run_dir / "tmp").mkdir()
    processes: list[subprocess.Popen] = []
    targets: list[Target] = []
    nginx = shutil.which("nginx")
    try:
        from bench.sse_upstream import JSON_BODY

        processes.append(start(pinned(1, [sys.executable, str(HERE / "sse_upstream.py"), str(SSE_PORT)])))
        json_port = SSE_PORT
        if nginx:
            (run_dir / "upstream.conf").write_text(
                NGINX_UPSTREAM.format(run=run_dir, port=JSON_PORT, body=JSON_BODY.decode()))
            processes.append(start(pinned(1, [nginx, "-p", str(run_dir), "-e", "stderr", "-c",
                                              str(run_dir / "upstream.conf"), "-g", "daemon off;"])))
            json_port = JSON_PORT
            wait_port(JSON_PORT)
        wait_port(SSE_PORT)
        targets.append(Target("direct", json_port, None))

        gateway_port, admin_port = free_port(), free_port()
        (run_dir / "gateway.yaml").write_text(GATEWAY.format(json_port=json_port, sse_port=SSE_PORT))
        env = dict(os.environ, FASTGATE_WORKERS="1", FASTGATE_PROXY_LISTEN=f"127.0.0.1:{gateway_port}",
                   FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin_port}", FASTGATE_LOG_LEVEL="warning")
        gateway = start(pinned(0, [sys.executable, "-m", "fastgate", "run", "--config", str(run_dir / "gateway.yaml")]),
                        env=env, log=run_dir / "gateway.log")
        processes.append(gateway)
        wait_port(gateway_port)
        targets.append(Target("fastgate", gateway_port, gateway))

        if nginx:
            proxy_port, proxy = start_nginx_proxy(nginx, run_dir, json_port)
            processes.append(proxy)
            targets.append(Target("nginx", proxy_port, proxy))
        best = BASELINES / "best_proxy.py"
        if best.exists() and json_port == JSON_PORT:
            best_port = free_port()
            process = start(pinned(0, [sys.executable, str(best), str(best_port)]))
            processes.append(process)
            wait_port(best_port)
            targets.append(Target("aiohttp best-effort", best_port, process))

        for target in targets:  # warm-up: pools filled, code paths hot
            run_load(target, "/json", args.connections, 2.0)
        closed: dict[str, list[dict]] = {t.name: [] for t in targets}
        for _ in range(args.reps):
            for target in targets:
                closed[target.name].append(run_load(target, "/json", args.connections, args.duration))
        open_loop = {t.name: run_load(t, "/json", args.connections, args.duration, rate=args.rate)
                     for t in targets if t.name in ("direct", "fastgate", "nginx")}
        sse, sse_lone = {}, {}
        for target in targets:
            if target.name in ("direct", "fastgate", "nginx"):
                port = SSE_PORT if target.name == "direct" else target.port
                run_sse(port, args.sse_streams)  # warm-up: the proxies' upstream pools fill
                sse[target.name] = run_sse(port, args.sse_streams)
                sse_lone[target.name] = run_sse(port, 100, events=5, one_at_a_time=True)

        worker_pid = [p for p in tree_pids(gateway.pid) if p != gateway.pid][-1]
        sse_loaded = {}
        for target in targets:
            if target.name not in ("fastgate", "nginx"):
                continue
            loaded = subprocess.Popen(
                pinned(1, ["wrk", "-t1", f"-c{args.connections}", "-d6s", target.url + "/json"])
                if shutil.which("wrk") else
                pinned(1, [sys.executable, str(HERE / "loadgen.py"), target.url + "/json", "--duration", "6"]),
                stdout=subprocess.DEVNULL)
            time.sleep(1.0)
            sse_loaded[target.name] = run_sse(target.port, 20, events=5, one_at_a_time=True)
            loaded.wait()
        memory = rss_kib(worker_pid)
    finally:
        for process in reversed(processes):
            stop(process)

    summary = []
    nginx_rps = median_of(closed.get("nginx", []), "rps")
    direct_rps = median_of(closed["direct"], "rps")
    for name, runs in closed.items():
        rps = median_of(runs, "rps")
        summary.append({
            "target": name, "rps": rps, "rps_min": min(r["rps"] for r in runs), "rps_max": max(r["rps"] for r in runs),
            "x_nginx": rps / nginx_rps if nginx_rps else None, "x_direct": rps / direct_rps,
            "p50_ms": median_of(runs, "p50_ms"), "p99_ms": median_of(runs, "p99_ms"),
            "cpu_us_per_request": median_of(runs, "cpu_us_per_request"), "errors": sum(r["errors"] for r in runs),
        })
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": vars(args) | {"out": str(args.out)},
        "generator": closed["direct"][0]["generator"],
        "closed_loop": summary, "closed_loop_runs": closed, "open_loop": open_loop,
        "sse": sse, "sse_one_at_a_time": sse_lone, "sse_under_full_load": sse_loaded, "fastgate_worker_memory_kib": memory,
    }
    markdown = render(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"e2e-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"e2e-{stamp}.md").write_text(markdown)
    print(markdown)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _f(value, digits=2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def render(report: dict) -> str:
    lines = [
        f"## fastgate end-to-end benchmark ({report['when']})",
        "",
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}; load generator: "
        f"{report['generator']}; GET /json, {report['settings']['connections']} connections, "
        f"{report['settings']['duration']} s x {report['settings']['reps']} interleaved repetitions (median).",
        "",
        "| target | req/s | min–max | × nginx | × direct | p50 ms | p99 ms | proxy CPU µs/req | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["closed_loop"]:
        lines.append(
            f"| {row['target']} | {_f(row['rps'], 0)} | {_f(row['rps_min'], 0)}–{_f(row['rps_max'], 0)} | "
            f"{_f(row['x_nginx'], 3)} | {_f(row['x_direct'], 3)} | {_f(row['p50_ms'])} | {_f(row['p99_ms'])} | "
            f"{_f(row['cpu_us_per_request'], 1)} | {row['errors']} |")
    lines += ["", f"Open loop at {report['settings']['rate']:,.0f} req/s offered (bench/loadgen.py --rate):", "",
              "| target | achieved req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name, row in report["open_loop"].items():
        lines.append(f"| {name} | {_f(row['rps'], 0)} | {_f(row['p50_ms'])} | {_f(row['p99_ms'])} |")
    lines += ["", f"SSE: {report['settings']['sse_streams']} concurrent streams x 20 events 10 ms apart (asyncio "
              "client); one stream at a time: 100 (20 under load) streams x 5 events on a blocking socket:", "",
              "| target | intact | TTFE p50 ms | TTFE p99 ms | gap distortion p50 ms | p99 ms | max events/read |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    rows = (list(report["sse"].items())
            + [(f"{name}, one stream at a time", row) for name, row in report["sse_one_at_a_time"].items()]
            + [(f"{name} under full load (wrk -c50), one stream at a time", row)
               for name, row in report["sse_under_full_load"].items()])
    for name, row in rows:
        lines.append(f"| {name} | {row['intact_streams']}/{row['streams']} | {_f(row['ttfe_p50_ms'])} | "
                     f"{_f(row['ttfe_p99_ms'])} | {_f(row['gap_distortion_p50_ms'])} | "
                     f"{_f(row['gap_distortion_p99_ms'])} | {row['max_events_per_read']} |")
    memory = report["fastgate_worker_memory_kib"]
    lines += ["", f"fastgate worker memory after the runs: RSS {memory['VmRSS'] / 1024:.1f} MiB, "
                  f"peak {memory['VmHWM'] / 1024:.1f} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
