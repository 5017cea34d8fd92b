"""`epp-bench`: the serving benchmark (modelled on benchmark_serving.py) through the gateway.

Without --gateway it starts the local stack itself. --compare-profiles runs every profile on
the same workload and seed in one invocation, restarting only the EPP between profiles, and
writes a comparison table and plot next to each run's files.

    epp-bench --compare-profiles round-robin,proxy-performance,bandwidth-aware,predicted-latency \\
        --distribution burst,poisson --qps 10,20 --random_prompt_count 100 --output-dir docs/benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from epp.util.progress import progress

from serving_benchmark.report import comparison_plot, comparison_table, summarize, write_run
from serving_benchmark.runner import run_workload
from serving_benchmark.workload import build_shared_prefix_workload, build_workload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--gateway", default=None, help="use a running gateway (e.g. http://127.0.0.1:18080) instead of starting the local stack")
    a("--profile", default="proxy-performance", help="EPP profile when not comparing (default: %(default)s)")
    a("--compare-profiles", default=None,
      help="comma-separated profiles to run on the same workload (needs the local stack); an entry LABEL=FILE.yaml runs an "
           "EndpointPickerConfig file (e.g. llm-d's published ones) under that label")
    a("--qps", default="10", help="request rate(s), comma-separated (default: %(default)s); ignored by burst")
    a("--distribution", default="poisson", help="burst | poisson | uniform, comma-separated (default: %(default)s)")
    a("--random_prompt_count", type=int, default=100, help="requests per run (default: %(default)s)")
    a("--max_request_len", type=int, default=2048, help="prompt + output tokens cap (default: %(default)s)")
    a("--max_output_tokens", type=int, default=64, help="output tokens cap (default: %(default)s)")
    a("--dataset_path", default=None, help="ShareGPT-format JSON; synthetic ShareGPT-like lengths when absent")
    a("--workload", choices=("sharegpt", "shared-prefix"), default="sharegpt",
      help="sharegpt: independent prompts (--dataset_path or synthetic); shared-prefix: multi-turn chats behind one system "
           "prompt (default: %(default)s)")
    a("--system_prompt_tokens", type=int, default=2000, help="shared-prefix: tokens of the common system prompt (default: %(default)s)")
    a("--turns", type=int, default=4, help="shared-prefix: turns per conversation (default: %(default)s)")
    a("--user_tokens", type=int, default=150, help="shared-prefix: tokens per user message, ±30%% (default: %(default)s)")
    a("--reply_tokens", type=int, default=100, help="shared-prefix: tokens per assistant reply in the history, ±30%% (default: %(default)s)")
    a("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    a("--model", default=None, help="model name in requests (default: the local stack's, meta-llama/Llama-3.1-8B-Instruct with --gateway)")
    a("--warmup", type=int, default=8, help="unmeasured requests before each profile (default: %(default)s)")
    a("--output-dir", default="bench-results", help="where files go (default: %(default)s)")
    a("--log_filename", "--name", dest="name", default="bench", help="base name of the output files (default: %(default)s)")
    a("--interleave", action="store_true", help="run every profile on one scenario before the next (restarting the EPP each time)")
    a("--repeat", type=int, default=1, help="run the whole comparison this many times and add a median table (default: %(default)s)")
    a("--baseline", default="proxy-performance", help="profile the median table compares the others with (default: %(default)s)")
    a("--topology", default=None, help="local stack topology YAML (see epp-stack)")
    a("--engine", default=None, choices=("sim", "vllm"),
      help="local stack engine: sim (simulators) or vllm (real vLLM CPU servers, make vllm-setup) (default: the topology's, else sim)")
    a("--workdir", default=".stack-bench", help="local stack working directory (default: %(default)s)")
    a("--gateway-port", type=int, default=18080, help="local stack gateway port (default: %(default)s)")
    a("--allow-experimental-plugins", action="store_true",
      help="start the EPP with --allow-experimental-plugins (llm-d's alpha topology-affinity plugins) (default: off)")
    a("--degrade-link", default=None, metavar="PREFILL,DECODE,FACTOR,AT",
      help="P/D cluster topology: in every run, scale that link's bandwidth by FACTOR AT seconds after the start (restored "
           "after the run), and report how the traffic on it moved (default: off)")
    return p


def _without(argv: list[str], *flags: str) -> list[str]:
    """argv minus the given flags and their values (`--flag value` or `--flag=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def scenarios(dists: str, qps: str) -> list[tuple[str, float]]:
    out = []
    for d in [x.strip() for x in dists.split(",") if x.strip()]:
        if d == "burst":
            out.append((d, 0.0))
        else:
            out.extend((d, float(q)) for q in qps.split(",") if q.strip())
    return out


def make_workload(args: argparse.Namespace, qps: float, dist: str) -> list:
    if args.workload == "shared-prefix":
        return build_shared_prefix_workload(args.random_prompt_count, qps, dist, args.max_output_tokens, args.seed,
                                            system_tokens=args.system_prompt_tokens, turns=args.turns, user_tokens=args.user_tokens,
                                            reply_tokens=args.reply_tokens)
    return build_workload(args.random_prompt_count, qps, dist, args.max_request_len, args.max_output_tokens, args.seed, args.dataset_path)


def cache_hits(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The engines' prefix-cache hit rate over a run: prompt tokens found cached / prompt tokens looked up."""
    queried, hit = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried if queried > 0 else 0.0}


def pd_summary(stack, start_wall: float, degrade, timer, applied: list) -> dict:
    """A P/D cluster run: the routes taken (the EPP's decision log) and, with a degraded link, how traffic left it; then the link is restored."""
    from local_stack.cluster_stack import degrade_link
    from serving_benchmark.pd_routes import routes, summarize_routes

    if timer is not None:
        timer.cancel()
    time.sleep(0.5)  # the decision log's last lines
    names = {f"127.0.0.1:{p.endpoint_port}": p.name for p in stack.pods.values()}
    out = summarize_routes(routes(stack.epp_log, names, start_wall, time.time()), degrade, applied[0] if applied else None)
    if degrade is not None and applied:
        degrade_link(stack.workdir, degrade.prefill, degrade.decode, 1.0)
        time.sleep(stack.topology.cluster.live_profile_max_age)  # the sidecars forget the degraded link before the next run
    return out


def main(argv: list[str] | None = None) -> int:
    from local_stack.processes import run_stopping_children_on_termination

    return run_stopping_children_on_termination("epp-bench", lambda: _main(argv))  # `kill` stops its stacks, as Ctrl-C does


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeat > 1:
        from serving_benchmark.aggregate import aggregate

        base = list(argv if argv is not None else sys.argv[1:])
        runs = []
        for i in range(args.repeat):
            run_dir = str(Path(args.output_dir) / f"run{i + 1}")
            code = main([*_without(base, "--repeat", "--output-dir"), "--output-dir", run_dir])
            if code != 0:
                return code
            runs.append(run_dir)
        print("\nmedian over runs:\n" + aggregate(runs, args.output_dir, args.name, args.baseline))
        return 0
    profiles = [p.strip() for p in (args.compare_profiles or args.profile).split(",") if p.strip()]
    configs = {p.partition("=")[0]: (p.partition("=")[2] or p) for p in profiles}  # label -> profile name or config file
    profiles = list(configs)
    degrade = None
    if args.degrade_link:
        from serving_benchmark.pd_routes import Degrade

        try:
            degrade = Degrade.parse(args.degrade_link)
        except ValueError as e:
            print(f"epp-bench: {e}", file=sys.stderr)
            return 2
    scens = scenarios(args.distribution, args.qps)
    out = Path(args.output_dir)
    stack = None
    if args.gateway:
        if len(profiles) > 1:
            print("epp-bench: --compare-profiles restarts the EPP, so it needs the local stack (drop --gateway)", file=sys.stderr)
            return 2
        url = args.gateway.rstrip("/")
        args.model = args.model or "meta-llama/Llama-3.1-8B-Instruct"
        backend_of = name_of = lambda served: served or "unknown"  # noqa: E731
    else:
        from local_stack.stack import LocalStack, StackPorts, free_port
        from local_stack.topology import load_topology

        try:
            topology = load_topology(args.topology, args.engine)
            args.model = args.model or topology.model
            if degrade is not None and topology.cluster is None:
                raise ValueError("--degrade-link needs a topology with a P/D cluster (see local_stack/cluster.py)")
            stack = LocalStack(topology, configs[profiles[0]], args.workdir,
                               StackPorts(args.gateway_port, free_port(), free_port(), free_port()))
            stack.epp_args = ["--allow-experimental-plugins"] if args.allow_experimental_plugins else []
            stack.start(progress=lambda m: print(f"[epp-bench] {m}", flush=True))
        except (RuntimeError, TimeoutError, ValueError) as e:
            print(f"epp-bench: the local stack did not start: {e}", file=sys.stderr)
            return 1
        url, backend_of, name_of = stack.gateway_url, stack.backend_of, stack.name_of
    rows = []
    try:
        # profile by profile, or with --interleave scenario by scenario (every profile in turn), so that a
        # shared machine's load drifting over minutes does not land on one profile
        order = [(p, sc) for sc in scens for p in profiles] if args.interleave else [(p, sc) for p in profiles for sc in scens]
        warmed = None
        for profile, (dist, qps) in order:
            if stack is not None and stack.profile != configs[profile]:
                stack.start_epp(configs[profile])
            if args.warmup and warmed != (profile, stack.epp if stack else None):
                warm = build_workload(args.warmup, 0, "uniform", args.max_request_len, 8, args.seed + 1000)
                asyncio.run(run_workload(url, args.model, [w for w in warm]))
                warmed = (profile, stack.epp if stack else None)
            scen = dist if dist == "burst" else f"{dist}@{qps:g}"
            workload = make_workload(args, qps, dist)
            if stack is not None:
                stack.reset_prefix_caches()  # every run starts from cold engine caches
                before = stack.prefix_cache_counters()
            start_wall, applied = time.time(), []
            timer = degrade.schedule(stack.workdir, start_wall, applied) if degrade is not None and stack is not None else None
            with progress(len(workload), desc=f"{profile} {scen}", unit="req", leave=False) as bar:
                results, duration = asyncio.run(run_workload(url, args.model, workload, bar.update))
            summary = summarize(results, duration, backend_of, name_of)
            if stack is not None and stack.pods:
                summary["pd"] = pd_summary(stack, start_wall, degrade, timer, applied)
            if stack is not None:
                summary["prefix_cache"] = cache_hits(before, stack.prefix_cache_counters())
            name = f"{args.name}_{profile}_{scen.replace('@', '_qps')}"
            meta = {"profile": profile, "scenario": scen, "distribution": dist, "qps": qps, "seed": args.seed,
                    "random_prompt_count": args.random_prompt_count, "max_request_len": args.max_request_len,
                    "command": "epp-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_run(out, name, summary, results, meta)
            rows.append({"profile": profile, "scenario": scen, "summary": summary})
            t, e = summary["ttft_s"], summary["e2e_s"]
            hits = f"  prefix hits {summary['prefix_cache']['hit_rate'] * 100:4.1f}%" if "prefix_cache" in summary else ""
            print(f"{profile:28} {scen:14} ok {summary['completed']}/{summary['requests']}  TTFT mean {t.get('mean', 0) * 1000:7.1f} ms "
                  f"p99 {t.get('p99', 0) * 1000:7.1f} ms  E2E mean {e.get('mean', 0) * 1000:7.1f} ms p99 {e.get('p99', 0) * 1000:7.1f} ms  "
                  f"split {json.dumps({k: v['count'] for k, v in summary['by_backend'].items()})}{hits}", flush=True)
            if "pd" in summary:
                print(f"{'':28} routes {json.dumps(summary['pd']['routes'])}"
                      + (f"  degraded {json.dumps({k: v for k, v in summary['pd']['degraded'].items() if k != 'timeline'})}"
                         if "degraded" in summary["pd"] else ""), flush=True)
    finally:
        if stack is not None:
            stack.stop()
    table = comparison_table(rows)
    print("\n" + table)
    (out / f"{args.name}_comparison.md").write_text(table + "\n")
    (out / f"{args.name}_comparison.json").write_text(json.dumps(
        {"command": "epp-bench " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows}, indent=1))
    comparison_plot(rows, out / f"{args.name}_comparison.png")
    print(f"wrote {out}/{args.name}_*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
