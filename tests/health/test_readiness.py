"""Readiness probes over real HTTP: what a /health answer, a refused connection and a silent server mean."""

import asyncio

from aiohttp import web

from epp.datastore import Endpoint
from epp.endpoint_health.policy import ReadinessPolicy
from epp.endpoint_health.readiness import ReadinessProber, judge, parse_instances
from tests.conftest import async_wait_until, free_port


def test_judge_reads_the_proxys_instance_view():
    proxy = b'{"healthy": false, "prefill": {"http://p:1": true}, "decode": {"http://d:1": false}}'
    v = judge("/health", 503, proxy)
    assert not v.ok and v.definitive and v.instances == {"prefill": (1, 1), "decode": (0, 1)}
    assert v.detail == "/health answered 503: no healthy instance: decode 0/1 up"
    # a 200 that says no decode is up is still unready
    v = judge("/health", 200, b'{"instances": [{"role": "decode", "url": "d1", "up": false}, {"role": "prefill", "url": "p", "up": true}]}')
    assert not v.ok and v.detail == "no healthy instance: decode 0/1 up"
    v = judge("/health", 200, b'{"prefill": [{"url": "p", "healthy": true}], "decode": {"a": true, "b": false}}')
    assert v.ok and v.instances == {"prefill": (1, 1), "decode": (1, 2)}
    assert judge("/health", 200, b"").ok and judge("/health", 404, b"not found").ok  # vLLM: empty 200; no route: reachable
    assert judge("/health", 500, b'{"error": {"message": "engine dead: IndexError"}}').detail == "/health answered 500: engine dead: IndexError"
    assert parse_instances(b"[1, 2]") == {} and parse_instances(b"\xff") == {}
    # both shapes side by side (the proxy's maps and its detailed list): counted once
    both = (b'{"healthy": true, "prefill": {"p": true}, "decode": {"d1": true, "d2": false}, "instances": ['
            b'{"role": "prefill", "url": "p", "up": true, "state": "up"}, {"role": "decode", "url": "d1", "up": true, "state": "up"},'
            b'{"role": "decode", "url": "d2", "up": false, "state": "ejected"}]}')
    assert parse_instances(both) == {"prefill": (1, 1), "decode": (1, 2)}


async def test_prober_against_live_servers():
    state = {"status": 200, "body": b'{"healthy": true, "prefill": {"p": true}, "decode": {"d": true}}', "delay": 0.0}

    async def health(request):
        await asyncio.sleep(state["delay"])
        return web.Response(status=state["status"], body=state["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port, dead = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    up = Endpoint("up", "127.0.0.1", port)
    down = Endpoint("down", "127.0.0.1", dead)
    seen = {}
    prober = ReadinessProber(ReadinessPolicy(interval=0.2, timeout=0.3), lambda ep, v: seen.__setitem__(ep.key, v), lambda: [up, down])
    await prober.start()
    try:
        assert await async_wait_until(lambda: "up" in seen and "down" in seen, timeout=5)
        assert seen["up"].ok and seen["up"].instances == {"prefill": (1, 1), "decode": (1, 1)}
        assert not seen["down"].ok and seen["down"].definitive and "cannot connect" in seen["down"].detail
        state.update(status=503, body=b'{"healthy": false, "prefill": {"p": true}, "decode": {"d": false}}')
        seen.clear()
        prober.probe_soon("up")  # asked for: answered well before the 0.2 s interval would come round... or with it
        assert await async_wait_until(lambda: "up" in seen, timeout=2)
        assert not seen["up"].ok and seen["up"].definitive and seen["up"].instances["decode"] == (0, 1)
        state.update(status=200, delay=1.0)
        seen.clear()
        assert await async_wait_until(lambda: "up" in seen, timeout=3)
        assert not seen["up"].ok and not seen["up"].definitive and "no answer from /health within 0.3s" == seen["up"].detail
    finally:
        await prober.stop()
        await runner.cleanup()
