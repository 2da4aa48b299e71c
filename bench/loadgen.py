"""A small closed-loop HTTP/1.1 load generator, used by bench/e2e.py when wrk is not installed.

    python bench/loadgen.py URL --connections 50 --duration 5 [--rate R]

Each connection sends a keep-alive GET, waits for the whole response, records the latency,
and sends the next (closed loop). With --rate, the connections together send R requests per
second on a fixed schedule (open loop), and latency counts from each request's scheduled
time, so a stall is not hidden by the requests it delayed (coordinated omission). Prints one JSON line: requests, errors, seconds, rps, p50_ms, p99_ms.
Python tops out far below wrk (tens of thousands of requests per second), so its figures
bound what it can measure; the report says which generator was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import httptools


class _Response:
    def __init__(self):
        self.done = False

    def on_message_complete(self):
        self.done = True


async def _connection(host: str, port: int, request: bytes, stop_at: float, latencies: list, errors: list,
                      interval: float | None, first_at: float):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        errors.append(repr(exc))
        return
    scheduled = first_at
    try:
        while time.monotonic() < stop_at:
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            if interval is None:
                started = time.perf_counter()
            else:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                started = time.perf_counter() - max(0.0, time.monotonic() - scheduled)
                scheduled += interval
            writer.write(request)
            while not response.done:
                data = await reader.read(65536)
                if not data:
                    errors.append("closed")
                    return
                parser.feed_data(data)
            latencies.append(time.perf_counter() - started)
            if parser.get_status_code() >= 400:
                errors.append(parser.get_status_code())
    except (OSError, httptools.HttpParserError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


async def run(url: str, connections: int, duration: float, rate: float | None = None) -> dict:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    latencies: list[float] = []
    errors: list = []
    started = time.monotonic()
    stop_at = started + duration
    interval = connections / rate if rate else None
    await asyncio.gather(*(
        _connection(parts.hostname, parts.port or 80, request, stop_at, latencies, errors, interval,
                    started + (interval or 0) * index / connections)
        for index in range(connections)
    ))
    seconds = time.monotonic() - started
    latencies.sort()

    def percentile(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * fraction))] * 1000 if latencies else 0.0

    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, help="open loop: requests per second over all connections")
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(run(args.url, args.connections, args.duration, args.rate))))


if __name__ == "__main__":
    main()
