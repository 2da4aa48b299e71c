"""Upstream servers for the integration tests, run as their own process:

    python tests/integration/upstream_server.py HTTP_PORT RAW_PORT

HTTP_PORT serves an aiohttp app (echo, SSE, large bodies, slow answers, any status);
RAW_PORT a raw asyncio server for what a well-behaved framework will not send
(close-delimited bodies, death mid-body, garbage, stale keep-alive connections, interim
responses, a body never read, an answer before the body).
It prints "ready" once both listen.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time

from aiohttp import web

CHUNK = 64 * 1024


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body": body.decode("latin-1"),
            "version": f"{request.version.major}.{request.version.minor}",
        }
    )


STREAM_STATES: dict[str, str] = {}


async def sse(request: web.Request) -> web.StreamResponse:
    """`n` events `interval` s apart, each carrying its send time (time.monotonic, which is
    system-wide on Linux). With `token`, the stream's fate is kept for /sse-state."""
    count = int(request.query.get("n", "5"))
    interval = float(request.query.get("interval", "0.05"))
    token = request.query.get("token")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    if token:
        STREAM_STATES[token] = "streaming"
    try:
        for index in range(count):
            await response.write(b"data: %d %.6f\n\n" % (index, time.monotonic()))
            await asyncio.sleep(interval)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        if token:
            STREAM_STATES[token] = "aborted"
        raise
    if token:
        STREAM_STATES[token] = "completed"
    return response


async def sse_state(request: web.Request) -> web.Response:
    return web.json_response({"state": STREAM_STATES.get(request.query["token"], "unknown")})


BIG_SENT: dict[str, int] = {}


async def big(request: web.Request) -> web.StreamResponse:
    """`size` bytes; each write waits for the socket to drain, so a reader that stops stalls
    this handler (TCP flow control). With `token`, the bytes written so far are kept for
    /big-state."""
    size = int(request.query.get("size", str(10 * 1024 * 1024)))
    token = request.query.get("token")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("length") == "1":
        response.content_length = size
    await response.prepare(request)
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < size:
        piece = block[: min(CHUNK, size - sent)]
        await response.write(piece)
        sent += len(piece)
        if token:
            BIG_SENT[token] = sent
    await response.write_eof()
    return response


async def big_state(request: web.Request) -> web.Response:
    return web.json_response({"sent": BIG_SENT.get(request.query["token"], 0)})


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for piece in request.content.iter_any():
        digest.update(piece)
        size += len(piece)
    return web.json_response({"size": size, "sha256": digest.hexdigest(), "chunked": request.headers.get("Transfer-Encoding")})


async def slow_upload(request: web.Request) -> web.Response:
    """Like /upload, but stops reading for `pause` s once `after` bytes came in, so the
    gateway's writes back up (TCP flow control) while the client goes on sending."""
    pause = float(request.query.get("pause", "2"))
    after = int(request.query.get("after", str(1024 * 1024)))
    digest = hashlib.sha256()
    size = 0
    paused = False
    async for piece in request.content.iter_any():
        digest.update(piece)
        size += len(piece)
        if not paused and size >= after:
            paused = True
            await asyncio.sleep(pause)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def peer(request: web.Request) -> web.Response:
    """The gateway's side of this connection, as the upstream sees it."""
    host, port = request.transport.get_extra_info("peername")[:2]
    await request.read()
    return web.json_response({"host": host, "port": port})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.json_response({"slept": True})


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def with_server_header(request: web.Request) -> web.Response:
    return web.Response(text="ok", headers={"Server": "upstream/1.0", "Via": "1.1 upstream-proxy"})


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/sse", sse)
    app.router.add_get("/sse-state", sse_state)
    app.router.add_get("/big", big)
    app.router.add_get("/big-state", big_state)
    app.router.add_post("/upload", upload)
    app.router.add_post("/slow-upload", slow_upload)
    app.router.add_route("*", "/peer", peer)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/server-header", with_server_header)
    return app


class RawUpstream(asyncio.Protocol):
    """One behaviour per request path; reads one request head, then misbehaves."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        self.requests = 0
        self.discard = 0  # request body bytes still to come and to be ignored

    def data_received(self, data):
        if self.discard:
            skipped = min(self.discard, len(data))
            self.discard -= skipped
            data = data[skipped:]
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.requests += 1
        path = head.split(b" ", 2)[1].split(b"?")[0]
        write = self.transport.write
        loop = asyncio.get_running_loop()
        if path.endswith(b"/close-delimited"):
            write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of this until EOF")
            self.transport.close()
        elif path.endswith(b"/die-mid-body"):
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten b")
            asyncio.get_running_loop().call_later(0.05, self.transport.abort)
        elif path.endswith(b"/garbage"):
            write(b"THIS IS NOT HTTP\r\n\r\n")
            self.transport.close()
        elif path.endswith(b"/reset-before-headers"):
            self.transport.abort()
        elif path.endswith(b"/early-hints"):
            write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            loop.call_later(0.1, write, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")
        elif path.endswith(b"/no-read"):
            # Takes the request head, then never reads the body nor answers.
            self.transport.pause_reading()
        elif path.endswith(b"/answer-early"):
            # Answers at once (as an upstream refusing an upload does), reads and drops the
            # rest of the body only 0.3 s later, and keeps the connection.
            match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            length = int(match.group(1)) if match else 0
            self.discard = max(0, length - len(self.buffer))
            self.buffer = self.buffer[length:]
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nearly")
            if self.discard:
                self.transport.pause_reading()
                loop.call_later(0.3, self.transport.resume_reading)
        elif path.endswith(b"/stale"):
            # Keep-alive advertised, but a second request on the connection finds it closed,
            # as when an upstream's idle timeout fires just as the gateway reuses it.
            if self.requests == 1:
                write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nfresh")
            else:
                self.transport.close()
        else:
            write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


async def main(http_port: int, raw_port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    loop = asyncio.get_running_loop()
    await loop.create_server(RawUpstream, "127.0.0.1", raw_port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
