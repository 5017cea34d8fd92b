"""The simulator's engine: what real engines do that the predicted-latency scorer does not model."""

import asyncio
import statistics
import time

import pytest

from vllm_sim.engine import Engine, LatencyModel
from vllm_sim.faults import EngineDeadError


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


def test_a_dead_engine_fails_every_sequence_at_once_running_or_waiting():
    async def run():
        engine = Engine(LatencyModel(decode_ms_per_token=5.0, max_num_seqs=2))
        tasks = [asyncio.create_task(generate(engine, 50, 1000)) for _ in range(3)]  # two run, one waits for a slot
        await asyncio.sleep(0.05)
        assert engine.num_running == 2 and engine.num_waiting == 1
        t0 = time.monotonic()
        engine.faults.die("IndexError: list index out of range")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert time.monotonic() - t0 < 0.5
        assert [type(r).__name__ for r in results] == ["EngineDeadError"] * 3 and all("IndexError" in str(r) for r in results)
        assert engine.used_blocks == 0 and engine.num_running == 0 and engine.num_waiting == 0
        with pytest.raises(EngineDeadError):
            engine.submit(10, 10)

    asyncio.run(run())


def test_a_hung_engine_stalls_every_sequence():
    async def run():
        engine = Engine(LatencyModel(decode_ms_per_token=2.0))
        tasks = [asyncio.create_task(generate(engine, 20, 1000)) for _ in range(2)]
        await asyncio.sleep(0.05)
        engine.faults.hang()
        steps = engine.steps
        done, _ = await asyncio.wait(tasks, timeout=0.5)
        assert not done and engine.steps <= steps + 1, "no step ends while the engine hangs"
        late = asyncio.create_task(generate(engine, 20, 2))  # a new request queues and stalls too
        done, _ = await asyncio.wait([late], timeout=0.3)
        assert not done
        engine.faults.die("the operator gave up")  # death still reaches the stalled sequences
        results = await asyncio.gather(*tasks, late, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results)

    asyncio.run(run())
