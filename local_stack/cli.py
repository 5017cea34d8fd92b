"""`epp-stack`: the whole system on this machine, one command.

    epp-stack up [--profile proxy-performance]    start everything, print how to use it, Ctrl-C stops it
    epp-stack validate [--requests 60]             the seed's check: 60 concurrent chat requests, split by backend
    epp-stack up --topology local_stack/topologies/seed-pd-cluster.yaml
                                                   the seed's two-worker P/D cluster, llm-d's layout (EPP profile pd-pairing)
    epp-stack degrade-link --workdir W prefill-a decode-b 0.1
                                                   that cluster's link at 0.1× its bandwidth (1 restores it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from local_stack.stack import LocalStack, StackPorts
from local_stack.topology import load_topology


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None,
                   help="EPP config profile (see `epp profiles list`) or an EndpointPickerConfig YAML file (default: pd-pairing for a "
                        "topology with a cluster, else proxy-performance)")
    p.add_argument("--topology", default=None,
                   help="YAML overriding pairs per backend, link speeds, model shape, latency model; or describing a P/D cluster "
                        "(nodes, pods, links: see local_stack/cluster.py)")
    p.add_argument("--engine", default=None, choices=("sim", "vllm"),
                   help="sim: vLLM simulators; vllm: real vLLM CPU servers with the tiny local model (make vllm-setup) "
                        "(default: the topology's, else sim)")
    p.add_argument("--workdir", default=".stack", help="logs, endpoints file, KV directories and profiles go here")
    p.add_argument("--gateway-port", type=int, default=18080, help="Envoy's listener: where clients send requests")
    p.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy's admin API (/stats, /clusters, /ready)")
    p.add_argument("--grpc-port", type=int, default=9002, help="EPP ext_proc port")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="EPP gRPC health port")
    p.add_argument("--metrics-port", type=int, default=9090, help="EPP metrics port")
    p.add_argument("--body-mode", default="FULL_DUPLEX_STREAMED", choices=("FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED"),
                   help="Envoy's ext_proc request body mode (STREAMED is refused by the EPP for requests with a body: see docs/extproc.md)")


def build(args: argparse.Namespace) -> LocalStack:
    topology = load_topology(args.topology, args.engine)
    profile = args.profile or ("pd-pairing" if topology.cluster is not None else "proxy-performance")
    return LocalStack(topology, profile, args.workdir,
                      StackPorts(args.gateway_port, args.grpc_port, args.grpc_health_port, args.metrics_port, envoy_admin=args.envoy_admin_port),
                      args.body_mode)


def up(args: argparse.Namespace) -> int:
    stack = build(args)
    stop = threading.Event()
    started = threading.Event()

    def on_signal(*_):
        stop.set()
        if not started.is_set():
            raise KeyboardInterrupt  # abort the start-up; `finally` stops what already runs

    # Explicit handlers: a shell may start background jobs with SIGINT ignored, and Ctrl-C must still work.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        stack.start(progress=lambda m: print(f"[epp-stack] {m}", flush=True))
        started.set()
        print(f"""
[epp-stack] ready: EPP profile `{stack.profile}`, Envoy gateway {stack.gateway_url}
  send a request:
    curl -s {stack.gateway_url}/v1/chat/completions -H 'content-type: application/json' \\
      -d '{{"model":"{stack.topology.model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":8}}'
  pick the KV backend yourself (profiles honouring x-kv-backend, e.g. default, kv-backend-ab): add -H 'x-kv-backend: fs'
  decisions so far:  epp decisions {stack.epp_log}
  logs:              {stack.logs}/   (envoy.log: Envoy's JSON access log, one line per request)
  EPP metrics:       http://127.0.0.1:{stack.ports.metrics}/metrics
  Envoy admin/stats: {stack.envoy_admin_url}/stats   (config: {stack.envoy_config})
  Ctrl-C stops everything.""", flush=True)
        while not stop.is_set():
            if len(stack.alive()) != len(stack.procs.children) + len(stack.epp_procs.children):
                print(f"[epp-stack] a process exited; alive: {stack.alive()}; see {stack.logs}/", flush=True)
                return 1
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"[epp-stack] failed: {e}", file=sys.stderr)
        return 1
    finally:
        print("[epp-stack] stopping…", flush=True)
        stack.stop()
        print("[epp-stack] stopped; no process left behind" if not stack.alive() else f"[epp-stack] still alive: {stack.alive()}", flush=True)
    return 0


async def send_concurrent(url: str, model: str, n: int, concurrency: int) -> list[tuple[int, str]]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> tuple[int, str]:
            body = {"model": model, "messages": [{"role": "user", "content": f"request {i}: " + "tell me about KV caches " * 20}], "max_tokens": 16}
            async with sem:
                try:
                    r = await client.post(f"{url}/v1/chat/completions", json=body)
                    return r.status_code, r.headers.get("x-gateway-destination-endpoint-served", "")
                except httpx.HTTPError as e:
                    return 0, type(e).__name__

        return await asyncio.gather(*(one(i) for i in range(n)))


def validate(args: argparse.Namespace) -> int:
    stack = build(args)
    try:
        stack.start(progress=lambda m: print(f"[epp-stack] {m}", flush=True))
        results = asyncio.run(send_concurrent(stack.gateway_url, stack.topology.model, args.requests, args.concurrency))
        ok = sum(1 for s, _ in results if s == 200)
        print(f"\n{ok}/{len(results)} requests answered 200 (profile {stack.profile}, {args.concurrency} concurrent)")
        by_proxy = Counter(stack.name_of(served) for s, served in results if s == 200)
        for name, n in by_proxy.most_common():
            print(f"  {n:4d}  {name}")
        time.sleep(0.5)
        print("\n$ epp decisions " + str(stack.epp_log))
        subprocess.run([sys.executable, "-m", "epp.cli", "decisions", str(stack.epp_log)], check=False)
        if args.json:
            print(json.dumps({"ok": ok, "total": len(results), "by_proxy": dict(by_proxy)}))
        return 0 if ok == len(results) else 1
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"[epp-stack] failed: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="epp-stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the local stack and keep it running", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(u)
    v = sub.add_parser("validate", help="start, send concurrent chat requests, print the split, stop",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(v)
    v.add_argument("--requests", type=int, default=60, help="number of chat requests")
    v.add_argument("--concurrency", type=int, default=60, help="requests in flight at once")
    v.add_argument("--json", action="store_true", help="also print the result as JSON")
    g = sub.add_parser("degrade-link", help="scale the bandwidth of one prefill -> decode link of a running cluster",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--workdir", default=".stack", help="the running stack's --workdir")
    g.add_argument("prefill", help="prefill pod name")
    g.add_argument("decode", help="decode pod name")
    g.add_argument("factor", type=float, help="bandwidth factor (0.1 = ten times slower; 1 = as configured)")
    args = p.parse_args(argv)
    if args.cmd == "degrade-link":
        return degrade(args)
    return up(args) if args.cmd == "up" else validate(args)


def degrade(args: argparse.Namespace) -> int:
    from local_stack.cluster_stack import degrade_link

    try:
        print(f"[epp-stack] {args.prefill} -> {args.decode}: {degrade_link(args.workdir, args.prefill, args.decode, args.factor)}")
        return 0
    except (OSError, ValueError, KeyError) as e:
        print(f"[epp-stack] cannot change the link: {e} (is a cluster stack running with --workdir {args.workdir}?)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
