"""The P/D proxy: prefill with max_tokens=1, then the original request to decode, streamed back.

Three modes, one program: `nixl` (vLLM's NixlConnector: `kv_transfer_params` in the bodies, see
`nixl.py`), `shared-storage` (vLLM's shared-storage/Example connector: prefill then decode, ids
name the services) and, for vLLM versions that still have it, `p2p-nccl` (P2pNcclConnector: the
request id names both KV addresses, `___prefill_addr_{P}___decode_addr_{D}_{uuid}`, sent as
X-Request-Id to both). Whether the decode loaded the KV or recomputed the prompt is checked on
vLLM's token-source counters (`kv_load.py`).
What the reference proxies lack is here: pooled connections, timeouts, upstream errors as
OpenAI-style JSON with a meaningful status, a failed prefill reported (or, if enabled, served
decode-only), and a client disconnect cancelling both legs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from pd_proxy import nixl
from pd_proxy.kv_load import RATIO_EWMA, KVLoadMonitor, WindowResult
from pd_proxy.metrics import ProxyMetrics
from pd_proxy.shared_storage import StorePruner

MODES = ("nixl", "shared-storage", "p2p-nccl")


@dataclass
class Instance:
    """A prefill or decode vLLM: its HTTP base URL and (p2p-nccl) its KV address."""

    url: str
    kv_addr: str = ""
    in_flight: int = 0
    healthy: bool = True

    @classmethod
    def parse(cls, spec: str) -> "Instance":
        """`http://host:port` or `http://host:port=kvhost:kvport`."""
        url, _, kv = spec.partition("=")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        return cls(url.rstrip("/"), kv)


@dataclass
class ProxyConfig:
    mode: str
    prefills: list[Instance]
    decodes: list[Instance]
    kv_backend: str = ""  # the label value this proxy stands for: nvlink | fs
    prefill_service: str = "vllm-prefill"
    decode_service: str = "vllm-decode"
    connect_timeout: float = 5.0
    prefill_timeout: float = 300.0
    decode_timeout: float = 3600.0
    fallback_decode_only: bool = False
    profile_file: str | None = None
    scrape_interval: float = 1.0
    heartbeat_port: int = 0  # >0: accept instances registering by P2pNcclConnector heartbeats (ZMQ ROUTER)
    heartbeat_host: str = "0.0.0.0"
    kv_load_failure_policy: str = "recompute"  # nixl: a decode that failed loading KV is retried recomputing, or reported
    shared_storage_path: str | None = None  # shared-storage: the connector's directory, pruned (vLLM never cleans it)
    shared_storage_ttl: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)


class KVLoadFailure(Exception):
    """The decode answered that it could not load the request's KV (NIXL, kv_load_failure_policy=fail)."""


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, kind: str = "UpstreamError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"object": "error", "error": {"message": message, "type": kind, "code": status}}, status=status)


class PDProxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        if (not cfg.prefills or not cfg.decodes) and not cfg.heartbeat_port:
            raise ValueError("give at least one --prefill and one --decode instance, or --heartbeat-port for instances to register")
        if cfg.mode == "p2p-nccl":
            missing = [i.url for i in cfg.prefills + cfg.decodes if not i.kv_addr]
            if missing:
                raise ValueError(f"p2p-nccl mode needs each instance as URL=KV_HOST:KV_PORT; missing for {', '.join(missing)}")
        if cfg.kv_load_failure_policy not in nixl.FAILURE_POLICIES:
            raise ValueError(f"--kv-load-failure-policy must be one of {', '.join(nixl.FAILURE_POLICIES)}")
        self.cfg = cfg
        self.metrics = ProxyMetrics(cfg.kv_backend or cfg.mode)
        self.kv_load = KVLoadMonitor(self._kv_window, self._kv_transfer_counted)
        self._kv_reported = False  # the decode reports each request's KV wait itself (x-kv-transfer-seconds)
        self.pruner = StorePruner(cfg.shared_storage_path, cfg.shared_storage_ttl) if cfg.shared_storage_path else None
        self.profile: dict | None = None
        if cfg.profile_file:
            self.load_profile(cfg.profile_file)
        self.session: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task | None = None
        self.registry = None
        if cfg.heartbeat_port:
            from pd_proxy.heartbeats import HeartbeatRegistry

            self.registry = HeartbeatRegistry(cfg.heartbeat_host, cfg.heartbeat_port, cfg.prefills, cfg.decodes,
                                              on_change=lambda kind, action, url: print(f"pd-proxy: {kind} {action} {url}", flush=True))

    def load_profile(self, path: str) -> None:
        self.profile = json.loads(Path(path).read_text())
        self.metrics.publish_profile(self.profile)

    # -- lifecycle -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/kv-transfer-profile", self.profile_handler)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout))
        await self._kv_baseline()
        self._scraper = asyncio.create_task(self._scrape_loop())
        if self.pruner is not None:
            self.pruner.start()
        if self.registry is not None:
            await self.registry.start()

    async def _stop(self, app: web.Application) -> None:
        if self._scraper:
            self._scraper.cancel()
        if self.pruner is not None:
            self.pruner.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.session:
            await self.session.close()

    # -- routing -------------------------------------------------------------------------------------
    @staticmethod
    def _least_loaded(instances: list[Instance]) -> Instance:
        healthy = [i for i in instances if i.healthy] or instances
        return min(healthy, key=lambda i: i.in_flight)

    def request_id(self, p: Instance, d: Instance) -> str:
        if self.cfg.mode == "nixl":
            return uuid.uuid4().hex  # one id for both legs; vLLM answers with cmpl-<id>
        if self.cfg.mode == "p2p-nccl":
            return f"___prefill_addr_{p.kv_addr}___decode_addr_{d.kv_addr}_{uuid.uuid4().hex}"
        return f"___prefill_addr_{self.cfg.prefill_service}___decode_addr_{self.cfg.decode_service}_{uuid.uuid4().hex}"

    def prefill_body(self, body: dict) -> dict:
        pb = dict(body)
        pb["max_tokens"] = 1
        if "max_completion_tokens" in pb or "messages" in pb:
            pb["max_completion_tokens"] = 1
        pb["stream"] = False
        pb.pop("stream_options", None)
        return nixl.prefill_body(pb) if self.cfg.mode == "nixl" else pb

    async def handle(self, request: web.Request) -> web.StreamResponse:
        m = self.metrics
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            m.finished("400")
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            m.finished("400")
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        body.pop("kv_transfer_params", None)  # only the proxy names KV blocks and where to read them
        if not self.cfg.prefills or not self.cfg.decodes:
            m.finished("503")
            return error_response(503, "no prefill or decode instance registered yet", "ServiceUnavailable")
        p, d = self._least_loaded(self.cfg.prefills), self._least_loaded(self.cfg.decodes)
        rid = self.request_id(p, d)
        prefill_alone = p.in_flight == 0  # only an unqueued prefill measures the instance's speed
        path = request.path
        m.in_flight.inc()
        p.in_flight += 1
        d.in_flight += 1
        t0 = time.monotonic()
        status = "cancelled"
        try:
            headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
            decode_headers = dict(headers)
            decode_body, prompt_tokens = body, _prompt_tokens(body)
            try:
                prefill_s, reply = await self._prefill(p, path, body, headers)
                prompt_tokens = _usage_prompt_tokens(reply) or prompt_tokens
                m.prefill_seconds.observe(prefill_s)
                if prefill_s > 0 and prefill_alone:
                    m.observe_prefill_speed(prompt_tokens / prefill_s)
                if self.cfg.mode == "nixl":
                    decode_body = nixl.decode_body(body, nixl.transfer_params(reply))
            except UpstreamError as e:
                if not self.cfg.fallback_decode_only:
                    status = str(e.status)
                    return error_response(e.status, f"prefill failed on {p.url}: {e.message}", "PrefillError")
                decode_headers["X-KV-Transfer"] = "none"  # decode computes the prompt itself
                m.fallbacks.inc()
            try:
                resp = await self._decode(request, d, path, decode_body, decode_headers, t0, prompt_tokens)
            except KVLoadFailure as e:
                m.kv_load_failures.inc()
                if self.cfg.kv_load_failure_policy == "fail":
                    status = "502"
                    return error_response(502, f"decode {d.url} could not load the KV cache from prefill {p.url}: {e}", "KVLoadError")
                print(f"pd-proxy: decode {d.url} could not load the KV of request {rid} from {p.url} ({e}); "
                      "retrying it on the decode, which computes the prompt", flush=True)
                resp = await self._decode(request, d, path, nixl.recompute_body(body), decode_headers, t0, prompt_tokens)
            status = str(resp.status)
            return resp
        except UpstreamError as e:
            status = str(e.status)
            return error_response(e.status, e.message, e.kind)
        finally:
            p.in_flight -= 1
            d.in_flight -= 1
            m.in_flight.dec()
            m.finished(status)
            if status.startswith("2"):
                m.e2e_seconds.observe(time.monotonic() - t0)

    async def _prefill(self, p: Instance, path: str, body: dict, headers: dict) -> tuple[float, Any]:
        """Seconds the prefill leg took, and its parsed reply (usage; kv_transfer_params for NIXL)."""
        assert self.session is not None
        t = time.monotonic()
        try:
            async with self.session.post(p.url + path, json=self.prefill_body(body), headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.prefill_timeout)) as r:
                text = await r.read()
                if r.status >= 400:
                    raise UpstreamError(r.status, _upstream_message(text, r.status))
        except aiohttp.ClientConnectorError as e:
            p.healthy = False
            raise UpstreamError(503, f"cannot connect: {e.os_error or e}", "ServiceUnavailable") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"prefill timed out after {self.cfg.prefill_timeout:g}s", "Timeout") from None
        elapsed = time.monotonic() - t
        try:
            return elapsed, json.loads(text)
        except ValueError:
            return elapsed, None

    async def _decode(self, request: web.Request, d: Instance, path: str, body: dict, headers: dict, t0: float,
                      prompt_tokens: int = 0) -> web.StreamResponse:
        assert self.session is not None
        m = self.metrics
        t = time.monotonic()
        loading = "kv_transfer_params" in body  # NIXL: a failure of this decode may be its KV load
        self.kv_load.started(d.url)
        first_at = None
        try:
            async with self.session.post(d.url + path, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.decode_timeout)) as r:
                if r.status >= 400:
                    text = await r.read()
                    if loading and r.status == 500:
                        raise KVLoadFailure(_upstream_message(text, r.status))
                    return error_response(r.status, f"decode failed on {d.url}: {_upstream_message(text, r.status)}", "DecodeError")
                first = await r.content.readany()  # the KV load (or recompute) and one step are behind it
                first_at = time.monotonic()
                m.decode_first_token_seconds.observe(first_at - t)
                self.kv_load.first_token(d.url, first_at, prompt_tokens)
                if loading and nixl.is_error_event(first):
                    raise KVLoadFailure(first.decode("utf-8", "replace").strip()[:300])
                kv_s = r.headers.get("x-kv-transfer-seconds")
                if kv_s:
                    self._kv_reported = True
                    m.kv_transfer_seconds.observe(float(kv_s))
                out = web.StreamResponse(status=r.status, headers={
                    "Content-Type": r.headers.get("Content-Type", "application/json"),
                    "X-Request-Id": headers["X-Request-Id"],
                    **({"x-kv-transfer-seconds": kv_s} if kv_s else {}),
                })
                await out.prepare(request)
                m.ttft_seconds.observe(first_at - t0)
                await out.write(first)
                async for chunk in r.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                end = time.monotonic()
                m.decode_seconds.observe(end - t)
                out_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
                # decoding only: a streamed response from its first byte on, a whole one less the KV wait the
                # decode instance reported, so a slow fabric is not mistaken for a slow decoder
                if isinstance(out_tokens, int) and out_tokens > 2:
                    if body.get("stream") is True:
                        m.observe_decode_speed((end - first_at) / (out_tokens - 1))
                    else:
                        m.observe_decode_speed(max(0.0, end - t - float(kv_s or 0.0)) / out_tokens)
                return out
        except aiohttp.ClientConnectorError as e:
            d.healthy = False
            raise UpstreamError(503, f"cannot connect to decode {d.url}: {e.os_error or e}", "ServiceUnavailable") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"decode timed out after {self.cfg.decode_timeout:g}s", "Timeout") from None
        finally:
            if first_at is None:
                self.kv_load.abandoned(d.url)

    async def _kv_baseline(self) -> None:
        """The decodes' token-source counters before the first request, so that one is checked too."""
        assert self.session is not None

        async def read(inst: Instance) -> None:
            try:
                at = time.monotonic()
                async with self.session.get(inst.url + "/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    self.kv_load.absorb(inst.url, await r.text(), at)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # not up yet: the scrape loop takes the baseline later

        await asyncio.gather(*(read(d) for d in self.cfg.decodes))

    def _kv_transfer_counted(self, seconds: float, transfers: int) -> None:
        """New transfers in the decode's NIXL histogram (real vLLM reports no per-request KV time): their mean, once each."""
        if not self._kv_reported:
            for _ in range(transfers):
                self.metrics.kv_transfer_seconds.observe(seconds)

    def _kv_window(self, url: str, w: WindowResult) -> None:
        """A read of a decode's token-source counters: metrics, and a warning when it recomputed prompts."""
        self.metrics.observe_kv_window(w.loaded_tokens, w.computed_tokens, w.recomputed_tokens, w.recomputed_requests, RATIO_EWMA)
        if w.recomputed_requests:
            print(f"pd-proxy: decode {url} computed {w.recomputed_tokens:.0f} prompt tokens itself instead of loading their KV "
                  f"({w.recomputed_requests} of {w.requests} requests since the last read; {w.loaded_tokens:.0f} tokens loaded) — "
                  f"is the connector configured on both instances, and does the proxy's --mode match it?", flush=True)

    # -- small routes ----------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        d = self._least_loaded(self.cfg.decodes)
        try:
            async with self.session.get(d.url + "/v1/models") as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")
        except aiohttp.ClientError as e:
            return error_response(503, f"cannot reach decode {d.url}: {e}", "ServiceUnavailable")

    async def health(self, request: web.Request) -> web.Response:
        ok = any(i.healthy for i in self.cfg.prefills) and any(i.healthy for i in self.cfg.decodes)  # False while none is registered
        state = {"prefill": {i.url: i.healthy for i in self.cfg.prefills}, "decode": {i.url: i.healthy for i in self.cfg.decodes}}
        return web.json_response({"healthy": ok, **state}, status=200 if ok else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def profile_handler(self, request: web.Request) -> web.Response:
        if self.profile is None:
            return error_response(404, "no KV-transfer profile loaded; run kv-bandwidth-profiler and pass --profile-file", "NotFound")
        return web.json_response(self.profile)

    async def _scrape_loop(self) -> None:
        """Instance health and their vllm:* gauges, re-exported with a role label."""
        assert self.session is not None
        while True:
            for role, instances in (("prefill", self.cfg.prefills), ("decode", self.cfg.decodes)):
                for i, inst in enumerate(instances):
                    try:
                        read_at = time.monotonic()
                        async with self.session.get(inst.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            text = await r.text()
                        async with self.session.get(inst.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as h:
                            inst.healthy = h.status == 200
                        self.metrics.absorb_vllm(role, str(i), text)
                        if role == "decode":
                            self.kv_load.absorb(inst.url, text, read_at)
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        inst.healthy = False
            await asyncio.sleep(self.cfg.scrape_interval)


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return max(1, sum(len(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict)) // 4)
    p = body.get("prompt", "")
    if isinstance(p, list) and p and isinstance(p[0], int):
        return len(p)
    return max(1, len(str(p)) // 4)


def _usage_prompt_tokens(reply: Any) -> int | None:
    """Prompt tokens as the engine counted them (the prefill's usage), when its reply says."""
    usage = reply.get("usage") if isinstance(reply, dict) else None
    n = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _upstream_message(text: bytes, status: int) -> str:
    try:
        obj = json.loads(text)
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(obj.get("message"), str):
            return obj["message"]
    except (ValueError, AttributeError):
        pass
    return text.decode("utf-8", "replace")[:500] or f"HTTP {status}"
