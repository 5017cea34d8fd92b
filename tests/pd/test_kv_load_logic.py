"""The proxy's pieces that need no processes: NIXL bodies, the token-source check, the shared-storage pruner."""

import os
import time

from pd_proxy import nixl
from pd_proxy.kv_load import KVLoadMonitor
from pd_proxy.shared_storage import prune


def counters(local: float, external: float, block: int = 32, xfer: tuple[float, float] | None = None) -> str:
    lines = [f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="local_compute"}} {local}',
             f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="local_cache_hit"}} 0.0',
             f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="external_kv_transfer"}} {external}',
             f'vllm:cache_config_info{{block_size="{block}",engine="0",num_gpu_blocks="100"}} 1.0']
    if xfer:
        lines += [f'vllm:nixl_xfer_time_seconds_sum{{engine="0",model_name="m"}} {xfer[0]}',
                  f'vllm:nixl_xfer_time_seconds_count{{engine="0",model_name="m"}} {xfer[1]}']
    return "# TYPE vllm:prompt_tokens_by_source_total counter\n" + "\n".join(lines) + "\n"


def monitor():
    windows, transfers = [], []
    return KVLoadMonitor(lambda url, w: windows.append(w), lambda s, n: transfers.append((s, n))), windows, transfers


def test_loaded_prompts_are_not_reported():
    m, windows, _ = monitor()
    m.absorb("d", counters(0, 0), 1.0)
    for t in (100, 64, 20):  # shared storage: whole blocks before the last token loaded, the rest (and a short prompt) computed
        m.started("d")
        m.first_token("d", 1.5, t)
    m.absorb("d", counters(4 + 32 + 20, 96 + 32), 2.0)
    assert windows[-1].recomputed_requests == 0 and windows[-1].recomputed_tokens == 0 and windows[-1].requests == 3


def test_recomputed_prompts_are_counted():
    m, windows, _ = monitor()
    m.absorb("d", counters(0, 0), 1.0)
    for t in (300, 200):
        m.started("d")
        m.first_token("d", 1.5, t)
    m.absorb("d", counters(500, 0), 2.0)
    assert windows[-1].recomputed_requests == 2 and windows[-1].recomputed_tokens > 400
    m.started("d")
    m.first_token("d", 2.5, 320)
    m.started("d")
    m.first_token("d", 2.5, 320)
    m.absorb("d", counters(820, 320), 3.0)  # one of two loaded
    assert windows[-1].recomputed_requests == 1


def test_counters_ahead_of_the_first_token_wait_for_it():
    m, windows, _ = monitor()
    m.absorb("d", counters(0, 0), 1.0)
    m.started("d")
    m.absorb("d", counters(300, 0), 2.0)  # the decode counted the prompt; its first token is not here yet
    assert windows == []
    m.first_token("d", 2.1, 300)
    m.absorb("d", counters(300, 0), 3.0)
    assert windows[-1].recomputed_requests == 1


def test_nixl_transfer_times_are_read():
    m, _, transfers = monitor()
    m.absorb("d", counters(0, 0, xfer=(0.5, 10)), 1.0)
    m.absorb("d", counters(0, 0, xfer=(0.8, 13)), 2.0)
    (seconds, n), = transfers
    assert n == 3 and abs(seconds - 0.1) < 1e-9


def test_nixl_bodies():
    body = {"model": "m", "prompt": "p", "max_tokens": 9, "kv_transfer_params": {"remote_host": "evil"}}
    pb = nixl.prefill_body({"model": "m", "prompt": "p", "max_tokens": 1, "stream": False})
    assert pb["kv_transfer_params"] == nixl.PREFILL_PARAMS and pb["max_tokens"] == 1
    reply = {"kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.1", "remote_block_ids": [[1, 2]]}}
    params = nixl.transfer_params(reply)
    assert nixl.decode_body(body, params)["kv_transfer_params"]["remote_host"] == "10.0.0.1"
    assert "kv_transfer_params" not in nixl.decode_body(body, None) and "kv_transfer_params" not in nixl.recompute_body(body)
    assert nixl.transfer_params({"kv_transfer_params": None}) is None and nixl.transfer_params("junk") is None
    assert nixl.is_error_event(b'data: {"error": {"message": "Internal server error", "code": 500}}\n\ndata: [DONE]\n\n')
    assert not nixl.is_error_event(b'data: {"id": "x", "choices": [{"text": "a"}]}\n\n')


def test_shared_storage_pruner_removes_old_entries(tmp_path):
    old, fresh = tmp_path / "a", tmp_path / "b"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.layers.0.self_attn.attn.safetensors").write_bytes(b"x" * 100)
    past = time.time() - 1000
    os.utime(old / "model.layers.0.self_attn.attn.safetensors", (past, past))
    assert prune(tmp_path, ttl=300) == (1, 100)
    assert not old.exists() and fresh.exists()


def test_a_read_during_the_next_request_keeps_both_apart():
    """Request 1 done, request 2 counted but without its first token: both recomputations are counted once quiet."""
    m, windows, _ = monitor()
    m.absorb("d", counters(0, 0), 1.0)
    m.started("d")
    m.first_token("d", 1.5, 51)
    m.started("d")
    m.absorb("d", counters(51 + 128, 0), 2.0)
    assert windows == []
    m.first_token("d", 2.5, 128)
    m.absorb("d", counters(51 + 128, 0), 3.0)
    assert windows[-1].recomputed_requests == 2 and windows[-1].requests == 2
