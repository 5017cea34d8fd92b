"""`extproc-loadgen`: how fast one EPP process serves the full 4-phase ext_proc flow.

Starts `epp serve` as its own process with N synthetic endpoints, drives it from this process
over one HTTP/2 connection (as Envoy does) with C concurrent request streams, and reports:
req/s, the latency the EPP adds per request (request headers sent → routed body back, and the
whole 4-phase exchange), the server's CPU per request (from /proc), and the share of that CPU
spent in scheduling (from the EPP's own inference_extension_scheduler_e2e_duration_seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc_loadgen.envoy_flow import body_messages, headers_message
from extproc_loadgen.window import measured_window

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_endpoints(path: Path, n: int) -> None:
    lines = ["endpoints:"]
    for i in range(n):
        backend = "nvlink" if i % 2 == 0 else "fs"
        lines.append(f"- {{name: proxy-{i}, address: 10.0.{i // 250}.{i % 250 + 1}, port: 8000, labels: {{role: proxy, llm-d.ai/kv-backend: {backend}}}}}")
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def steal_ticks(cpu: int = 0) -> int:
    """Ticks the hypervisor took from `cpu` (a noisy VM shows up here, not in the process's CPU time)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            return int(line.split()[8])
    return 0


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for name in ("inference_extension_scheduler_e2e_duration_seconds_sum", "inference_extension_scheduler_e2e_duration_seconds_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")


METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def _flow_messages(body: bytes, response: bytes) -> list[bytes]:
    """The 4 client messages of one request, serialised once (Envoy's cost is not what we measure)."""
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
               **{f"x-client-header-{i}": "v" * 40 for i in range(16)}}
    return [
        headers_message(headers).SerializeToString(),
        body_messages(body, len(body))[0].SerializeToString(),
        headers_message({":status": "200", "content-type": "application/json"}, request=False).SerializeToString(),
        body_messages(response, len(response), request=False)[0].SerializeToString(),
    ]


async def _drive(port: int, concurrency: int, warmup: float, duration: float, body: bytes, response: bytes, on_measure) -> dict:
    """C workers, each looping over new streams: FULL_DUPLEX_STREAMED, 4 messages each way."""
    m_headers, m_body, m_resp_headers, m_resp_body = _flow_messages(body, response)
    route_lat: list[float] = []
    total_lat: list[float] = []
    errors = 0
    state = {"measuring": False, "stop": False}
    ident = lambda b: b  # noqa: E731  raw bytes both ways keep the client cheap
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        process = ch.stream_stream(METHOD, request_serializer=ident, response_deserializer=ident)

        async def one() -> tuple[float, float]:
            t0 = time.perf_counter()
            call = process()
            await call.write(m_headers)
            await call.write(m_body)
            first = await call.read()
            await call.read()  # the re-emitted body
            t1 = time.perf_counter()
            reply = pb.ProcessingResponse.FromString(first)
            if not reply.HasField("request_headers"):
                raise RuntimeError("request was not routed")
            await call.write(m_resp_headers)
            await call.read()
            await call.write(m_resp_body)
            await call.read()
            await call.done_writing()
            await call.read()  # EOF
            return t1 - t0, time.perf_counter() - t0

        async def worker() -> None:
            nonlocal errors
            while not state["stop"]:
                try:
                    route, total = await one()
                    ok = True
                except (grpc.aio.AioRpcError, RuntimeError):
                    ok = False
                if state["measuring"]:
                    if ok:
                        route_lat.append(route)
                        total_lat.append(total)
                    else:
                        errors += 1

        elapsed, before, after = await measured_window(worker, concurrency, warmup, duration, state, on_measure)
    return {"route": route_lat, "total": total_lat, "errors": errors, "elapsed": elapsed, "before": before, "after": after}


def _snapshot(pid: int, metrics_port: int | None) -> dict:
    snap = {"steal": steal_ticks(0), "cpu": cpu_seconds(pid)}
    if metrics_port is None:
        snap.update({"inference_extension_scheduler_e2e_duration_seconds_sum": 0.0,
                     "inference_extension_scheduler_e2e_duration_seconds_count": 0.0})
    else:
        snap.update(scrape(metrics_port))
    return snap


def _client_case(grpc_port, concurrency, warmup, duration, body, response, pid, metrics_port, pin) -> dict:
    if pin:
        os.sched_setaffinity(0, {1})
    return asyncio.run(_drive(grpc_port, concurrency, warmup, duration, body, response, lambda: _snapshot(pid, metrics_port)))


def _pin(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


def run_case(endpoints: int, concurrency: int, warmup: float, duration: float, profile: str, workdir: Path,
             pin: bool = True, baseline: bool = False) -> dict:
    eps = workdir / f"endpoints-{endpoints}.yaml"
    write_endpoints(eps, endpoints)
    grpc_port, health_port, metrics_port = _free_port(), _free_port(), _free_port()
    cmd = [sys.executable, "-m", "epp.cli", "serve", "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
           "--metrics-port", str(metrics_port), "--bind-address", "127.0.0.1", "--endpoints-file", str(eps),
           "--secure-serving=false", "--config-profile", profile]
    if baseline:
        cmd = [sys.executable, "-m", "extproc_loadgen.baseline_server", "--port", str(grpc_port)]
    log = open(workdir / f"epp-{endpoints}.log", "wb")
    pin = pin and len(os.sched_getaffinity(0)) >= 2
    # Server on CPU 0, this load generator on CPU 1: the EPP's cost is measured without contention.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_pin(0) if pin else None)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if baseline:
                    import socket

                    socket.create_connection(("127.0.0.1", grpc_port), timeout=1).close()
                else:
                    scrape(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"epp did not start; see {log.name}")
                time.sleep(0.2)
        body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 128}).encode()
        response = json.dumps({"id": "cmpl-1", "model": "meta-llama/Llama-3.1-8B-Instruct", "choices": [{"text": "ok"}],
                               "usage": {"prompt_tokens": 401, "completion_tokens": 128}}).encode()

        # A fresh client process per case: a grpc client reused across cases slows down.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            r = pool.apply(_client_case, (grpc_port, concurrency, warmup, duration, body, response, proc.pid,
                                          None if baseline else metrics_port, pin))
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
    n = len(r["total"])
    cpu = r["after"]["cpu"] - r["before"]["cpu"]
    sched_s = r["after"]["inference_extension_scheduler_e2e_duration_seconds_sum"] - r["before"]["inference_extension_scheduler_e2e_duration_seconds_sum"]
    sched_n = r["after"]["inference_extension_scheduler_e2e_duration_seconds_count"] - r["before"]["inference_extension_scheduler_e2e_duration_seconds_count"]
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    return {
        "server": "baseline (fixed route, gRPC floor)" if baseline else "epp",
        "endpoints": endpoints,
        "concurrency": concurrency,
        "profile": profile,
        "requests": n,
        "errors": r["errors"],
        "req_per_s": round(n / r["elapsed"], 1),
        "route_latency_ms": {"p50": ms(_pct(r["route"], 50)), "p99": ms(_pct(r["route"], 99)), "mean": ms(statistics.fmean(r["route"])) if n else None},
        "flow_latency_ms": {"p50": ms(_pct(r["total"], 50)), "p99": ms(_pct(r["total"], 99))},
        "server_cpu_cores": round(cpu / r["elapsed"], 3),
        "server_cpu_us_per_request": round(cpu / n * 1e6, 1) if n else None,
        "scheduling_us_per_request": round(sched_s / sched_n * 1e6, 1) if sched_n else None,
        "cpu0_steal_share": round((r["after"]["steal"] - r["before"]["steal"]) / CLK_TCK / r["elapsed"], 3),
        "scheduling_share_of_server_cpu": round((sched_s / sched_n) / (cpu / n), 4) if n and sched_n and cpu else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="extproc-loadgen", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--endpoints", default="8,256", help="comma-separated endpoint counts, one run each")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent request streams on one HTTP/2 connection")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of traffic before measuring")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--profile", default="proxy-performance", help="EPP config profile")
    p.add_argument("--baseline", action="store_true", help="also measure a fixed-route ext_proc server (the gRPC floor)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the EPP to CPU 0 and the load generator to CPU 1")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="extproc-loadgen-") as tmp:
        for n in [int(x) for x in args.endpoints.split(",") if x]:
            cases = [True, False] if args.baseline else [False]
            for baseline in cases:
                r = run_case(n, args.concurrency, args.warmup, args.duration, args.profile, Path(tmp), pin=not args.no_pin, baseline=baseline)
                results.append(r)
                _print(r)
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(["extproc-loadgen", *(argv if argv is not None else sys.argv[1:])]), "results": results}, indent=2))
    return 0


def _print(r: dict) -> None:
    print(
                f"{'baseline' if r['server'] != 'epp' else 'epp':8} endpoints={r['endpoints']:4d} c={r['concurrency']} {r['req_per_s']:8.1f} req/s  "
                f"route p50={r['route_latency_ms']['p50']:.2f}ms p99={r['route_latency_ms']['p99']:.2f}ms  "
                f"4-phase p50={r['flow_latency_ms']['p50']:.2f}ms p99={r['flow_latency_ms']['p99']:.2f}ms  "
                f"server {r['server_cpu_us_per_request']}µs CPU/req, scheduling {r['scheduling_us_per_request']}µs "
        f"({100 * (r['scheduling_share_of_server_cpu'] or 0):.1f}%)  cpu0 steal {100 * r['cpu0_steal_share']:.0f}%  errors={r['errors']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
