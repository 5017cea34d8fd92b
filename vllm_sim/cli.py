"""`vllm-sim`: run one simulated vLLM instance (prefill, decode or both).

Signals: SIGUSR1 kills the engine now (the seed's IndexError → EngineDeadError), SIGUSR2 hangs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from aiohttp import web

from kv_transfer import KVShape, LinkModel
from vllm_sim.engine import LatencyModel
from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.kv_io import KVConfig
from vllm_sim.server import Faults, SimConfig, Simulator


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-sim", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct", help="served model name")
    p.add_argument("--role", choices=("prefill", "decode", "both"), default="both", help="P/D role")
    g = p.add_argument_group("latency model")
    g.add_argument("--prefill-tokens-per-second", type=float, default=20000.0, help="prefill speed")
    g.add_argument("--decode-ms-per-token", type=float, default=10.0, help="per-token decode time with a batch of one")
    g.add_argument("--batch-slowdown", type=float, default=0.05, help="extra per-token time per additional running sequence")
    g.add_argument("--max-num-seqs", type=int, default=32, help="running batch size; more requests wait")
    g.add_argument("--num-gpu-blocks", type=int, default=4096, help="KV blocks, the prefix cache's too; a sequence that finds none free preempts the youngest")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step (decodes + prefill chunks)")
    g = p.add_argument_group("speed noise (what the scorer does not model)")
    g.add_argument("--speed-noise", type=float, default=0.0, help="sigma of a lognormal factor on every step's time (mean 1)")
    g.add_argument("--slow-every", type=float, default=0.0, help="seconds between slow phases (a busy neighbour; 0 = none)")
    g.add_argument("--slow-for", type=float, default=0.0, help="seconds each slow phase lasts")
    g.add_argument("--slow-factor", type=float, default=1.0, help="how much slower steps are in a slow phase")
    g.add_argument("--max-tokens", type=int, default=16, help="output tokens when the request does not say")
    g = p.add_argument_group("prefix caching (as vLLM)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="cache full prompt blocks; a cached prefix is not prefilled again")
    g.add_argument("--kv-events-config", default=None, metavar="JSON",
                   help='publish KV-cache events over ZMQ, e.g. \'{"enable_kv_cache_events":true,"publisher":"zmq",'
                        '"endpoint":"tcp://127.0.0.1:5557","topic":"kv@10.0.0.1:8000@MODEL"}\'')
    g = p.add_argument_group("KV transfer")
    g.add_argument("--kv-backend", choices=("nixl", "fs", "nccl", "none"), default="none",
                   help="vLLM connector the instance behaves as: nixl (NixlConnector, the decode pulls), fs (ExampleConnector, "
                        "shared storage), nccl (P2pNcclConnector of older vLLM, the prefill pushes)")
    g.add_argument("--kv-port", type=int, default=0,
                   help="decode (nccl): KV listen port named in P2P request ids; prefill (nixl): port the decode reads blocks from (0 = any)")
    g.add_argument("--kv-hold-timeout", type=float, default=480.0,
                   help="nixl prefill: seconds blocks no decode read are kept (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT; 0 = none kept)")
    g.add_argument("--kv-load-failure-policy", choices=("fail", "recompute"), default="fail",
                   help="nixl decode: a KV load that fails fails the request (500 / SSE error), or the decode computes the prompt")
    g.add_argument("--kv-dir", default="/tmp/inference-epp-kv", help="fs: shared directory")
    g.add_argument("--kv-timeout", type=float, default=5.0,
                   help="decode: seconds for a request's KV to start arriving (the prefill delivers it before it answers)")
    g.add_argument("--kv-link-timeout", type=float, default=10.0,
                   help="nccl: seconds to connect a KV link and for each step of a transfer under way (an idle link never times out)")
    g.add_argument("--proxy-heartbeat", default=None, metavar="HOST:PORT",
                   help="register with a P/D proxy by P2pNcclConnector heartbeats (vLLM's proxy_ip:proxy_port)")
    g.add_argument("--heartbeat-interval", type=float, default=3.0, help="seconds between heartbeats")
    g.add_argument("--link-gbps", type=float, default=0.0, help="link model bandwidth in GB/s (0 = as fast as the copy)")
    g.add_argument("--link-latency-ms", type=float, default=0.0, help="link model latency")
    g.add_argument("--peer-link", action="append", default=[], metavar="HOST:PORT=GBPS[,LATENCY_MS]",
                   help="nixl decode: the link from the prefill whose KV server is HOST:PORT into this decode (repeat per peer); "
                        "POST /admin/link {\"peer\": \"HOST:PORT\", \"bandwidth_factor\": F} scales it at run time")
    g.add_argument("--num-layers", type=int, default=4, help="model shape: layers")
    g.add_argument("--num-kv-heads", type=int, default=2, help="model shape: KV heads")
    g.add_argument("--head-dim", type=int, default=64, help="model shape: head dim")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: 16 for --device cuda, 128 for cpu)")
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the vLLM build simulated: its default block size; cpu's attention backend needs a multiple of 32")
    g.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="KV dtype")
    g = p.add_argument_group("failure injection")
    g.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500")
    g.add_argument("--hang-rate", type=float, default=0.0, help="share of requests that never answer")
    g.add_argument("--die-after", type=int, default=0,
                   help="the engine dies (IndexError → EngineDeadError) on this request number: running requests fail, "
                        "/health answers 503 (0 = never; SIGUSR1 = now)")
    g.add_argument("--hang-after", type=int, default=0,
                   help="the engine hangs on this request number: nothing progresses, /health still 200 (0 = never; SIGUSR2 = now)")
    g.add_argument("--keep-alive-on-engine-death", action="store_true",
                   default=os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "").lower() in ("1", "true"),
                   help="stay up answering 500 after the engine died, instead of exiting after vLLM's 5 s watchdog "
                        "(vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH, read from the environment)")
    g.add_argument("--seed", type=int, default=0, help="random seed (deterministic faults)")
    return p


def block_size(args: argparse.Namespace) -> int:
    """vLLM's defaults and rule: 16 on GPUs; on CPU 128 by default and always a multiple of 32."""
    size = args.block_size or (128 if args.device == "cpu" else 16)
    if args.device == "cpu" and size % 32:
        raise ValueError(f"--block-size {size}: vLLM's CPU attention backend needs a multiple of 32")
    return size


def peer_links(specs: list[str]) -> dict[str, LinkModel]:
    """`HOST:PORT=GBPS[,LATENCY_MS]` → {HOST:PORT: LinkModel}."""
    out = {}
    for spec in specs:
        peer, _, rest = spec.partition("=")
        gbps, _, latency = rest.partition(",")
        try:
            out[peer.strip()] = LinkModel.from_gbps(float(gbps), float(latency or 0.0))
        except ValueError:
            raise ValueError(f"--peer-link {spec!r}: expected HOST:PORT=GBPS[,LATENCY_MS], e.g. 127.0.0.1:7001=0.05,1") from None
        if not peer or float(gbps) <= 0:
            raise ValueError(f"--peer-link {spec!r}: needs a HOST:PORT and a bandwidth > 0")
    return out


def config_from(args: argparse.Namespace) -> SimConfig:
    events = KVEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None
    if events is not None and not args.enable_prefix_caching:
        raise ValueError("--kv-events-config needs prefix caching; drop --no-enable-prefix-caching")
    bs = block_size(args)
    shape = KVShape(args.num_layers, args.num_kv_heads, args.head_dim, bs, args.dtype)
    return SimConfig(
        model=args.model,
        role=args.role,
        latency=LatencyModel(args.prefill_tokens_per_second, args.decode_ms_per_token, args.batch_slowdown, args.max_num_seqs,
                             args.num_gpu_blocks, bs, args.max_num_batched_tokens, args.speed_noise, args.slow_every, args.slow_for,
                             args.slow_factor, args.seed),
        kv=KVConfig(args.kv_backend, shape, args.host, args.kv_port, args.kv_dir, LinkModel.from_gbps(args.link_gbps, args.link_latency_ms)
                    if args.link_gbps else LinkModel(0.0, args.link_latency_ms / 1000), args.kv_timeout,
                    link_timeout=args.kv_link_timeout, hold_timeout=args.kv_hold_timeout, peer_links=peer_links(args.peer_link)),
        faults=Faults(args.error_rate, args.hang_rate, args.die_after, args.hang_after, args.keep_alive_on_engine_death),
        seed=args.seed,
        default_max_tokens=args.max_tokens,
        prefix_caching=args.enable_prefix_caching,
        kv_events=events,
        kv_load_failure_policy=args.kv_load_failure_policy,
    )


async def serve(cfg: SimConfig, host: str, port: int, heartbeat: str | None = None, interval: float = 3.0) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until a dead engine's watchdog stops the server (1)."""
    sim = Simulator(cfg)
    runner = web.AppRunner(sim.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    beats = None
    if heartbeat:
        from vllm_sim.heartbeat import send_heartbeats

        beats = asyncio.create_task(send_heartbeats(heartbeat, cfg.role, f"{host}:{port}", sim.kv.address, interval))
    listening = (cfg.role == "decode" and cfg.kv.backend == "nccl") or (cfg.role == "prefill" and cfg.kv.backend == "nixl")
    print(f"vllm-sim {cfg.role} serving {cfg.model} on http://{host}:{port} (kv: {cfg.kv.backend}"
          f"{', KV on ' + sim.kv.address if listening else ''})", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sim.shutdown.set)
    loop.add_signal_handler(signal.SIGUSR1, sim.engine.faults.die)
    loop.add_signal_handler(signal.SIGUSR2, lambda: sim.hang_engine("SIGUSR2"))
    await sim.shutdown.wait()
    if beats is not None:
        beats.cancel()
    await runner.cleanup()
    return sim.exit_code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.kv_backend == "nccl" and args.role == "decode" and not args.kv_port:
        print("vllm-sim: --kv-port is required for a decode instance with --kv-backend nccl", file=sys.stderr)
        return 2
    try:
        cfg = config_from(args)
    except ValueError as e:
        print(f"vllm-sim: {e}", file=sys.stderr)
        return 2
    code = asyncio.run(serve(cfg, args.host, args.port, args.proxy_heartbeat, args.heartbeat_interval))
    sys.stdout.flush()
    os._exit(code)  # KV receiver threads may sit in a blocking recv; leave without waiting for them


if __name__ == "__main__":
    sys.exit(main())
