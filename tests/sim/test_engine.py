"""The simulator's engine: what real engines do that the predicted-latency scorer does not model."""

import asyncio
import statistics
import time

from vllm_sim.engine import Engine, LatencyModel


async def generate(engine: Engine, prompt: int, tokens: int, cached: int = 0) -> list[float]:
    """Times of each generated token."""
    seq = engine.submit(prompt, tokens, cached)
    times = []
    try:
        for _ in range(tokens):
            await engine.next_token(seq)
            times.append(time.monotonic())
    finally:
        engine.release(seq)
    return times


def test_kv_capacity_runs_out_and_sequences_are_preempted_then_finish():
    async def run():
        engine = Engine(LatencyModel(decode_ms_per_token=0.5, num_gpu_blocks=10, block_size=16, prefill_tokens_per_second=1e6))
        done = await asyncio.gather(*(generate(engine, 40, 40) for _ in range(3)))  # 3 × 5 blocks > 10
        assert [len(t) for t in done] == [40, 40, 40]
        assert engine.preemptions > 0
        assert engine.used_blocks == 0 and engine.num_running == 0 and engine.num_waiting == 0

    asyncio.run(run())


def test_a_prefill_in_the_same_step_slows_the_decodes():
    async def run():
        engine = Engine(LatencyModel(decode_ms_per_token=1.0, prefill_tokens_per_second=10_000, max_num_batched_tokens=500))
        decode = asyncio.create_task(generate(engine, 10, 60))
        await asyncio.sleep(0.02)
        await generate(engine, 2000, 1)  # 4 chunks of ~500 tokens, 50 ms each, sharing steps with the decode
        times = await decode
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert sum(1 for g in gaps if g >= 0.045) >= 3, "decode tokens in steps with a prefill chunk take the chunk's time"

    asyncio.run(run())


def test_a_loaded_prompt_skips_its_prefill():
    async def run():
        engine = Engine(LatencyModel(prefill_tokens_per_second=100.0, decode_ms_per_token=1.0))
        t0 = time.monotonic()
        await generate(engine, 1000, 2, cached=1000)  # computing it would take 10 s
        assert time.monotonic() - t0 < 5

    asyncio.run(run())


def test_speed_noise_has_mean_one_and_slow_phases_slow_down():
    noisy = Engine(LatencyModel(noise=0.5, seed=3))
    samples = [noisy._speed_factor() for _ in range(20000)]
    assert abs(statistics.fmean(samples) - 1.0) < 0.03 and statistics.pstdev(samples) > 0.3
    slow = Engine(LatencyModel(slow_every=1.0, slow_for=1.0, slow_factor=4.0))  # always in a slow phase
    assert slow._speed_factor() == 4.0
