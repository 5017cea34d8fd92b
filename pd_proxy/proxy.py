"""The P/D proxy: prefill with max_tokens=1, then the original request to decode, streamed back.

Three modes, one program: `nixl` (vLLM's NixlConnector: `kv_transfer_params` in the bodies, see
`nixl.py`), `shared-storage` (vLLM's shared-storage/Example connector: prefill then decode, ids
name the services) and, for vLLM versions that still have it, `p2p-nccl` (P2pNcclConnector: the
request id names both KV addresses, `___prefill_addr_{P}___decode_addr_{D}_{uuid}`, sent as
X-Request-Id to both). Whether the decode loaded the KV or recomputed the prompt is checked on
vLLM's token-source counters (`kv_load.py`).
What the reference proxies lack is here: pooled connections, timeouts, upstream errors as
OpenAI-style JSON with a meaningful status, a failed prefill reported (or, if enabled, served
decode-only), a client disconnect cancelling both legs, and instance health (`instances.py`):
a dead, hung or failing instance gets no requests, a request that finds no healthy instance
fails at once, and a request caught in a crash ends with a clear error — a stream already
started with an error event and `[DONE]`, as vLLM ends one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from pd_proxy import nixl
from pd_proxy.instances import HealthPolicy, HealthTracker, Instance, Leg
from pd_proxy.kv_load import RATIO_EWMA, KVLoadMonitor, WindowResult
from pd_proxy.link_profile import LiveLinkProfiles
from pd_proxy.metrics import ProxyMetrics
from pd_proxy.prefill_targets import HEADER as PREFILL_HEADER
from pd_proxy.prefill_targets import PrefillAllowlist, TargetRefused, parse_target
from pd_proxy.shared_storage import StorePruner

MODES = ("nixl", "shared-storage", "p2p-nccl")
SIDECAR_MODES = ("nixl", "shared-storage")  # p2p-nccl names the prefill's KV address, which a host:port header does not carry
RETRYABLE = ("connect", "reset", "5xx", "timeout", "stall")
MAX_UPSTREAM_BODY = 64 * 1024 * 1024  # a whole (non-streamed) answer is read before it is passed on
__all__ = ["MODES", "Instance", "KVLoadFailure", "PDProxy", "ProxyConfig", "UpstreamError", "error_response"]


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
    scrape_interval: float = 1.0  # also the health-check interval
    heartbeat_port: int = 0  # >0: accept instances registering by P2pNcclConnector heartbeats (ZMQ ROUTER)
    heartbeat_host: str = "0.0.0.0"
    health: HealthPolicy = field(default_factory=HealthPolicy)
    kv_load_failure_policy: str = "recompute"  # nixl: a decode that failed loading KV is retried recomputing, or reported
    shared_storage_path: str | None = None  # shared-storage: the connector's directory, pruned (vLLM never cleans it)
    shared_storage_ttl: float = 3600.0
    # sidecar mode (the decode pod's sidecar, llm-d's layout): the one decode is the local vLLM; each request's prefill
    # is the pool pod named in x-prefiller-host-port, checked against `allowlist`
    sidecar: bool = False
    allowlist: PrefillAllowlist | None = None
    prefill_retries: int = 1  # sidecar: further attempts on the named prefill after a failed one
    retry_backoff: float = 0.05  # seconds before the first retry; doubled for each further one
    kv_block_tokens: int = 16  # tokens per KV block of the live per-peer profiles
    live_profile_max_age: float = 30.0  # seconds a live link measurement is published
    extra: dict[str, Any] = field(default_factory=dict)


class _DecodeRefused(Exception):
    """The decode refused the connection (nothing reached it): serve the request again with another decode."""


class UpstreamError(Exception):
    """A call to an instance failed. `blame`: the failure kind it counts against the instance (None: not its fault)."""

    def __init__(self, status: int, message: str, kind: str = "UpstreamError", blame: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.blame = status, message, kind, blame


class KVLoadFailure(UpstreamError):
    """The decode answered that it could not load the request's KV (NIXL, kv_load_failure_policy=fail): counted on the decode."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, "KVLoadError", "kv")


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"object": "error", "error": {"message": message, "type": kind, "code": status}}, status=status)


def _sse_error(status: int, message: str, kind: str) -> bytes:
    """A stream's end after a failure: an error event, then [DONE], as vLLM's serving layer writes it."""
    return b"data: " + json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode() + b"\n\ndata: [DONE]\n\n"


class PDProxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        if cfg.sidecar:
            _check_sidecar(cfg)
        elif (not cfg.prefills or not cfg.decodes) and not cfg.heartbeat_port:
            raise ValueError("give at least one --prefill and one --decode instance, or --heartbeat-port for instances to register")
        if cfg.mode == "p2p-nccl":
            missing = [i.url for i in cfg.prefills + cfg.decodes if not i.kv_addr]
            if missing:
                raise ValueError(f"p2p-nccl mode needs each instance as URL=KV_HOST:KV_PORT; missing for {', '.join(missing)}")
        if cfg.kv_load_failure_policy not in nixl.FAILURE_POLICIES:
            raise ValueError(f"--kv-load-failure-policy must be one of {', '.join(nixl.FAILURE_POLICIES)}")
        self.cfg = cfg
        self.metrics = ProxyMetrics(cfg.kv_backend or cfg.mode)
        self.tracker = HealthTracker(cfg.health, log=self._log_instance, on_suspect=self._check_soon)
        self.metrics.watch_instances(self.instance_views)
        if cfg.sidecar:
            self.metrics.serve_sidecar(LiveLinkProfiles(cfg.kv_block_tokens, cfg.live_profile_max_age), cfg.kv_block_tokens)
        self.kv_load = KVLoadMonitor(self._kv_window, self._kv_transfer_counted)
        self._kv_reported = False  # the decode reports each request's KV wait itself (x-kv-transfer-seconds)
        self.pruner = StorePruner(cfg.shared_storage_path, cfg.shared_storage_ttl) if cfg.shared_storage_path else None
        self.profile: dict | None = None
        if cfg.profile_file:
            self.load_profile(cfg.profile_file)
        self.session: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()
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
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_json_errors])
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
        for task in [self._scraper, *self._probes]:
            if task:
                task.cancel()
        if self.pruner is not None:
            self.pruner.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.session:
            await self.session.close()

    # -- routing -------------------------------------------------------------------------------------
    def _roles(self) -> tuple[tuple[str, list[Instance]], ...]:
        return ("prefill", self.cfg.prefills), ("decode", self.cfg.decodes)

    def _role(self, inst: Instance) -> str:
        return "decode" if any(i is inst for i in self.cfg.decodes) else "prefill"

    def _log_instance(self, inst: Instance, message: str) -> None:
        print(f"pd-proxy: {self._role(inst)} {inst.url} {message}", flush=True)

    def request_id(self, p: Instance | None, d: Instance) -> str:
        if self.cfg.mode == "nixl":
            return uuid.uuid4().hex  # one id for both legs; vLLM answers with cmpl-<id>
        if self.cfg.mode == "p2p-nccl":
            return f"___prefill_addr_{p.kv_addr if p else ''}___decode_addr_{d.kv_addr}_{uuid.uuid4().hex}"
        return f"___prefill_addr_{self.cfg.prefill_service}___decode_addr_{self.cfg.decode_service}_{uuid.uuid4().hex}"

    def prefill_body(self, body: dict) -> dict:
        pb = dict(body)
        pb["max_tokens"] = 1
        if "max_completion_tokens" in pb or "messages" in pb:
            pb["max_completion_tokens"] = 1
        pb["stream"] = False
        pb.pop("stream_options", None)
        return nixl.prefill_body(pb) if self.cfg.mode == "nixl" else pb

    def _unavailable(self, role: str, instances: list[Instance]) -> web.Response:
        self.metrics.finished("503")
        return error_response(503, f"no healthy {role} instance: {self.tracker.why_not(instances)}", "ServiceUnavailable")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        m, t = self.metrics, self.tracker
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            m.finished("400")
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            m.finished("400")
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        body.pop("kv_transfer_params", None)  # only the proxy names KV blocks and where to read them
        if self.cfg.sidecar:
            return await self._handle_sidecar(request, body)
        if not self.cfg.prefills or not self.cfg.decodes:
            m.finished("503")
            return error_response(503, "no prefill or decode instance registered yet", "ServiceUnavailable")
        tried: list[Instance] = []
        while True:
            d = t.pick(self.cfg.decodes, exclude=tried)  # first: a p2p request id names the decode's KV address
            if d is None:
                return self._unavailable("decode", self.cfg.decodes)
            p = t.pick(self.cfg.prefills)
            if p is None and not self.cfg.fallback_decode_only:
                return self._unavailable("prefill", self.cfg.prefills)
            try:
                return await self._serve(request, body, p, d)
            except _DecodeRefused:
                tried.append(d)  # nothing reached it: the whole request goes to another decode, if one is up

    async def _handle_sidecar(self, request: web.Request, body: dict) -> web.StreamResponse:
        """Sidecar mode: the prefill the EPP named (or none: the local decode prefills), then the local decode."""
        m, t = self.metrics, self.tracker
        try:
            target = parse_target(request.headers.get(PREFILL_HEADER))
            if target is not None:
                assert self.cfg.allowlist is not None
                self.cfg.allowlist.check(target)
        except TargetRefused as e:
            m.finished(str(e.status))
            m.target_refused.labels(self.cfg.kv_backend or self.cfg.mode, "malformed" if e.status == 400 else "outside_pool").inc()
            print(f"pd-proxy: refused a prefill target: {e}", flush=True)
            return error_response(e.status, str(e), "PrefillTargetRefused")
        d = self.cfg.decodes[0]
        if not t.usable(d):
            return self._unavailable("decode", self.cfg.decodes)
        if target is None:
            m.peer_requests.labels(m.kv_backend, "", "local").inc()
            return await self._serve(request, body, None, d, local=True)
        p = self._peer(target)
        if not t.usable(p):
            m.peer_requests.labels(m.kv_backend, p.address, "unavailable").inc()
            if not self.cfg.fallback_decode_only:
                m.finished("503")
                return error_response(503, f"prefill {target} named by {PREFILL_HEADER} is not usable: {t.why_not([p])}",
                                      "ServiceUnavailable")
            return await self._serve(request, body, None, d)
        return await self._serve(request, body, p, d)

    def _peer(self, target: str) -> Instance:
        """The prefill instance for an allowed host:port; created on first use, then health-checked like any instance."""
        for inst in self.cfg.prefills:
            if inst.address == target:
                return inst
        inst = Instance(f"http://{target}")
        self.cfg.prefills.append(inst)
        print(f"pd-proxy: prefill peer {target} in use", flush=True)
        return inst

    async def _serve(self, request: web.Request, body: dict, p: Instance | None, d: Instance, local: bool = False) -> web.StreamResponse:
        """One attempt: prefill (another prefill if this one refuses connections; sidecar: the same one again, by the
        retry policy), then the decode leg. `local`: no prefill was asked for, the decode computes the prompt."""
        m, t = self.metrics, self.tracker
        path = request.path
        m.in_flight.inc()
        t.acquire(d)
        held = [d]
        t0 = time.monotonic()
        status = "cancelled"
        try:
            rid = self.request_id(p or (self.cfg.prefills[0] if self.cfg.prefills else None), d)
            decode_headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
            decode_body, prompt_tokens = body, _prompt_tokens(body)
            attempts, loaded_from = 0, None
            while p is not None:
                prefill_alone = p.in_flight == 0  # only an unqueued prefill measures the instance's speed
                t.acquire(p)
                held.append(p)
                rid = self.request_id(p, d)
                decode_headers["X-Request-Id"] = rid
                try:
                    prefill_s, reply = await self._call(p, lambda leg: self._prefill(p, path, body, dict(decode_headers)))
                except UpstreamError as e:
                    if e.blame == "kv":
                        t.failed(d, "kv", e.message)  # the prefill is fine; its KV could not reach the decode
                    other = t.pick(self.cfg.prefills, exclude=held) if e.blame == "connect" and not self.cfg.sidecar else None
                    if other is not None:
                        p = other
                        continue
                    if self.cfg.sidecar and e.blame in RETRYABLE and attempts < self.cfg.prefill_retries:
                        attempts += 1
                        m.peer_requests.labels(m.kv_backend, p.address, "retried").inc()
                        print(f"pd-proxy: prefill {p.address} failed ({e.message}); retry {attempts} of {self.cfg.prefill_retries}", flush=True)
                        await asyncio.sleep(self.cfg.retry_backoff * 2 ** (attempts - 1))
                        continue
                    if self.cfg.sidecar:
                        m.peer_requests.labels(m.kv_backend, p.address, "fallback" if self.cfg.fallback_decode_only else "failed").inc()
                    if not self.cfg.fallback_decode_only:
                        status = str(e.status)
                        tries = f" after {attempts + 1} attempts" if attempts else ""
                        source = f" (named by {PREFILL_HEADER})" if self.cfg.sidecar else ""
                        return error_response(e.status, f"prefill failed on {p.url}{source}{tries}: {e.message}", "PrefillError")
                    decode_headers["X-KV-Transfer"] = "none"  # decode computes the prompt itself
                    m.fallbacks.inc()
                    break
                prompt_tokens = _usage_prompt_tokens(reply) or prompt_tokens
                m.prefill_seconds.observe(prefill_s)
                if prefill_s > 0 and prefill_alone and not self.cfg.sidecar:  # sidecar: that is the peer's speed, not this pod's
                    m.observe_prefill_speed(prompt_tokens / prefill_s)
                if self.cfg.mode == "nixl":
                    decode_body = nixl.decode_body(body, nixl.transfer_params(reply))
                loaded_from = p
                if self.cfg.sidecar:
                    m.peer_requests.labels(m.kv_backend, p.address, "ok").inc()
                break
            else:
                decode_headers["X-KV-Transfer"] = "none"  # no healthy prefill: the fallback serves it decode-only (or none asked for)
                if not local:
                    m.fallbacks.inc()
            try:
                resp, status = await self._call(d, lambda leg: self._decode(request, d, leg, path, decode_body, decode_headers, t0,
                                                                            prompt_tokens))
            except KVLoadFailure as e:
                t.failed(d, "kv", e.message)
                m.kv_load_failures.inc()
                if self.cfg.kv_load_failure_policy == "fail":
                    status = "502"
                    return error_response(502, f"decode {d.url} could not load the KV cache from prefill {p.url}: {e.message}",
                                          "KVLoadError")
                print(f"pd-proxy: decode {d.url} could not load the KV of request {rid} from {p.url} ({e.message}); "
                      "retrying it on the decode, which computes the prompt", flush=True)
                resp, status = await self._call(d, lambda leg: self._decode(request, d, leg, path, nixl.recompute_body(body), decode_headers,
                                                                            t0, prompt_tokens))
                loaded_from = None
            except UpstreamError as e:
                if e.blame == "connect" and t.pick(self.cfg.decodes, exclude=[d]) is not None:
                    status = "retried"
                    raise _DecodeRefused() from None
                raise
            kv_s = resp.headers.get("x-kv-transfer-seconds")
            if loaded_from is not None and m.live_links is not None and kv_s and float(kv_s) > 0:
                m.live_links.observe(loaded_from.address, prompt_tokens, float(kv_s))
            return resp
        except UpstreamError as e:
            status = str(e.status)
            return error_response(e.status, e.message, e.kind)
        finally:
            for inst in held:
                t.release(inst)
            m.in_flight.dec()
            m.finished(status)
            if status.startswith("2"):
                m.e2e_seconds.observe(time.monotonic() - t0)

    async def _call(self, inst: Instance, call: Callable[[Leg], Awaitable[Any]]) -> Any:
        """One call to `inst`, run as a leg whose outcome feeds the instance's health; a hung instance's legs end in 504."""
        t = self.tracker
        leg = Leg()
        leg.task = asyncio.ensure_future(call(leg))
        t.leg_started(inst, leg)
        try:
            result = await leg.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if leg.abort_reason is None or (current is not None and current.cancelling()):
                raise  # the client went away
            t.failed(inst, "stall", leg.abort_reason)
            raise UpstreamError(504, f"{self._role(inst)} {inst.url}: {leg.abort_reason}", "Timeout", "stall") from None
        except UpstreamError as e:
            if e.blame and e.blame != "kv":
                t.failed(inst, e.blame, e.message)
            raise
        finally:
            t.leg_ended(inst, leg)
        if leg.failure:
            t.failed(inst, *leg.failure)  # a stream that broke after it began
        else:
            t.succeeded(inst)
        return result

    async def _prefill(self, p: Instance, path: str, body: dict, headers: dict) -> tuple[float, Any]:
        """Seconds the prefill leg took, and its parsed reply (usage; kv_transfer_params for NIXL)."""
        assert self.session is not None
        t = time.monotonic()
        try:
            async with self.session.post(p.url + path, json=self.prefill_body(body), headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.prefill_timeout)) as r:
                self.tracker.progress(p)
                text = await _read_capped(r)
                if r.status >= 400:
                    message, etype = _upstream_error(text, r.status)
                    blame = "kv" if etype == "KVTransferError" else ("5xx" if r.status >= 500 else None)
                    raise UpstreamError(r.status, message, blame=blame)
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(503, f"cannot connect: {_connect_reason(e)}", "ServiceUnavailable", "connect") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise UpstreamError(502, f"connection lost before the answer was complete ({_describe(e)})", "BadGateway", "reset") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"prefill timed out after {self.cfg.prefill_timeout:g}s", "Timeout", "timeout") from None
        elapsed = time.monotonic() - t
        try:
            return elapsed, json.loads(text)
        except ValueError:
            return elapsed, None

    async def _decode(self, request: web.Request, d: Instance, leg: Leg, path: str, body: dict, headers: dict, t0: float,
                      prompt_tokens: int = 0) -> tuple[web.StreamResponse, str]:
        """The decode leg; returns the response and the status to count for it (KVLoadFailure: a NIXL decode could not load the KV)."""
        assert self.session is not None
        m = self.metrics
        t = time.monotonic()
        loading = "kv_transfer_params" in body  # NIXL: a failure of this decode may be its KV load
        self.kv_load.started(d.url)
        first_at = None
        try:
            async with self.session.post(d.url + path, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.decode_timeout)) as r:
                self.tracker.progress(d)
                if r.status >= 400:
                    message, _ = _upstream_error(await _read_capped(r), r.status)
                    if loading and r.status == 500:
                        raise KVLoadFailure(message)
                    raise UpstreamError(r.status, f"decode failed on {d.url}: {message}", "DecodeError", "5xx" if r.status >= 500 else None)
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
                out_headers = {"Content-Type": r.headers.get("Content-Type", "application/json"), "X-Request-Id": headers["X-Request-Id"],
                               **({"x-kv-transfer-seconds": kv_s} if kv_s else {})}
                if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return await self._relay_stream(request, d, leg, r, out_headers, body, t0, t, first, first_at)
                # whole: a failure before the last byte becomes a clean error, not a cut body
                data = first + await _read_capped(r, MAX_UPSTREAM_BODY - len(first))
                end = time.monotonic()
                m.ttft_seconds.observe(end - t0)
                m.decode_seconds.observe(end - t)
                out_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
                # decoding only: the whole answer less the KV wait the decode instance reported, so a slow fabric
                # is not mistaken for a slow decoder
                if isinstance(out_tokens, int) and out_tokens > 2:
                    m.observe_decode_speed(max(0.0, end - t - float(kv_s or 0.0)) / out_tokens)
                return web.Response(body=data, status=r.status, headers=out_headers), str(r.status)
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(503, f"cannot connect to decode {d.url}: {_connect_reason(e)}", "ServiceUnavailable", "connect") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise UpstreamError(502, f"decode {d.url} closed the connection before the answer was complete ({_describe(e)})",
                                "BadGateway", "reset") from None
        except asyncio.TimeoutError:
            raise UpstreamError(504, f"decode timed out after {self.cfg.decode_timeout:g}s", "Timeout", "timeout") from None
        finally:
            if first_at is None:
                self.kv_load.abandoned(d.url)

    async def _relay_stream(self, request: web.Request, d: Instance, leg: Leg, r: aiohttp.ClientResponse, out_headers: dict,
                            body: dict, t0: float, t: float, first: bytes, first_at: float) -> tuple[web.StreamResponse, str]:
        """SSE bytes as they come, from the `first` chunk already read; if the decode fails mid-stream, the client
        gets an error event and [DONE]."""
        m = self.metrics
        out = web.StreamResponse(status=r.status, headers=out_headers)
        await out.prepare(request)
        m.ttft_seconds.observe(first_at - t0)

        async def relay(chunk: bytes) -> None:
            self.tracker.progress(d)
            if b'data: {"error"' in chunk:
                leg.failure = ("5xx", "the decode ended its stream with an error event")
            await out.write(chunk)

        try:
            await relay(first)
            async for chunk in r.content.iter_any():
                await relay(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            reason = (f"decode {d.url} timed out mid-stream after {self.cfg.decode_timeout:g}s" if isinstance(e, asyncio.TimeoutError)
                      else f"decode {d.url} closed the connection mid-stream ({_describe(e)})")
            leg.failure = ("timeout" if isinstance(e, asyncio.TimeoutError) else "reset", reason)
            return await _end_stream(out, 502, reason, "BadGateway"), "stream_error"
        except asyncio.CancelledError:
            if leg.abort_reason is None:
                raise  # the client went away
            leg.failure = ("stall", leg.abort_reason)
            return await _end_stream(out, 504, f"decode {d.url}: {leg.abort_reason}", "Timeout"), "stream_error"
        await out.write_eof()
        end = time.monotonic()
        m.decode_seconds.observe(end - t)
        out_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(out_tokens, int) and out_tokens > 2:
            m.observe_decode_speed((end - first_at) / (out_tokens - 1))  # decoding only: from the first byte on
        return out, ("stream_error" if leg.failure else str(r.status))

    async def _kv_baseline(self) -> None:
        """The decodes' token-source counters before the first request, so that one is checked too."""
        assert self.session is not None

        async def read(inst: Instance) -> None:
            try:
                at = time.monotonic()
                async with self.session.get(inst.url + "/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    self.kv_load.absorb(inst.url, (await _read_capped(r)).decode("utf-8", "replace"), at)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
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
        d = self.tracker.pick(self.cfg.decodes)
        if d is None:
            return error_response(503, f"no healthy decode instance: {self.tracker.why_not(self.cfg.decodes)}", "ServiceUnavailable")
        try:
            async with self.session.get(d.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=self.cfg.health.health_timeout * 2)) as r:
                return web.Response(body=await _read_capped(r), status=r.status, content_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return error_response(503, f"cannot reach decode {d.url}: {_describe(e)}", "ServiceUnavailable")

    def instance_views(self) -> list[dict]:
        return [self.tracker.view(role, inst) for role, instances in self._roles() for inst in list(instances)]

    async def health(self, request: web.Request) -> web.Response:
        """200 while a request can be served (a usable decode, and a usable prefill or the fallback); the instances' states."""
        usable = {role: any(self.tracker.usable(i) for i in instances) for role, instances in self._roles()}
        if self.cfg.sidecar:  # a request without a prefill target is always servable by the local decode
            ok = usable["decode"]
        else:
            ok = bool(self.cfg.prefills) and usable["decode"] and (usable["prefill"] or self.cfg.fallback_decode_only)
        state = {role: {i.url: self.tracker.usable(i) for i in instances} for role, instances in self._roles()}
        return web.json_response({"healthy": ok, **state, "instances": self.instance_views()}, status=200 if ok else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def profile_handler(self, request: web.Request) -> web.Response:
        if self.profile is None:
            return error_response(404, "no KV-transfer profile loaded; run kv-bandwidth-profiler and pass --profile-file", "NotFound")
        return web.json_response(self.profile)

    # -- instance health -------------------------------------------------------------------------------
    async def _scrape_loop(self) -> None:
        """Every interval: each instance's /health and vllm:* gauges (re-exported with a role label), then stalls."""
        while True:
            checks = [(role, i, inst) for role, instances in self._roles() for i, inst in enumerate(list(instances))]
            await asyncio.gather(*(self._scrape(role, i, inst) for role, i, inst in checks))
            for _, _, inst in checks:
                reason = self.tracker.stalled(inst)
                if reason:
                    self.tracker.end_stall(inst, reason)
            await asyncio.sleep(self.cfg.scrape_interval)

    async def _scrape(self, role: str, index: int, inst: Instance) -> None:
        if not await self._check_health(inst) or (self.cfg.sidecar and role == "prefill"):
            return  # sidecar: the peers are other pods the EPP scrapes itself; their load is not this pod's
        assert self.session is not None
        try:
            read_at = time.monotonic()
            async with self.session.get(inst.url + "/metrics", timeout=aiohttp.ClientTimeout(total=self.cfg.health.health_timeout)) as r:
                text = (await _read_capped(r)).decode("utf-8", "replace")
            self.tracker.counters_moved(inst, self.metrics.absorb_vllm(role, str(index), text))
            if role == "decode":
                self.kv_load.absorb(inst.url, text, read_at)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass  # health decides; a metrics page that fails once only leaves the gauges as they were

    async def _check_health(self, inst: Instance) -> bool:
        """GET /health; feeds the tracker. A probe already under way for this instance answers for both."""
        h = inst.health
        if h.checking or self.session is None:
            return h.down is None
        h.checking = True
        try:
            ok, reason, slow = await self._probe(inst)
        finally:
            h.checking = False
        self.tracker.health_result(inst, ok, reason, slow)
        return ok

    async def _probe(self, inst: Instance) -> tuple[bool, str, bool]:
        """(passed, why not, whether it only failed by not answering in time)."""
        assert self.session is not None
        timeout = self.cfg.health.health_timeout
        try:
            async with self.session.get(inst.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return r.status == 200, f"/health answered {r.status}", False
        except aiohttp.ClientConnectorError as e:
            return False, f"cannot connect: {_connect_reason(e)}", False
        except asyncio.TimeoutError:
            return False, f"/health did not answer within {timeout:g}s", True
        except aiohttp.ClientError as e:
            return False, f"/health failed: {_describe(e)}", False

    def _check_soon(self, inst: Instance) -> None:
        """After a failed call: ask the instance's /health now rather than at the next interval."""
        if inst.health.checking or self.session is None:
            return
        task = asyncio.get_running_loop().create_task(self._check_health(inst))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)


async def _end_stream(out: web.StreamResponse, status: int, message: str, kind: str) -> web.StreamResponse:
    try:
        await out.write(_sse_error(status, message, kind))
        await out.write_eof()
    except ConnectionResetError:
        pass  # the client left as well
    return out


async def _read_capped(r: aiohttp.ClientResponse, cap: int = MAX_UPSTREAM_BODY) -> bytes:
    chunks, size = [], 0
    async for chunk in r.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise ValueError(f"upstream answer larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error as OpenAI-style JSON: no default aiohttp pages, no tracebacks in the log."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason, "NotFound" if e.status == 404 else "BadRequestError")
    except ConnectionResetError:
        return _abandon(request)  # the client went away: nothing to answer, nothing to log
    except Exception as e:  # noqa: BLE001 -- one line in the log, a JSON answer to the client
        print(f"pd-proxy: {request.method} {request.path} failed: {type(e).__name__}: {e}", flush=True)
        if request.writer is not None and request.writer.output_size > 0:
            return _abandon(request)
        return error_response(500, f"proxy error: {type(e).__name__}: {e}", "InternalServerError")


def _abandon(request: web.Request) -> web.Response:
    """Close the connection under a response that cannot be completed; aiohttp then drops it quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


def _connect_reason(e: aiohttp.ClientConnectorError) -> str:
    os_error = getattr(e, "os_error", None)
    return getattr(os_error, "strerror", None) or str(os_error or e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


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


def _upstream_error(text: bytes, status: int) -> tuple[str, str]:
    """(message, error type) of an upstream error body; vLLM may send an empty one."""
    try:
        obj = json.loads(text)
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"]), str(err.get("type", ""))
        if isinstance(obj.get("message"), str):
            return obj["message"], str(obj.get("type", ""))
    except (ValueError, AttributeError):
        pass
    return text.decode("utf-8", "replace")[:500] or f"HTTP {status}", ""


def _check_sidecar(cfg: ProxyConfig) -> None:
    if cfg.mode not in SIDECAR_MODES:
        raise ValueError(f"--sidecar works with --mode {' or '.join(SIDECAR_MODES)}: p2p-nccl's request id needs the prefill's KV "
                         f"address, which {PREFILL_HEADER} does not carry")
    if len(cfg.decodes) != 1 or cfg.prefills:
        raise ValueError("--sidecar takes exactly one --decode (the local vLLM) and no --prefill: each request's prefill is the pod "
                         f"named in {PREFILL_HEADER}")
    if cfg.allowlist is None or not cfg.allowlist.configured:
        raise ValueError("--sidecar needs the pool's prefill pods to check the header against: give --endpoints-file "
                         "(the EPP's) and/or --prefill-allow HOST:PORT")
    if cfg.prefill_retries < 0:
        raise ValueError("--prefill-retries must be 0 or more")
    if cfg.heartbeat_port:
        raise ValueError("--sidecar and --heartbeat-port do not go together: the EPP names the prefill")
