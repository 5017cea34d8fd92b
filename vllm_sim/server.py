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

from kv_transfer import KVTransferError
from vllm_sim.engine import Engine, LatencyModel, Seq
from vllm_sim.faults import SEED_CRASH, EngineDeadError
from vllm_sim.kv_events import KVEventPublisher, KVEventsConfig
from vllm_sim.kv_io import KVConfig, KVLoadError, KVSide, Loaded
from vllm_sim.prefix_cache import BlockPool, prompt_token_ids

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Faults:
    error_rate: float = 0.0  # share of requests answered 500
    hang_rate: float = 0.0  # share of requests that never answer (until the client goes away)
    die_after: int = 0  # the engine dies (the seed's IndexError) on this request number: see vllm_sim/faults.py
    hang_after: int = 0  # the whole engine hangs on this request number
    keep_alive_on_death: bool = False  # vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH: stay up (answering 500) instead of exiting
    death_exit_after: float = 5.0  # vLLM's watchdog period: the server exits this long after the engine died


@dataclass
class SimConfig:
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    role: str = "both"  # prefill | decode | both
    latency: LatencyModel = field(default_factory=LatencyModel)
    kv: KVConfig = field(default_factory=KVConfig)
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    default_max_tokens: int = 16
    prefix_caching: bool = True
    kv_events: KVEventsConfig | None = None
    kv_load_failure_policy: str = "fail"  # nixl decode: fail the request, or compute the prompt (vLLM's kv_load_failure_policy)


@dataclass(eq=False)
class Reply:
    """One request in generation: its sequence, and where its prompt's KV came from."""

    seq: Seq
    prompt_tokens: int
    cached: int  # prompt tokens loaded over the KV connector
    hit: int  # prompt tokens found in this instance's prefix cache
    cache_key: str
    t0: float


class Simulator:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg.latency)
        self.kv = KVSide(cfg.role, cfg.kv, cfg.model)
        self.rng = random.Random(cfg.seed)
        self.requests_seen = 0
        self.shutdown = asyncio.Event()  # set to stop serving: a signal, or the watchdog after engine death
        self.exit_code = 0
        self.engine.faults.on_death(self._engine_died)
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
        self.events = KVEventPublisher(cfg.kv_events) if cfg.kv_events is not None else None
        self.cache = (BlockPool(cfg.latency.num_gpu_blocks, cfg.latency.block_size, self.events.publish if self.events else None)
                      if cfg.prefix_caching else None)
        self.c_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels, registry=r)
        self.c_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels, registry=r)

    @property
    def dead(self) -> str | None:
        return self.engine.faults.dead

    def _engine_died(self, reason: str) -> None:
        f = self.cfg.faults
        print(f"vllm-sim: EngineCore encountered a fatal error: {reason}; the engine is dead (EngineDeadError)"
              + ("" if f.keep_alive_on_death else f", shutting down in {f.death_exit_after:g}s"), flush=True)
        if not f.keep_alive_on_death:
            asyncio.get_running_loop().call_later(f.death_exit_after, self._exit, 1)

    def _exit(self, code: int) -> None:
        self.exit_code = code
        self.shutdown.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._json_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_post("/admin/link", self.admin_link)
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

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if self.cache is None:
            return web.Response(text="prefix caching is disabled")
        if not self.cache.reset():
            return self._error(409, "prefix cache not reset: running requests still hold blocks; retry when idle", "ConflictError")
        return web.Response(text="")

    async def admin_link(self, request: web.Request) -> web.Response:
        """The simulated fabric changes at run time: scale one peer link's bandwidth (1 restores it)."""
        try:
            body = await request.json()
            peer, factor = str(body["peer"]), float(body["bandwidth_factor"])
        except (ValueError, KeyError, TypeError):
            return self._error(400, 'expected {"peer": "HOST:PORT", "bandwidth_factor": F}')
        link = self.cfg.kv.peer_links.get(peer)
        if link is None:
            return self._error(404, f"no --peer-link for {peer}; known: {', '.join(sorted(self.cfg.kv.peer_links)) or 'none'}", "NotFound")
        try:
            link.scale(factor)
        except ValueError as e:
            return self._error(400, str(e))
        print(f"vllm-sim: link from {peer} now {link.describe()}", flush=True)
        return web.json_response({"peer": peer, "link": link.describe()})

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

    @web.middleware
    async def _json_errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error as vLLM-style JSON: no default aiohttp pages, no tracebacks in the log."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._error(e.status, e.reason, "NotFoundError" if e.status == 404 else "BadRequestError")
        except EngineDeadError as e:
            return self._error(500, f"EngineDeadError: {e}", "InternalServerError")
        except ConnectionResetError:
            return _abandon(request)  # the client went away: nothing to answer, nothing to log
        except Exception as e:  # noqa: BLE001 -- one line in the log, a JSON answer to the client
            print(f"vllm-sim: {request.method} {request.path} failed: {type(e).__name__}: {e}", flush=True)
            if request.writer is not None and request.writer.output_size > 0:
                return _abandon(request)  # a response already started: end the connection, the client sees it cut
            return self._error(500, f"{type(e).__name__}: {e}", "InternalServerError")

    def _fault_before(self) -> None:
        """Engine-level faults triggered by request count (--die-after, --hang-after)."""
        f, engine_faults = self.cfg.faults, self.engine.faults
        if f.die_after and self.requests_seen >= f.die_after:
            engine_faults.die(SEED_CRASH)
        if f.hang_after and self.requests_seen >= f.hang_after and not engine_faults.hung:
            self.hang_engine(f"request {self.requests_seen}")

    def hang_engine(self, cause: str) -> None:
        print(f"vllm-sim: engine hung ({cause}): no request makes progress; /health still answers 200", flush=True)
        self.engine.faults.hang()

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
        self.engine.faults.check()
        self.requests_seen += 1
        self._fault_before()
        self.engine.faults.check()
        faults = self.cfg.faults
        roll = self.rng.random()
        if roll < faults.error_rate:
            return self._error(500, "injected failure", "InternalServerError")
        if roll < faults.error_rate + faults.hang_rate:
            await asyncio.Event().wait()  # until the client disconnects (aiohttp cancels the handler)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        token_ids = prompt_token_ids(body)
        prompt_tokens = max(1, len(token_ids))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.cfg.default_max_tokens
        if self.cfg.role == "prefill":
            max_tokens = 1
        max_tokens = int(max_tokens)
        stream = body.get("stream") is True
        params = body.get("kv_transfer_params")
        t0 = time.monotonic()
        engine = self.engine
        loaded = Loaded(0, 0.0)
        skip_kv = request.headers.get("X-KV-Transfer", "").lower() == "none"  # proxy's decode-only fallback
        if self.cfg.role == "decode" and not skip_kv:
            try:
                loaded = await engine.faults.guard(self.kv.load(request_id, prompt_tokens, token_ids, params))
            except KVLoadError as e:
                if self.cfg.kv_load_failure_policy != "recompute":
                    print(f"vllm-sim: failing request {request_id} due to KV load failure (failure_policy=fail): {e}", flush=True)
                    return await self._failed(request, stream)
                # vLLM's recompute policy: the decode computes the prompt
            except (TimeoutError, KVTransferError) as e:
                return self._error(500, str(e), "KVTransferError")
            if loaded.tokens:
                self.h_kv_wait.labels(*self._l).observe(loaded.seconds)
                if self.cfg.kv.backend == "nixl":
                    self.h_nixl.labels(*self._l).observe(loaded.seconds)
                    self.h_nixl_bytes.labels(*self._l).observe(loaded.nbytes)
        cache_key = uuid.uuid4().hex  # the client's request id may repeat; the block pool needs a unique one
        hit = 0
        if self.cache is not None and not loaded.tokens:  # this instance computes the prompt: its prefix cache may hold a part
            hit = self.cache.begin(cache_key, token_ids, max_tokens)
            self.c_cache_queries.labels(*self._l).inc(len(token_ids))
            self.c_cache_hits.labels(*self._l).inc(hit)
        try:
            seq = engine.submit(prompt_tokens, max_tokens, max(loaded.tokens, hit))
        except ValueError as e:
            if self.cache is not None:
                self.cache.finish(cache_key)
            return self._error(400, str(e))
        r = Reply(seq, prompt_tokens, loaded.tokens, hit, cache_key, t0)
        held, reply_params = False, None
        try:
            if self.cfg.role == "prefill":
                await self._token(r, 0)  # the prompt is computed (and its one token sampled)
                try:
                    if self.cfg.kv.backend == "nixl":
                        if isinstance(params, dict) and params.get("do_remote_decode"):
                            reply_params = await self.kv.hold(request_id, prompt_tokens, lambda: engine.release(seq))
                            held = True  # the blocks stay in the engine until a decode reads them
                    else:
                        await self.kv.send(request_id, prompt_tokens, token_ids)
                except ValueError as e:
                    return self._error(400, str(e))
                except KVTransferError as e:
                    return self._error(500, str(e), "KVTransferError")
            ids = ("chatcmpl-" if chat else "cmpl-") + request_id  # vLLM: no "-0" suffix
            headers = {"x-kv-transfer-seconds": f"{loaded.seconds:.6f}", "x-request-id": request_id}
            if stream:
                return await self._stream(request, ids, chat, r, headers, body)
            for i in range(1 if self.cfg.role == "prefill" else 0, max_tokens):
                await self._token(r, i)
            text = " ".join(f"tok{i}" for i in range(max_tokens))
            self._finish(t0)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat
                      else {"index": 0, "text": text, "finish_reason": "length"})
            return web.json_response({"id": ids, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                                      "model": self.cfg.model, "choices": [choice], "usage": self._usage(r),
                                      "kv_transfer_params": reply_params}, headers=headers)
        finally:
            if not held:
                engine.release(seq)
            if self.cache is not None:
                self.cache.finish(cache_key)

    async def _token(self, r: Reply, i: int) -> None:
        """The reply's token i; the first one completes the prompt, which is then counted (and cached) as vLLM does."""
        await self.engine.next_token(r.seq)
        self.c_gen.labels(*self._l).inc()
        if i:
            return
        self.h_ttft.labels(*self._l).observe(time.monotonic() - r.t0)
        if self.cache is not None:
            self.cache.stored(r.cache_key)
        self.c_prompt.labels(*self._l).inc(r.prompt_tokens)
        self.c_by_source.labels(*self._l, "external_kv_transfer").inc(r.cached)
        self.c_by_source.labels(*self._l, "local_cache_hit").inc(r.hit)
        self.c_by_source.labels(*self._l, "local_compute").inc(max(0, r.prompt_tokens - r.cached - r.hit))

    @staticmethod
    def _usage(r: Reply) -> dict:
        n = r.seq.max_tokens
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": n, "total_tokens": r.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": r.cached + r.hit}}

    async def _failed(self, request: web.Request, stream: bool) -> web.StreamResponse:
        """A request vLLM fails with finish_reason `error`: 500, or for a stream an error event, then [DONE]."""
        if not stream:
            return self._error(500, "Internal server error", "InternalServerError")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await _end_stream(resp, "Internal server error")
        return resp

    async def _stream(self, request: web.Request, ids: str, chat: bool, r: Reply, headers: dict, body: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await resp.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        max_tokens = r.seq.max_tokens
        last = time.monotonic()
        try:
            for i in range(max_tokens):
                if i or self.cfg.role != "prefill":  # a prefill's one token was sampled with its prompt
                    await self._token(r, i)
                now = time.monotonic()
                if i:
                    self.h_itl.labels(*self._l).observe(now - last)
                last = now
                delta = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None} if chat else {"index": 0, "text": f"tok{i} ", "finish_reason": None}
                await resp.write(b"data: " + json.dumps({"id": ids, "object": kind, "model": self.cfg.model, "choices": [delta]}).encode() + b"\n\n")
        except EngineDeadError as e:
            # as vLLM's serving layer: the status is already 200, so the error is the next event, then [DONE]
            await _end_stream(resp, f"EngineDeadError: {e}")
            return resp
        final = {"id": ids, "object": kind, "model": self.cfg.model, "choices": [{"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}]}
        if (body.get("stream_options") or {}).get("include_usage", True):
            final["usage"] = self._usage(r)
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self._finish(r.t0)
        return resp

    def _finish(self, t0: float) -> None:
        self.h_e2e.labels(*self._l).observe(time.monotonic() - t0)
        self.c_success.labels(*self._l, "length").inc()


async def _end_stream(resp: web.StreamResponse, message: str) -> None:
    """A failed stream's end, as vLLM's serving layer writes it: an error event, then [DONE]."""
    err = {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}
    await resp.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
    await resp.write_eof()


def _abandon(request: web.Request) -> web.Response:
    """Close the connection under a response that cannot be completed; aiohttp then drops it quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)
