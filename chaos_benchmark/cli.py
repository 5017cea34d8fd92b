"""`epp-chaos`: kill a backend process under load and measure how the EPP routes around it, profile by profile.

For each profile it starts the local stack afresh (whatever gateway the stack runs), sends a few
warm-up requests, and a bounded Poisson load of streaming completions while the fault schedule
kills a process and starts it again. Prints, per profile, requests answered / clear errors /
hung / lost, the failures beyond those in flight on the dead pair at the kill, when the dead
pair was last picked after the kill, and when it served its first 200 after the restart (after the
load, a trickle of requests goes on until it has, for at most 90 s). Writes
`<name>.json` (every request), `<name>.md` and `<name>_timeline.png` (picks per endpoint over
time, faults marked).

    epp-chaos --profiles proxy-performance,predicted-latency --requests 400 --qps 10 \\
        --fault vllm-p2p-proxy-decode,12,26 --output-dir docs/chaos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from epp.util.progress import progress

from chaos_benchmark import faults as fx
from chaos_benchmark.client import run_load
from chaos_benchmark.decisions import read_file
from chaos_benchmark.report import analyse, table, timeline_plot
from serving_benchmark.workload import build_workload

TRACEBACK = "Traceback (most recent call last)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp-chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--profiles", default="all", help="comma-separated EPP profiles, or `all` shipped ones (default: %(default)s)")
    a("--requests", type=int, default=400, help="requests per profile (default: %(default)s)")
    a("--qps", type=float, default=10.0, help="Poisson arrival rate (default: %(default)s)")
    a("--fault", action="append", default=None, metavar="PROCESS,KILL_AT,RESTART_AT[,SIGNAL]",
      help="signal PROCESS KILL_AT seconds into the load and start it again at RESTART_AT (`-`: never). SIGNAL: KILL (default), "
           "TERM, STOP (a hang, continued at RESTART_AT), USR1 (a simulator's engine dies) or USR2 (its engine hangs). "
           "Processes: <proxy>, <proxy>-prefill, <proxy>-decode (default: vllm-p2p-proxy-decode,12,26)")
    a("--request-timeout", type=float, default=30.0, help="seconds after which a request counts as hung (default: %(default)s)")
    a("--max-output-tokens", type=int, default=64, help="output tokens cap (default: %(default)s)")
    a("--max-request-len", type=int, default=2048, help="prompt + output tokens cap (default: %(default)s)")
    a("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    a("--model", default="meta-llama/Llama-3.1-8B-Instruct", help="model name in requests (default: %(default)s)")
    a("--warmup", type=int, default=8, help="unmeasured requests before each profile (default: %(default)s)")
    a("--topology", default=None, help="local stack topology YAML (see epp-stack)")
    a("--workdir", default=".stack-chaos", help="local stacks' working directory, one folder per profile (default: %(default)s)")
    a("--output-dir", default="chaos-results", help="where files go (default: %(default)s)")
    a("--name", default="chaos", help="base name of the output files (default: %(default)s)")
    return p


def _health_url(stack, name: str) -> str:
    for p in stack.proxies:
        for suffix, port in (("", p.port), ("-prefill", p.prefill_port), ("-decode", p.decode_port)):
            if name == p.name + suffix:
                return f"http://127.0.0.1:{port}/health"
    raise ValueError(f"no process {name!r} in the stack")


def wait_all_healthy(stack, timeout: float = 60.0) -> None:
    """Every proxy answers /health 200 (its prefill and decode are up) before a profile's run starts."""
    deadline = time.monotonic() + timeout
    pending = [f"http://127.0.0.1:{p.port}/health" for p in stack.proxies]
    while pending and time.monotonic() < deadline:
        pending = [u for u in pending if not fx.answers_200(u)]
        time.sleep(0.2)
    if pending:
        raise TimeoutError(f"the stack did not recover: {pending} not healthy after {timeout:g}s; logs in {stack.logs}")


def _pick_interval(profile: str) -> float:
    """The readiness interval of the profile's endpoint-health plugin: the 'scrape interval' of the pick bound."""
    from epp.config import resolve_config
    from epp.endpoint_health import parse_policy

    for p in resolve_config(profile=profile).data.get("plugins", []):
        if p.get("type") == "endpoint-health":
            return parse_policy("endpoint-health", p.get("parameters") or {}).readiness.interval
    return 1.0


def _tracebacks(logs: Path) -> dict[str, int]:
    out = {}
    for f in sorted(logs.glob("*.log")):
        n = f.read_text(errors="replace").count(TRACEBACK)
        if n:
            out[f.stem] = n
    return out


async def _schedule(stack, schedule: list[fx.Fault], t0: float, log: list[dict]) -> None:
    """Kill and restart on time, off the event loop (a kill waits for the process to be reaped)."""
    steps = sorted([(f.at, "kill", f) for f in schedule] + [(f.restart_at, "restart", f) for f in schedule if f.restart_at is not None],
                   key=lambda s: s[0])
    for at, action, f in steps:
        delay = t0 + at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        done = {"action": action, "process": f.process, "at": round(time.time() - t0, 3)}  # the signal goes now
        if action == "kill":
            await asyncio.to_thread(fx.kill, stack, f.process, f.signal)
        else:
            await asyncio.to_thread(fx.restart, stack, f.process, f.signal)
            asyncio.get_running_loop().create_task(_answering(_health_url(stack, f.process), f.process, t0, log))
        log.append(done)


async def _answering(url: str, process: str, t0: float, log: list[dict], timeout: float = 120.0) -> None:
    """Note when a restarted process answers its /health again (its start-up time is not the EPP's)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if await asyncio.to_thread(fx.answers_200, url):
            log.append({"action": "answering", "process": process, "at": round(time.time() - t0, 3)})
            return
        await asyncio.sleep(0.1)


async def _until_dead_serves(stack, args, dead: str, since: float, run_id: str, limit: float = 90.0) -> list:
    """After the load: a trickle of requests until the restarted endpoint has answered one (or `limit` s pass).

    On a loaded machine a restarted simulator can take longer to start than the load lasts;
    these requests only time its return and are not counted with the load's.
    """
    import httpx

    from chaos_benchmark.client import ANSWERED, send_one
    from serving_benchmark.workload import Request

    out = []
    deadline = time.time() + limit
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=5.0)) as client:
        i = 0
        while time.time() < deadline:
            picks, _ = read_file(stack.epp_log, since)
            routed = {p.request_id for p in picks if p.endpoint == dead}
            if any(s.request_id in routed and s.outcome == ANSWERED for s in out):
                break
            r = Request(i, "recovery " * 50, 50, 8, 0.0)
            out.append(await send_one(client, stack.gateway_url, args.model, r, f"{run_id}-recovery-{i}", args.request_timeout))
            i += 1
            await asyncio.sleep(0.5)
    return out


async def _one_run(stack, args, schedule, workload, run_id: str) -> tuple[list, list, float, list[dict]]:
    actions: list[dict] = []
    t0 = time.time() + 0.2
    with progress(len(workload), desc=run_id, unit="req", leave=False) as bar:
        load = asyncio.create_task(run_load(stack.gateway_url, args.model, workload, run_id, args.request_timeout, bar.update, t0))
        faults = asyncio.create_task(_schedule(stack, schedule, t0, actions))
        sent, start = await load
        await faults
    recovery = []
    f0 = schedule[0]
    if f0.restart_at is not None:
        recovery = await _until_dead_serves(stack, args, f0.endpoint(stack), start + f0.restart_at, run_id)
    return sent, recovery, start, actions


def _run_profile(stack, args, profile: str, schedule: list[fx.Fault]) -> dict:
    wait_all_healthy(stack)
    if args.warmup:
        warm = build_workload(args.warmup, 0, "uniform", args.max_request_len, 8, args.seed + 1000)
        asyncio.run(run_load(stack.gateway_url, args.model, warm, f"warmup-{profile}", args.request_timeout))
    before = _tracebacks(stack.logs)
    workload = build_workload(args.requests, args.qps, "poisson", args.max_request_len, args.max_output_tokens, args.seed)
    sent, recovery, start, actions = asyncio.run(_one_run(stack, args, schedule, workload, f"{args.name}-{profile}"))
    for f in schedule:
        if f.restart_at is not None:
            stack.procs.wait_http(fx.find(stack, f.process), _health_url(stack, f.process), timeout=60)
    time.sleep(0.5)  # the EPP's last log lines
    picks, events = read_file(stack.epp_log, since=start - 1.0)
    after = _tracebacks(stack.logs)
    tracebacks = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    f0 = schedule[0]
    def when(action: str, default: float | None) -> float | None:  # the schedule's times as they happened
        return next((x["at"] for x in actions if x["action"] == action and x["process"] == f0.process), default)

    a = analyse(sent, picks, events, start, f0.endpoint(stack), when("kill", f0.at), when("restart", f0.restart_at),
                _pick_interval(profile), recovery, when("answering", None))
    print(f"{profile:30} answered {a['answered']}/{a['requests']}  clear errors {a['clear_error']}  hung {a['hung']}  lost {a['lost']}  "
          f"failed beyond in-flight {a['failed_beyond_in_flight']} ({a['failed_beyond_in_flight_pct']:.1f}%)  "
          f"last pick of {a['dead_endpoint']} {a['last_pick_after_kill_s']} s after the kill  "
          f"first 200 {a.get('first_200_after_restart_s')} s after the restart ({a.get('first_200_after_back_s')} s after it answered "
          f"/health again)  tracebacks {sum(tracebacks.values())}", flush=True)
    return {"profile": profile, "faults": [{"process": f.process, "at": f.at, "restart_at": f.restart_at, "signal": f.signal} for f in schedule],
            "actions": actions, "tracebacks": sum(tracebacks.values()), "tracebacks_by_log": tracebacks, "analysis": a}


def main(argv: list[str] | None = None) -> int:
    from local_stack.processes import run_stopping_children_on_termination

    return run_stopping_children_on_termination("epp-chaos", lambda: _main(argv))  # `kill` stops its stacks, as Ctrl-C does


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from epp.config.loader import list_profiles
    from local_stack.stack import LocalStack, StackPorts, free_port
    from local_stack.topology import load_topology

    try:
        schedule = [fx.Fault.parse(s) for s in (args.fault or ["vllm-p2p-proxy-decode,12,26"])]
    except ValueError as e:
        print(f"epp-chaos: {e}", file=sys.stderr)
        return 2
    profiles = list_profiles() if args.profiles == "all" else [p.strip() for p in args.profiles.split(",") if p.strip()]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = [], []
    for profile in profiles:
        # a fresh stack per profile: every profile starts from the same healthy state, whatever the last one left broken
        stack = LocalStack(load_topology(args.topology), profile, Path(args.workdir) / profile,
                           StackPorts(free_port(), free_port(), free_port(), free_port()))
        try:
            stack.start(progress=lambda m: print(f"[epp-chaos] {profile}: {m}", flush=True))
            for f in schedule:
                _health_url(stack, f.process)  # an unknown process name fails before any load
            runs.append(_run_profile(stack, args, profile, schedule))
        except (RuntimeError, TimeoutError, ValueError) as e:
            print(f"epp-chaos: {profile}: {e}", file=sys.stderr)
            failed.append(profile)
        finally:
            stack.stop()
    if not runs:
        return 1
    md = table(runs)
    print("\n" + md)
    command = "epp-chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{args.name}.md").write_text(f"`{command}`\n\n{md}\n")
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                       "requests": args.requests, "qps": args.qps, "runs": runs}, separators=(",", ":")))
    timeline_plot(runs, out / f"{args.name}_timeline.png")
    print(f"wrote {out}/{args.name}.md, .json and _timeline.png")
    if failed:
        print(f"epp-chaos: no result for {', '.join(failed)} (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
