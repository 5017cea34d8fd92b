"""The simulator's HTTP side: vLLM's OpenAI routes, /health, /metrics with vLLM's names."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from vllm_sim.engine import Engine, LatencyModel
from vllm_sim.kv_io import KVConfig, KVLoadError, KVSide

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Faults:
    error_rate: float = 0.0  # share of requests answered 500
    hang_rate: float = 0.0  # share of requests that never answer (until the client goes away)
    die_after: int = 0  # decode: engine dies (IndexError) on this request number; then every request fails


@dataclass
class SimConfig:
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    role: str = "both"  # prefill | decode | both
    latency: LatencyModel = field(default_factory=LatencyModel)
    kv: KVConfig = field(default_factory=KVConfig)
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    default_max_tokens: int = 16
    kv_load_failure_policy: str = "fail"  # nixl decode: fail the request, or compute the prompt (vLLM's kv_load_failure_policy)


def prompt_text(body: dict) -> str:
    if "messages" in body:
        return " ".join(m.get("content", "") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
                        for m in body["messages"] if isinstance(m, dict))
    p = body.get("prompt", "")
    return p if isinstance(p, str) else " ".join(map(str, p))


def estimate_tokens(body: dict) -> int:
    p = body.get("prompt")
    if "messages" not in body and isinstance(p, list) and p and isinstance(p[0], int):
        return len(p)
    return max(1, len(prompt_text(body)) // 4)


class Simulator:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg.latency)
        self.kv = KVSide(cfg.role, cfg.kv, cfg.model)
        self.rng = random.Random(cfg.seed)
        self.requests_seen = 0
        self.dead: str | None = None
        r = self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        self.g_running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels, registry=r)
        self.g_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", labels, registry=r)
        self.g_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (0-1).", labels, registry=r)
        self.g_cache_info = Gauge("vllm:cache_config_info", "Cache configuration.", ("block_size", "num_gpu_blocks", "engine"), registry=r)
        self.h_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.h_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.", labels, buckets=E2E_BUCKETS, registry=r)
        self.h_itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", labels, buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28), registry=r)
        self.h_kv_wait = Histogram("vllm:kv_transfer_wait_seconds", "Decode: time waiting for the KV cache.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.c_prompt = Counter("vllm:prompt_tokens", "Prompt tokens.", labels, registry=r)
        self.c_gen = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.c_success = Counter("vllm:request_success", "Finished requests.", (*labels, "finished_reason"), registry=r)
        self.c_by_source = Counter("vllm:prompt_tokens_by_source", "Prompt tokens by source (vLLM's names).", (*labels, "source"), registry=r)
        for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
            self.c_by_source.labels(*(cfg.model, "0"), source)
        self.c_preempt = Counter("vllm:num_preemptions", "Sequences preempted (KV dropped, recomputed later).", labels, registry=r)
        if cfg.kv.backend == "nixl" and cfg.role == "decode":  # NixlConnector's own transfer statistics
            self.h_nixl = Histogram("vllm:nixl_xfer_time_seconds", "NIXL transfer time.", labels, buckets=TTFT_BUCKETS, registry=r)
            self.h_nixl_bytes = Histogram("vllm:nixl_bytes_transferred", "Bytes per NIXL transfer.", labels,
                                          buckets=tuple(2.0 ** k for k in range(11, 34, 2)), registry=r)
        self.g_cache_info.labels(str(cfg.latency.block_size), str(cfg.latency.num_gpu_blocks), "0").set(1)
        self._l = (cfg.model, "0")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(lambda _: self.kv.start())
        app.on_cleanup.append(lambda _: self.kv.close())
        return app

    # -- plain routes ---------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.cfg.model, "object": "model", "owned_by": "vllm-sim"}]})

    async def health(self, request: web.Request) -> web.Response:
        if self.dead:
            return web.Response(status=503, text=f"engine dead: {self.dead}")
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        e = self.engine
        self.g_running.labels(*self._l).set(e.num_running)
        self.g_waiting.labels(*self._l).set(e.num_waiting)
        self.g_kv.labels(*self._l).set(e.kv_cache_usage)
        new = e.preemptions - self.c_preempt.labels(*self._l)._value.get()
        if new > 0:
            self.c_preempt.labels(*self._l).inc(new)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- generation -----------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
        return web.json_response({"error": {"message": message, "type": kind, "code": status}, "object": "error"}, status=status)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        if body.get("model") not in (None, self.cfg.model):
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if self.dead:
            return self._error(500, f"engine dead: {self.dead}", "InternalServerError")
        self.requests_seen += 1
        faults = self.cfg.faults
        if faults.die_after and self.cfg.role != "prefill" and self.requests_seen >= faults.die_after:
            self.dead = "IndexError: list index out of range (in gpu_model_runner while receiving KV)"
            return self._error(500, self.dead, "InternalServerError")
        roll = self.rng.random()
        if roll < faults.error_rate:
            return self._error(500, "injected failure", "InternalServerError")
        if roll < faults.error_rate + faults.hang_rate:
            await asyncio.Event().wait()  # until the client disconnects (aiohttp cancels the handler)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        prompt_tokens = estimate_tokens(body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.cfg.default_max_tokens
        if self.cfg.role == "prefill":
            max_tokens = 1
        max_tokens = int(max_tokens)
        stream = body.get("stream") is True
        params = body.get("kv_transfer_params")
        t0 = time.monotonic()
        engine = self.engine
        held = False
        kv_wait, reply_params, cached = 0.0, None, 0
        skip_kv = request.headers.get("X-KV-Transfer", "").lower() == "none"  # proxy's decode-only fallback
        if self.cfg.role == "decode" and not skip_kv:
            try:
                loaded = await self.kv.load(request_id, prompt_tokens, prompt_text(body), params)
            except KVLoadError as e:
                if self.cfg.kv_load_failure_policy != "recompute":
                    print(f"vllm-sim: failing request {request_id} due to KV load failure (failure_policy=fail): {e}", flush=True)
                    return await self._failed(request, stream, f"KV load failure: {e}")
                loaded = None  # vLLM's recompute policy: the decode computes the prompt
            except (TimeoutError, ValueError) as e:
                return self._error(500, str(e), "InternalServerError")
            if loaded is not None and loaded.tokens:
                cached = loaded.tokens
                kv_wait = loaded.seconds
                self.h_kv_wait.labels(*self._l).observe(kv_wait)
                if self.cfg.kv.backend == "nixl":
                    self.h_nixl.labels(*self._l).observe(loaded.seconds)
                    self.h_nixl_bytes.labels(*self._l).observe(loaded.nbytes)
        try:
            seq = engine.submit(prompt_tokens, max_tokens, cached)
        except ValueError as e:
            return self._error(400, str(e))
        try:
            self.c_by_source.labels(*self._l, "external_kv_transfer").inc(cached)
            self.c_by_source.labels(*self._l, "local_compute").inc(prompt_tokens - cached)
            self.c_prompt.labels(*self._l).inc(prompt_tokens)
            if self.cfg.role == "prefill":
                await engine.next_token(seq)  # the prompt is computed (and its one token sampled)
                self.h_ttft.labels(*self._l).observe(time.monotonic() - t0)
                try:
                    if self.cfg.kv.backend == "nixl":
                        if isinstance(params, dict) and params.get("do_remote_decode"):
                            reply_params = await self.kv.hold(request_id, prompt_tokens, lambda: engine.release(seq))
                            held = True  # the blocks stay in the engine until a decode reads them
                    else:
                        await self.kv.send(request_id, prompt_tokens, prompt_text(body))
                except ValueError as e:
                    return self._error(400, str(e))
            ids = ("chatcmpl-" if chat else "cmpl-") + request_id  # vLLM: no "-0" suffix
            headers = {"x-kv-transfer-seconds": f"{kv_wait:.6f}", "x-request-id": request_id}
            if stream:
                return await self._stream(request, ids, chat, seq, prompt_tokens, cached, t0, headers, body)
            for i in range(max_tokens):
                if i or self.cfg.role != "prefill":
                    await engine.next_token(seq)
                if i == 0 and self.cfg.role != "prefill":
                    self.h_ttft.labels(*self._l).observe(time.monotonic() - t0)
            text = " ".join(f"tok{i}" for i in range(max_tokens))
            self._finish(max_tokens, t0)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat
                      else {"index": 0, "text": text, "finish_reason": "length"})
            return web.json_response({"id": ids, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                                      "model": self.cfg.model, "choices": [choice], "usage": usage, "kv_transfer_params": reply_params},
                                     headers=headers)
        finally:
            if not held:
                engine.release(seq)

    async def _failed(self, request: web.Request, stream: bool, message: str) -> web.StreamResponse:
        """A request vLLM fails with finish_reason `error`: 500, or for a stream an error event, then [DONE]."""
        if not stream:
            return self._error(500, "Internal server error", "InternalServerError")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        err = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}
        await resp.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _stream(self, request, ids, chat, seq, prompt_tokens, cached, t0, headers, body) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await resp.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        max_tokens = seq.max_tokens
        last = time.monotonic()
        for i in range(max_tokens):
            if i or self.cfg.role != "prefill":  # a prefill's one token was sampled with its prompt
                await self.engine.next_token(seq)
            now = time.monotonic()
            if i == 0:
                self.h_ttft.labels(*self._l).observe(now - t0)
            else:
                self.h_itl.labels(*self._l).observe(now - last)
            last = now
            delta = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None} if chat else {"index": 0, "text": f"tok{i} ", "finish_reason": None}
            await resp.write(b"data: " + json.dumps({"id": ids, "object": kind, "model": self.cfg.model, "choices": [delta]}).encode() + b"\n\n")
        final = {"id": ids, "object": kind, "model": self.cfg.model, "choices": [{"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}]}
        if (body.get("stream_options") or {}).get("include_usage", True):
            final["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens,
                              "prompt_tokens_details": {"cached_tokens": cached}}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self._finish(max_tokens, t0)
        return resp

    def _finish(self, tokens: int, t0: float) -> None:
        self.c_gen.labels(*self._l).inc(tokens)
        self.h_e2e.labels(*self._l).observe(time.monotonic() - t0)
        self.c_success.labels(*self._l, "length").inc()
