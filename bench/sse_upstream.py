"""SSE upstream for the end-to-end benchmark: `GET /sse?n=N&interval=S` sends N events S
seconds apart, each carrying its send time (time.monotonic(), system-wide on Linux), then
`data: [DONE]`. Also `GET /json` (the small JSON body) for when nginx is not installed.

    python bench/sse_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import web

JSON_BODY = (
    b'{"id":"req-7f3c2a9e-1b4d-4e8a-9c6f-2d5b8e1a0f37","service":"upstream","status":"ok",'
    b'"version":"1.4.2","items":[{"k":"alpha","v":1},{"k":"beta","v":2},{"k":"gamma","v":3}],'
    b'"ts":1700000000,"pad":"xxxx"}'
)


async def sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("n", "20"))
    interval = float(request.query.get("interval", "0.01"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index in range(count):
        await response.write(b"data: %d %.6f\n\n" % (index, time.monotonic()))
        await asyncio.sleep(interval)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def json_body(request: web.Request) -> web.Response:
    return web.Response(body=JSON_BODY, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_get("/json", json_body)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    main()
