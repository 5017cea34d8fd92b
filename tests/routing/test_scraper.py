"""The metrics scraper against real HTTP servers: vLLM names, proxy series, slow and dead endpoints."""

import asyncio
import time

from aiohttp import web

from epp.datastore import Datastore, Endpoint
from epp.scrape import MetricsScraper, parse_metrics
from tests.conftest import async_wait_until, free_port

VLLM = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.3
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1.0
"""
PROXY = """# TYPE pdproxy_in_flight_requests gauge
pdproxy_in_flight_requests{kv_backend="nvlink"} 7.0
# TYPE pdproxy_prefill_tokens_per_second gauge
pdproxy_prefill_tokens_per_second{kv_backend="nvlink"} 15000.0
# TYPE pdproxy_kv_transfer_profile_seconds gauge
pdproxy_kv_transfer_profile_seconds{blocks="1",kv_backend="nvlink"} 0.001
pdproxy_kv_transfer_profile_seconds{blocks="64",kv_backend="nvlink"} 0.004
# TYPE pdproxy_kv_block_tokens gauge
pdproxy_kv_block_tokens{kv_backend="nvlink"} 16.0
"""


def test_parse_sums_engines_and_falls_back_to_gpu_cache_usage():
    m = parse_metrics(VLLM + PROXY)
    assert (m.running, m.waiting) == (5.0, 5.0)
    assert m.kv_cache_usage == 0.4  # mean over engines; gpu_cache_usage_perc as the old spelling
    assert (m.block_size, m.num_gpu_blocks) == (16, 4096)
    assert m.proxy_in_flight == 7.0 and m.prefill_tokens_per_second == 15000.0
    assert m.transfer_profile.blocks == (1, 64) and m.transfer_profile.seconds == (0.001, 0.004)
    assert m.transfer_profile.backend == "nvlink"
    newer = parse_metrics(VLLM.replace("gpu_cache_usage_perc", "kv_cache_usage_perc"))
    assert newer.kv_cache_usage == 0.4


async def serve(handler):
    port = free_port()
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_scraper_keeps_scheduling_data_fresh_and_survives_bad_endpoints():
    async def good(request):
        return web.Response(text=VLLM + PROXY)

    async def slow(request):
        await asyncio.sleep(5)
        return web.Response(text=VLLM)

    r1, p1 = await serve(good)
    r2, p2 = await serve(slow)
    ds = Datastore()
    ds.replace_all([Endpoint("good", "127.0.0.1", p1), Endpoint("slow", "127.0.0.1", p2), Endpoint("dead", "127.0.0.1", free_port())])
    scraper = MetricsScraper(ds, interval=0.05, timeout=0.3)
    await scraper.start()
    try:
        assert await async_wait_until(lambda: ds.get("good").metrics.waiting == 5.0, timeout=5)
        assert await async_wait_until(lambda: ds.get("dead").metrics.error is not None and ds.get("slow").metrics.error is not None, timeout=5)
        assert ds.get("good").metrics.age() < 1.0
        assert ds.get("slow").metrics.age() == float("inf")  # never scraped: plugins treat it as stale
        t0 = time.perf_counter()
        ds.endpoints()  # scheduling reads a snapshot: never blocked by the slow endpoint
        assert time.perf_counter() - t0 < 0.01
    finally:
        await scraper.stop()
        await r1.cleanup()
        await r2.cleanup()
