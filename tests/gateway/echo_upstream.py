"""A model-server stand-in for gateway tests: answers what it received, streams SSE on request.

`python -m tests.gateway.echo_upstream --port P --name N`. Every answer names the server and
echoes the method, path, body length and headers it saw, so a test can tell where Envoy sent a
request and what reached it; `{"stream": true, "events": n, "gap": s}` streams n SSE events s apart; `GET /_answered` counts the
requests it answered (a server outside the pool must stay at 0).
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web


def app(name: str, port: int) -> web.Application:
    answered = {"requests": 0}

    async def answer(request: web.Request) -> web.StreamResponse:
        answered["requests"] += 1
        raw = await request.read()
        seen = {"from": name, "port": port, "method": request.method, "path": request.path, "len": len(raw),
                "headers": {k.lower(): v for k, v in request.headers.items()}}
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {}
        if isinstance(body, dict) and body.get("stream") is True:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: " + orjson.dumps(seen) + b"\n\n")
            for i in range(int(body.get("events", 3))):
                await asyncio.sleep(float(body.get("gap", 0.01)))
                await resp.write(b'data: {"n": %d}\n\n' % i)
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response(seen)

    a = web.Application(client_max_size=256 * 1024 * 1024)
    a.router.add_get("/health", lambda r: web.Response(text="ok"))
    a.router.add_get("/_answered", lambda r: web.json_response(answered))  # asked directly, never through Envoy
    a.router.add_route("*", "/{tail:.*}", answer)
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    web.run_app(app(args.name, args.port), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
