"""The development gateway in each ext_proc body mode, against a real EPP and real upstream servers."""

import asyncio
import json

import httpx
import pytest
from aiohttp import web

from local_stack.processes import ProcessGroup
from tests.conftest import free_port


async def upstream(port: int, name: str):
    async def completions(request):
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f'data: {{"n": {i}, "from": "{name}"}}\n\n'.encode())
                await asyncio.sleep(0.01)
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"from": name, "model": body["model"], "echo": len(await request.read()),
                                  "x_request_id": request.headers.get("x-request-id"), "dest": request.headers.get("x-gateway-destination-endpoint")})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED"])
async def test_gateway_body_modes(tmp_path, mode):
    up_port, dead_port = free_port(), free_port()
    eps = tmp_path / "eps.yaml"
    eps.write_text(f"endpoints:\n- {{name: up, address: 127.0.0.1, port: {up_port}}}\n")
    runner = await upstream(up_port, "up")
    procs = ProcessGroup(tmp_path / "logs")
    g, h, m, gw = free_port(), free_port(), free_port(), free_port()
    try:
        epp = procs.start("epp", ["epp.cli", "--endpoints-file", str(eps), "--secure-serving=false", "--bind-address", "127.0.0.1",
                                  "--grpc-port", str(g), "--grpc-health-port", str(h), "--metrics-port", str(m), "--config-profile", "proxy-performance"])
        gwc = procs.start("gw", ["dev_gateway.cli", "--port", str(gw), "--epp", f"127.0.0.1:{g}", "--body-mode", mode])
        await asyncio.to_thread(procs.wait_http, epp, f"http://127.0.0.1:{m}/metrics")
        async with httpx.AsyncClient(timeout=30) as c:
            for _ in range(100):
                try:
                    big = "w" * 300_000  # several ext_proc chunks each way
                    r = await c.post(f"http://127.0.0.1:{gw}/v1/completions", json={"model": "m", "prompt": big},
                                     headers={"x-request-id": "gw-1", "x-gateway-destination-endpoint": "6.6.6.6:1"})
                    break
                except httpx.ConnectError:
                    assert gwc.proc.poll() is None
                    await asyncio.sleep(0.1)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["from"] == "up" and body["x_request_id"] == "gw-1"
            assert body["dest"] == f"127.0.0.1:{up_port}", "the client's destination header was overwritten"
            assert body["echo"] == len(json.dumps({"model": "m", "prompt": big}, separators=(",", ":")))  # the body arrived whole
            assert r.headers["x-gateway-destination-endpoint-served"] == f"127.0.0.1:{up_port}"
            async with c.stream("POST", f"http://127.0.0.1:{gw}/v1/completions", json={"model": "m", "prompt": "s", "stream": True}) as s:
                lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
            assert lines == ['data: {"n": 0, "from": "up"}', 'data: {"n": 1, "from": "up"}', 'data: {"n": 2, "from": "up"}', "data: [DONE]"]
            bad = await c.post(f"http://127.0.0.1:{gw}/v1/completions", content=b"nope")
            assert bad.status_code == 400 and bad.text.startswith("inference error: BadRequest")
    finally:
        procs.stop()
        await runner.cleanup()


async def test_several_destinations_and_fallback_on_connection_failure(tmp_path):
    """The EPP returns two endpoints (comma list, primary first); the gateway falls back when the first refuses."""
    up_port, dead_port = free_port(), free_port()
    eps = tmp_path / "eps.yaml"
    eps.write_text(f"endpoints:\n- {{name: dead, address: 127.0.0.1, port: {dead_port}}}\n- {{name: up, address: 127.0.0.1, port: {up_port}}}\n")
    # endpoint health off: it would leave the dead endpoint out, and this is about the gateway's fallback
    cfg = "plugins:\n- {type: random-picker, parameters: {maxNumOfEndpoints: 2}}\n- {type: endpoint-health, parameters: {enabled: false}}\n"
    runner = await upstream(up_port, "up")
    procs = ProcessGroup(tmp_path / "logs")
    g, h, m, gw = free_port(), free_port(), free_port(), free_port()
    try:
        epp = procs.start("epp", ["epp.cli", "--endpoints-file", str(eps), "--secure-serving=false", "--bind-address", "127.0.0.1",
                                  "--grpc-port", str(g), "--grpc-health-port", str(h), "--metrics-port", str(m), "--config-text", cfg])
        gwc = procs.start("gw", ["dev_gateway.cli", "--port", str(gw), "--epp", f"127.0.0.1:{g}"])
        await asyncio.to_thread(procs.wait_http, epp, f"http://127.0.0.1:{m}/metrics")
        served = set()
        async with httpx.AsyncClient(timeout=30) as c:
            for i in range(12):
                for _ in range(100):
                    try:
                        r = await c.post(f"http://127.0.0.1:{gw}/v1/completions", json={"model": "m", "prompt": f"p{i}"})
                        break
                    except httpx.ConnectError:
                        assert gwc.proc.poll() is None
                        await asyncio.sleep(0.1)
                assert r.status_code == 200 and r.json()["from"] == "up"
                assert set(r.json()["dest"].split(",")) == {f"127.0.0.1:{dead_port}", f"127.0.0.1:{up_port}"}
                served.add(r.headers["x-gateway-destination-endpoint-served"])
        assert served == {f"127.0.0.1:{up_port}"}, "requests whose primary was dead were served by the next endpoint"
    finally:
        procs.stop()
        await runner.cleanup()
