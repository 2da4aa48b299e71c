"""A mock OpenAI-style upstream: `GET /v1/models` and `POST /v1/chat/completions` (JSON, or with
`"stream": true` a server-sent-event stream of chunks ending in `data: [DONE]`).

Run alone: `python -m fastgate.demo.upstream [PORT]` (default 8900).
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec
from aiohttp import web

MODEL = "fastgate-mock-1"
# Spacing of the streamed chunks, like a model producing about 20 tokens per second.
STREAM_INTERVAL_SECONDS = 0.05
MAX_REQUEST_BYTES = 1024 * 1024


def _reply_words(messages: list) -> list[str]:
    last = next((m.get("content", "") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    text = f"You said: {last}" if isinstance(last, str) and last else "Hello from the fastgate mock model."
    return text.split(" ")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fastgate"}]}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        return _error(400, "the body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "'messages' must be a list")
    words = _reply_words(body["messages"])
    created = int(time.time())
    completion_id = f"chatcmpl-{created}"
    model = body.get("model") or MODEL
    if not body.get("stream"):
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": len(words) + 1},
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index, word in enumerate(words):
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word if index == 0 else " " + word}, "finish_reason": None}],
        }
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
        await asyncio.sleep(STREAM_INTERVAL_SECONDS)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def make_app() -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def start(host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8900, access_log=None)
