"""`envoy-loadgen`: what the EPP costs behind real Envoy, side by side with Envoy routed straight to the same upstreams.

One Envoy process, configured from the shared template (gateway/envoy_config.py), with two more listeners:

    gateway  → ext_proc (`epp serve`, FULL_DUPLEX_STREAMED) → ORIGINAL_DST → the upstream the EPP picked
    direct   → the same upstreams, round robin, no ext_proc
    floor    → (--floor) the gateway listener's twin, asking a fixed-route ext_proc server with the same message
               flow and no logic (extproc_loadgen.baseline_server): what grpc-python alone adds
    upstream → N listeners that answer an OpenAI-style JSON at once (direct_response): the fastest model server possible

Each round at concurrency 1 sends one request at a time, cycling through the paths, so a load spike
on the machine hits them alike; the EPP-added latency is the median over cycles of (EPP path − direct).
At higher concurrency each round measures the paths one after another with the same client (aiohttp,
keep-alive, C requests in flight), rotating which goes first; the throughput ratio is EPP path / direct.
Printed and written (JSON, PNG): req/s, latency p50/p90/p99, errors, CPU per request of Envoy and of the
ext_proc server, per round and as medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from extproc_loadgen.cli import _pct, cpu_seconds, scrape
from extproc_loadgen.window import measured_window

CHAT_BODY_WORDS = 400
PATHS = ("direct", "envoy+epp", "envoy+floor")
UPSTREAM_ANSWER = json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": "meta-llama/Llama-3.1-8B-Instruct",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 401, "completion_tokens": 1}})


def _free_port() -> int:
    from local_stack.stack import free_port

    return free_port()


def bench_config(settings, upstream_ports: list[int], direct_port: int, floor: tuple[int, int] | None = None) -> dict:
    """The shared template, plus the direct path, the upstreams and (`floor` = (listener port, ext_proc port)) the floor path."""
    import copy
    from dataclasses import replace

    from gateway.envoy_config import EPP_CLUSTER, access_log_config, render

    config = render(settings)
    resources = config["static_resources"]
    if floor is not None:
        twin = render(replace(settings, listen_port=floor[0], epp=[f"127.0.0.1:{floor[1]}"]))["static_resources"]
        listener = copy.deepcopy(twin["listeners"][0])
        listener["name"] = "floor"
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = "floor"
        hcm["http_filters"][0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "floor-extproc"
        (cluster,) = [c for c in twin["clusters"] if c["name"] == EPP_CLUSTER]
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = "floor-extproc"
        resources["listeners"].append(listener)
        resources["clusters"].append(cluster)

    def hcm(stat_prefix: str, route: dict, filters: list[dict], log: bool) -> dict:
        typed = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix, "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]},
            "http_filters": [*filters, {"name": "envoy.filters.http.router",
                                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }
        if log:
            typed["access_log"] = access_log_config()  # the gateway listener logs each request; so does the direct one
        return {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": typed}]}

    def listener(name: str, port: int, chain: dict) -> dict:
        return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}, "filter_chains": [chain]}

    answer = {"direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_ANSWER}},
              "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}
    for i, port in enumerate(upstream_ports):
        resources["listeners"].append(listener(f"upstream-{i}", port, hcm(f"upstream_{i}", answer, [], log=False)))
    direct_route = {"route": {"cluster": "direct", "timeout": f"{settings.request_timeout_s}s"}}
    resources["listeners"].append(listener("direct", direct_port, hcm("direct", direct_route, [], log=settings.access_log)))
    resources["clusters"].append({
        "name": "direct", "type": "STATIC", "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000, "max_requests": 40000}]},
        "load_assignment": {"cluster_name": "direct", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in upstream_ports]}]},
    })
    return config


async def _drive(url: str, body: bytes, concurrency: int, warmup: float, duration: float, on_edge) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    state = {"measuring": False, "stop": False}
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            nonlocal errors
            while not state["stop"]:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if state["measuring"]:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        elapsed, before, after = await measured_window(worker, concurrency, warmup, duration, state, on_edge)
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "before": before, "after": after}


def measure(path: str, url: str, body: bytes, concurrency: int, warmup: float, duration: float, envoy_pid: int,
            extproc_pid: int | None) -> dict:
    """One path at one concurrency: req/s, latency percentiles, CPU per request of Envoy and of the ext_proc server."""
    edge = lambda: {"envoy_cpu": cpu_seconds(envoy_pid), "extproc_cpu": cpu_seconds(extproc_pid) if extproc_pid else 0.0}  # noqa: E731
    r = asyncio.run(_drive(url, body, concurrency, warmup, duration, edge))
    n = len(r["latencies"])
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    per_request_us = lambda key: round((r["after"][key] - r["before"][key]) / n * 1e6, 1) if n else None  # noqa: E731
    return {
        "path": path, "concurrency": concurrency, "requests": n, "errors": r["errors"],
        "req_per_s": round(n / r["elapsed"], 1),
        "latency_ms": {"p50": ms(_pct(r["latencies"], 50)), "p90": ms(_pct(r["latencies"], 90)), "p99": ms(_pct(r["latencies"], 99))},
        "envoy_cpu_us_per_request": per_request_us("envoy_cpu"),
        "extproc_cpu_us_per_request": per_request_us("extproc_cpu") if extproc_pid else None,
    }


async def _drive_interleaved(urls: dict[str, str], body: bytes, warmup: float, duration: float, on_edge) -> dict:
    """One request at a time, cycling through the paths: each cycle's requests meet the same machine load."""
    import aiohttp

    paths = list(urls)
    cycles: list[dict[str, float]] = []
    errors = dict.fromkeys(paths, 0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(url: str) -> float | None:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    return time.perf_counter() - t0 if r.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            for path in paths:
                await one(urls[path])
        before = on_edge()
        t_start = time.perf_counter()
        end = t_start + duration
        while time.perf_counter() < end:
            cycle = {}
            for path in paths[len(cycles) % len(paths):] + paths[:len(cycles) % len(paths)]:  # rotate who goes first
                t = await one(urls[path])
                if t is None:
                    errors[path] += 1
                else:
                    cycle[path] = t
            cycles.append(cycle)
        elapsed = time.perf_counter() - t_start
        after = on_edge()
    return {"cycles": cycles, "errors": errors, "elapsed": elapsed, "before": before, "after": after}


def measure_interleaved(urls: dict[str, str], body: bytes, warmup: float, duration: float, pids: dict[str, int | None]) -> list[dict]:
    """Concurrency 1 with the paths interleaved request by request; per ext_proc path also the median paired difference."""
    edge = lambda: {p: cpu_seconds(pid) for p, pid in pids.items() if pid}  # noqa: E731
    r = asyncio.run(_drive_interleaved(urls, body, warmup, duration, edge))
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    out = []
    for path in urls:
        lat = [c[path] for c in r["cycles"] if path in c]
        n = len(lat)
        row = {
            "path": path, "concurrency": 1, "interleaved": True, "requests": n, "errors": r["errors"][path],
            "req_per_s": round(n / sum(lat), 1) if n else 0.0,  # one at a time on this path alone: 1 / mean latency
            "latency_ms": {"p50": ms(_pct(lat, 50)), "p90": ms(_pct(lat, 90)), "p99": ms(_pct(lat, 99))},
            "envoy_cpu_us_per_request": None,  # Envoy serves every path in the same window
            "extproc_cpu_us_per_request": round((r["after"][path] - r["before"][path]) / n * 1e6, 1) if pids.get(path) and n else None,
        }
        if path != "direct":
            diffs = [c[path] - c["direct"] for c in r["cycles"] if path in c and "direct" in c]
            row["paired_added_ms"] = {"p50": ms(_pct(diffs, 50)), "p90": ms(_pct(diffs, 90)), "pairs": len(diffs)}
        out.append(row)
    return out


def summarize(rounds: list[dict]) -> list[dict]:
    """Per concurrency: medians over rounds of each path's figures; per ext_proc path the added p50 and the throughput ratio."""
    out = []
    med = lambda rows, f: round(statistics.median(f(r) for r in rows), 3) if rows else None  # noqa: E731
    for c in sorted({r["concurrency"] for r in rounds}):
        at = [r for r in rounds if r["concurrency"] == c]
        row: dict = {"concurrency": c}
        for path in PATHS:
            rows = [r for r in at if r["path"] == path]
            if not rows:
                continue
            row[path] = {"req_per_s": med(rows, lambda r: r["req_per_s"]), "p50_ms": med(rows, lambda r: r["latency_ms"]["p50"]),
                         "p99_ms": med(rows, lambda r: r["latency_ms"]["p99"]), "errors": sum(r["errors"] for r in rows)}
            if path == "direct":
                continue
            pairs = [(d, e) for d in at for e in rows if d["path"] == "direct" and d["round"] == e["round"]]
            name = path.split("+")[1]  # epp | floor
            # Interleaved rounds (c=1): the median of per-cycle differences; otherwise the difference of the p50s.
            added = [e["paired_added_ms"]["p50"] if "paired_added_ms" in e else round(e["latency_ms"]["p50"] - d["latency_ms"]["p50"], 3)
                     for d, e in pairs]
            ratio = [round(e["req_per_s"] / d["req_per_s"], 4) if d["req_per_s"] else 0.0 for d, e in pairs]
            row["rounds"] = len(pairs)
            row[f"{name}_added_p50_ms"] = round(statistics.median(added), 3) if added else None
            row[f"{name}_added_p50_ms_per_round"] = added
            row[f"{name}_throughput_ratio"] = round(statistics.median(ratio), 4) if ratio else None
            row[f"{name}_throughput_ratio_per_round"] = ratio
        out.append(row)
    return out


COLORS = {"direct": ("Envoy direct", "#4c72b0"), "envoy+floor": ("Envoy + fixed-route ext_proc (grpc-python floor)", "#8c8c8c"),
          "envoy+epp": ("Envoy + EPP", "#dd8452")}


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [s["concurrency"] for s in summary]
    paths = [p for p in PATHS if p in summary[0]]
    width = 0.8 / len(paths)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for k, key in enumerate(paths):
        label, color = COLORS[key]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(cs))]
        ax1.bar(xs, [s[key]["req_per_s"] for s in summary], width=width, label=label, color=color)
        ax2.bar(xs, [s[key]["p50_ms"] for s in summary], width=width, label=label, color=color)
        if key == "envoy+epp":
            for x, s in zip(xs, summary):
                ax1.annotate(f"×{s['epp_throughput_ratio']:.3f}", (x, s[key]["req_per_s"]), ha="center", va="bottom", fontsize=8)
                ax2.annotate(f"+{s['epp_added_p50_ms']:.2f} ms", (x, s[key]["p50_ms"]), ha="center", va="bottom", fontsize=8)
    for ax, ylabel in ((ax1, "requests / s (median of rounds)"), (ax2, "latency p50, ms (median of rounds, log)")):
        ax.set_xticks(range(len(cs)), [f"c={c}" for c in cs])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from gateway.envoy_config import EnvoySettings
    from gateway.envoy_process import start_envoy, wait_envoy_ready
    from local_stack.processes import ProcessGroup

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="envoy-loadgen-"))
    procs = ProcessGroup(workdir / "logs")
    upstreams = [_free_port() for _ in range(args.endpoints)]
    gateway_port, direct_port, floor_port, admin = _free_port(), _free_port(), _free_port(), _free_port()
    grpc, health, metrics, floor_grpc = _free_port(), _free_port(), _free_port(), _free_port()
    eps = workdir / "endpoints.yaml"
    eps.write_text("endpoints:\n" + "".join(f"- {{name: upstream-{i}, address: 127.0.0.1, port: {p}, labels: {{role: proxy}}}}\n"
                                            for i, p in enumerate(upstreams)))
    settings = EnvoySettings.local(gateway_port, admin, [grpc], served_header=False)
    urls = {"direct": f"http://127.0.0.1:{direct_port}/v1/chat/completions",
            "envoy+epp": f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            "envoy+floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions"}
    paths = [p for p in PATHS if args.floor or p != "envoy+floor"]
    rounds: list[dict] = []
    try:
        epp = procs.start("epp", ["epp.cli", "serve", "--endpoints-file", str(eps), "--secure-serving=false", "--bind-address", "127.0.0.1",
                                  "--grpc-port", str(grpc), "--grpc-health-port", str(health), "--metrics-port", str(metrics),
                                  "--config-profile", args.profile])
        pids = {"direct": None, "envoy+epp": epp.proc.pid}
        if args.floor:
            floor = procs.start("floor", ["extproc_loadgen.baseline_server", "--port", str(floor_grpc), "--destination", f"127.0.0.1:{upstreams[0]}"])
            pids["envoy+floor"] = floor.proc.pid
        procs.wait_http(epp, f"http://127.0.0.1:{metrics}/metrics")
        config = bench_config(settings, upstreams, direct_port, (floor_port, floor_grpc) if args.floor else None)
        envoy = start_envoy(procs, settings, workdir / "envoy.yaml", config=config, extra_args=("--concurrency", str(args.envoy_workers)))
        wait_envoy_ready(envoy, admin)
        body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "word " * CHAT_BODY_WORDS}],
                           "max_tokens": 128}).encode()
        print(f"envoy-loadgen: {', '.join(paths)}; {args.endpoints} upstreams, {len(body)} B chat body, {args.duration:g} s per "
              f"measurement, {args.repeat} rounds; logs {workdir}/logs", flush=True)
        for c in args.concurrency:
            for i in range(args.repeat):
                if c == 1:  # latency: the paths interleaved request by request, so load spikes hit them alike
                    results = measure_interleaved({p: urls[p] for p in paths}, body, args.warmup, args.duration, pids)
                else:  # throughput: one path at a time, rotating which goes first
                    results = [measure(path, urls[path], body, c, args.warmup, args.duration, envoy.proc.pid, pids[path])
                               for path in paths[i % len(paths):] + paths[:i % len(paths)]]
                for r in results:
                    r["round"] = i
                    rounds.append(r)
                    _print_round(r, args.repeat)
        scheduled = scrape(metrics)["inference_extension_scheduler_e2e_duration_seconds_count"]
    finally:
        procs.stop()
    return {"rounds": rounds, "summary": summarize(rounds), "epp_scheduled_requests": scheduled,
            "setup": {"endpoints": args.endpoints, "profile": args.profile, "envoy_workers": args.envoy_workers, "body_bytes": len(body),
                      "duration_s": args.duration, "warmup_s": args.warmup, "repeat": args.repeat, "cpus": os.cpu_count(),
                      "load_average_at_end": os.getloadavg()}}


def _print_round(r: dict, repeat: int) -> None:
    cpu = "".join(f"  {who} {r[key]} µs CPU/req" for who, key in (("envoy", "envoy_cpu_us_per_request"), ("ext_proc", "extproc_cpu_us_per_request"))
                  if r[key] is not None)
    paired = f"  paired +{r['paired_added_ms']['p50']:.2f} ms" if "paired_added_ms" in r else ""
    print(f"  c={r['concurrency']:<3d} round {r['round'] + 1}/{repeat} {r['path']:11s} {r['req_per_s']:8.1f} req/s  "
          f"p50 {r['latency_ms']['p50']:7.2f} ms  p99 {r['latency_ms']['p99']:7.2f} ms{paired}{cpu}  errors {r['errors']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="envoy-loadgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,32", help="comma-separated requests-in-flight levels (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="rounds per level; medians are reported (default: %(default)s)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per path and round (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before each measurement (default: %(default)s)")
    p.add_argument("--endpoints", type=int, default=4, help="upstream listeners the EPP picks among (default: %(default)s)")
    p.add_argument("--profile", default="proxy-performance", help="EPP config profile (default: %(default)s)")
    p.add_argument("--envoy-workers", type=int, default=2, help="Envoy's --concurrency, its worker threads (default: %(default)s)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure Envoy + a fixed-route ext_proc server, the grpc-python floor (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="configs and logs go here (default: a new temporary directory)")
    p.add_argument("--output-dir", default=None, help="write envoy-loadgen.json and envoy-loadgen.png here (default: print only)")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency: comma-separated integers, e.g. 1,32")
    if not args.concurrency or min(args.concurrency) < 1 or args.repeat < 1 or args.duration <= 0:
        p.error("--concurrency levels, --repeat and --duration must be positive")
    try:
        result = run(args)
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"envoy-loadgen: {e}", file=sys.stderr)
        return 1
    result["command"] = " ".join(["envoy-loadgen", *(argv if argv is not None else sys.argv[1:])])
    print()
    for s in result["summary"]:
        line = f"c={s['concurrency']:<3d} medians of {s['rounds']} rounds: " + " | ".join(
            f"{p} {s[p]['req_per_s']:.1f} req/s p50 {s[p]['p50_ms']:.2f} ms" for p in PATHS if p in s)
        print(line)
        for name in ("floor", "epp"):
            if f"{name}_added_p50_ms" in s:
                print(f"      {name.upper():5s} adds {s[f'{name}_added_p50_ms']:.2f} ms p50 (rounds {s[f'{name}_added_p50_ms_per_round']}), "
                      f"throughput ratio {s[f'{name}_throughput_ratio']:.3f} (rounds {s[f'{name}_throughput_ratio_per_round']})")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "envoy-loadgen.json").write_text(json.dumps(result, indent=2))
        plot(result["summary"], out / "envoy-loadgen.png", result["command"])
        print(f"wrote {out / 'envoy-loadgen.json'} and {out / 'envoy-loadgen.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
