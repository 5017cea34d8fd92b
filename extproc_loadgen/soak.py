"""`extproc-soak`: does one EPP process stay bounded under hostile-but-valid traffic?

Two scenarios, each against a fresh `epp serve` process, each printing RSS, `/metrics` size and
in-flight counts at start, middle and end, and writing JSON:

* `names`: N requests, every one with a model name never seen before (the full 4-phase ext_proc
  flow, C at a time, over one HTTP/2 connection as Envoy does). A separate prober process checks
  gRPC health on the health port and on the ext_proc port every 20 ms throughout, and /metrics
  is scraped every 2 s, so exposition happens under load.
* `held`: K streams each send a B-byte body and never end it (slow uploads), with the EPP's
  `--max-buffered-body-bytes` at K×B; then E more streams try the same and must be refused with
  429; then every stream is reset and the memory given back is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc_loadgen.envoy_flow import headers_message

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")


class EPPProcess:
    """`epp serve` on free loopback ports, its log in the work dir."""

    def __init__(self, workdir: Path, name: str, extra: list[str]) -> None:
        eps = workdir / "endpoints.yaml"
        eps.write_text("endpoints:\n" + "".join(
            f"- {{name: proxy-{i}, address: 10.0.0.{i + 1}, port: 8000, labels: {{role: proxy, llm-d.ai/kv-backend: {'nvlink' if i % 2 else 'fs'}}}}}\n"
            for i in range(8)))
        self.ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
        cmd = [sys.executable, "-m", "epp.cli", "serve", "--grpc-port", str(self.ports["grpc"]), "--grpc-health-port", str(self.ports["health"]),
               "--metrics-port", str(self.ports["metrics"]), "--bind-address", "127.0.0.1", "--endpoints-file", str(eps),
               "--secure-serving=false", "--config-profile", "proxy-performance", "--admin-socket", "", *extra]
        self.log_path = workdir / f"epp-{name}.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"))
        deadline = time.monotonic() + 60
        while True:
            try:
                self.scrape()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"epp did not start; see {self.log_path}") from None
                time.sleep(0.2)

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=30).read().decode()

    def snapshot(self, label: str) -> dict:
        t0 = time.perf_counter()
        text = self.scrape()
        scrape_s = time.perf_counter() - t0
        running = sum(float(v) for v in re.findall(r"^llm_d_epp_request_running{.*} (\S+)$", text, re.M))
        held = re.search(r"^inference_epp_buffered_request_bytes (\S+)$", text, re.M)
        snap = {
            "at": label, "rss_mb": round(rss_mb(self.proc.pid), 1), "metrics_bytes": len(text),
            "metrics_series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
            "model_label_values": len(set(re.findall(r'^llm_d_epp_request_total{[^}]*model_name="([^"]*)"', text, re.M))),
            "in_flight": running, "buffered_request_bytes": float(held.group(1)) if held else None,
            "scrape_seconds": round(scrape_s, 3),
        }
        print(f"  [{label:>6}] RSS {snap['rss_mb']:7.1f} MB  /metrics {snap['metrics_bytes'] / 1024:8.1f} KB "
              f"({snap['metrics_series']} series, {snap['model_label_values']} model labels)  in-flight {running:g}  "
              f"buffered {snap['buffered_request_bytes'] or 0:,.0f} B  scrape {scrape_s * 1000:.0f} ms", flush=True)
        return snap

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- health prober (its own process, so the load generator's loop does not colour the latencies) --------------
def _probe(ports: dict, interval: float, stop, out) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stubs = {name: health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{ports[name]}")) for name in ("health", "grpc")}
    service = {"health": "", "grpc": "envoy.service.ext_proc.v3.ExternalProcessor"}
    samples: list[tuple[str, float, float]] = []
    while not stop.is_set():
        for name, stub in stubs.items():
            t0 = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(service=service[name]), timeout=10)
                samples.append((name, time.time(), time.perf_counter() - t0))
            except grpc.RpcError:
                samples.append((name, time.time(), float("inf")))
        t0 = time.perf_counter()
        time.sleep(interval)
        # Control: how late this process itself wakes up. On a loaded machine that lateness is the
        # floor under any latency measured here, whatever the EPP does.
        samples.append(("oversleep", time.time(), time.perf_counter() - t0 - interval))
    out.put(samples)


def health_stats(samples: list, name: str, t0: float, t1: float) -> dict:
    lat = [s[2] for s in samples if s[0] == name and t0 <= s[1] < t1]
    return {"checks": len(lat), "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2) if lat else None}


# -- names scenario --------------------------------------------------------------------------------------------
def _flow(model: str) -> list[bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 16}).encode()
    resp = json.dumps({"model": model, "choices": [], "usage": {"prompt_tokens": 60, "completion_tokens": 16}}).encode()
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    return [
        headers_message(headers).SerializeToString(),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)).SerializeToString(),
        headers_message({":status": "200", "content-type": "application/json"}, request=False).SerializeToString(),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=resp, end_of_stream=True)).SerializeToString(),
    ]


async def _drive_names(epp: EPPProcess, requests: int, concurrency: int, on_half) -> dict:
    ident = lambda b: b  # noqa: E731
    done = errors = 0
    next_i = 0
    half = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports['grpc']}") as ch:
        process = ch.stream_stream(METHOD, request_serializer=ident, response_deserializer=ident)

        async def one(i: int) -> None:
            m = _flow(f"invented-model-{i:06d}")
            call = process()
            await call.write(m[0])
            await call.write(m[1])
            await call.read()
            await call.read()
            await call.write(m[2])
            await call.read()
            await call.write(m[3])
            await call.read()
            await call.done_writing()
            await call.read()

        async def worker() -> None:
            nonlocal done, errors, next_i
            while next_i < requests:
                i, next_i = next_i, next_i + 1
                try:
                    await one(i)
                except grpc.aio.AioRpcError:
                    errors += 1
                done += 1
                if done == requests // 2:
                    half.set()

        async def scraper() -> list[float]:
            times = []
            while next_i < requests:
                await asyncio.sleep(2)
                t0 = time.perf_counter()
                await asyncio.to_thread(epp.scrape)
                times.append(time.perf_counter() - t0)
            return times

        t0 = time.perf_counter()
        scrape_task = asyncio.create_task(scraper())
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await half.wait()
        mid = await asyncio.to_thread(on_half)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - t0
        scrapes = await scrape_task
    return {"requests": done, "errors": errors, "elapsed_s": round(elapsed, 1), "req_per_s": round(done / elapsed, 1),
            "middle": mid, "scrape_p50_ms": round(pct(scrapes, 50) * 1000, 1), "scrape_max_ms": round(max(scrapes, default=0) * 1000, 1)}


def run_names(workdir: Path, requests: int, concurrency: int, warmup: int = 200) -> dict:
    print(f"names: {requests:,} requests, each with a new model name, {concurrency} at a time", flush=True)
    epp = EPPProcess(workdir, "names", [])
    ctx = multiprocessing.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=_probe, args=(epp.ports, 0.02, stop, out), daemon=True)
    try:
        asyncio.run(_drive_names(epp, warmup, 8, lambda: None))  # warm-up: allocator, caches, the first names
        time.sleep(1)
        start = epp.snapshot("start")
        prober.start()
        t_start = time.time()
        marks = {}

        def on_half():
            marks["middle"] = time.time()
            return epp.snapshot("middle")

        run = asyncio.run(_drive_names(epp, requests, concurrency, on_half))
        time.sleep(1)
        end = epp.snapshot("end")
        t_end = time.time()
        stop.set()
        samples = out.get(timeout=60)
        prober.join(10)
    finally:
        epp.stop()
    health = {}
    for name, port_name in (("health", "health_port"), ("grpc", "ext_proc_port")):
        health[port_name] = {
            "start_to_middle": health_stats(samples, name, t_start, marks["middle"]),
            "middle_to_end": health_stats(samples, name, marks["middle"], t_end),
            "whole_run": health_stats(samples, name, t_start, t_end),
        }
    health["prober_oversleep_control"] = health_stats(samples, "oversleep", t_start, t_end)
    result = {"start": start, "middle": run.pop("middle"), "end": end, "run": run, "health": health,
              "rss_growth_mb": round(end["rss_mb"] - start["rss_mb"], 1)}
    whole = health["health_port"]["whole_run"]
    print(f"  {run['requests']:,} requests in {run['elapsed_s']} s ({run['req_per_s']} req/s, {run['errors']} errors); "
          f"RSS growth {result['rss_growth_mb']} MB; /metrics {end['metrics_bytes'] / 1024:.0f} KB", flush=True)
    for port_name in ("health_port", "ext_proc_port"):
        w = health[port_name]["whole_run"]
        print(f"  health on the {port_name.replace('_', ' ')}: {w['checks']} checks, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms")
    c = health["prober_oversleep_control"]
    print(f"  control: the prober itself woke late by p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, max {c['max_ms']} ms "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    result["bars"] = {"rss_growth_below_20_mb": result["rss_growth_mb"] < 20, "metrics_below_1_mb": end["metrics_bytes"] < MIB,
                      "health_p99_below_50_ms": whole["p99_ms"] < 50}
    return result


# -- held scenario ----------------------------------------------------------------------------------------------
async def _hold(epp: EPPProcess, streams: int, body_bytes: int, extra: int) -> dict:
    chunk = 65536
    headers = headers_message({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"})
    piece = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * chunk, end_of_stream=False))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports['grpc']}", options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        stub_calls = []
        for _ in range(streams):
            call = ch.stream_stream(METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                                    response_deserializer=pb.ProcessingResponse.FromString)()
            await call.write(headers)
            for _ in range(body_bytes // chunk):
                await call.write(piece)
            stub_calls.append(call)
        want = streams * (body_bytes // chunk) * chunk
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = re.search(r"^inference_epp_buffered_request_bytes (\S+)$", await asyncio.to_thread(epp.scrape), re.M)
            if held and float(held.group(1)) >= want:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        arrived_snap = await asyncio.to_thread(epp.snapshot, "arrived")  # gRPC's receive buffers may still be mapped
        await asyncio.sleep(3)  # steady state: the EPP trims freed pages within a housekeeping tick or two
        held_snap = await asyncio.to_thread(epp.snapshot, "held")
        refused, statuses = 0, []
        extra_calls = []
        for _ in range(extra):
            call = ch.stream_stream(METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                                    response_deserializer=pb.ProcessingResponse.FromString)()
            await call.write(headers)
            status = None
            for _ in range(body_bytes // chunk):
                try:
                    await call.write(piece)
                except Exception:
                    break
            try:
                r = await asyncio.wait_for(call.read(), 5)
                if r is not grpc.aio.EOF and r.HasField("immediate_response"):
                    status = r.immediate_response.status.code
            except (asyncio.TimeoutError, grpc.aio.AioRpcError):
                pass
            statuses.append(status)
            refused += status == 429
            extra_calls.append(call)
        await asyncio.sleep(1)
        refused_snap = await asyncio.to_thread(epp.snapshot, "refused")
        for call in stub_calls + extra_calls:
            call.cancel()
    await asyncio.sleep(2)
    released_snap = epp.snapshot("release")
    return {"arrived": arrived_snap, "held": held_snap, "refused": refused_snap, "released": released_snap, "extra_statuses": statuses, "extra_refused_429": refused,
            "bytes_held": want}


def run_held(workdir: Path, streams: int, body_bytes: int, extra: int, warmup: int = 200) -> dict:
    budget = streams * body_bytes
    print(f"held: {streams} streams × {body_bytes / MIB:g} MiB held open, budget {budget / MIB:g} MiB, then {extra} more", flush=True)
    epp = EPPProcess(workdir, "held", ["--max-buffered-body-bytes", str(budget), "--max-request-body-bytes", str(max(body_bytes * 2, 16 * MIB))])
    try:
        asyncio.run(_drive_names(epp, warmup, 8, lambda: None))  # warm-up
        time.sleep(1)
        start = epp.snapshot("start")
        out = asyncio.run(_hold(epp, streams, body_bytes, extra))
    finally:
        epp.stop()
    growth = out["held"]["rss_mb"] - start["rss_mb"]
    ratio = growth * MIB / out["bytes_held"]
    after_refusals = out["refused"]["rss_mb"] - out["held"]["rss_mb"]
    result = {"start": start, **out, "rss_growth_mb": round(growth, 1), "rss_growth_per_byte_held": round(ratio, 3),
              "rss_growth_during_refusals_mb": round(after_refusals, 1),
              "rss_kept_after_release_mb": round(out["released"]["rss_mb"] - start["rss_mb"], 1)}
    print(f"  {out['bytes_held'] / MIB:.0f} MiB held → RSS +{growth:.1f} MB ({ratio:.2f}× the bytes held); "
          f"{out['extra_refused_429']}/{extra} further streams refused with 429 (RSS {after_refusals:+.1f} MB meanwhile); "
          f"after reset RSS is {result['rss_kept_after_release_mb']:+.1f} MB over the start", flush=True)
    result["bars"] = {"rss_growth_at_most_1.3x": ratio <= 1.3, "budget_refuses_with_429": out["extra_refused_429"] == extra}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="extproc-soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="names,held", help="comma-separated: names, held (default: %(default)s)")
    p.add_argument("--requests", type=int, default=20_000, help="names: requests, each with a new model name (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="names: streams at a time (default: %(default)s)")
    p.add_argument("--streams", type=int, default=64, help="held: streams holding a body open (default: %(default)s)")
    p.add_argument("--body-bytes", type=int, default=MIB, help="held: bytes each of them holds (default: %(default)s)")
    p.add_argument("--extra", type=int, default=16, help="held: streams tried once the budget is full (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="requests before the start snapshot (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="where the EPP logs go (default: a temporary directory)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="extproc-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}}
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if scenario == "names":
            results["names"] = run_names(workdir, args.requests, args.concurrency, args.warmup)
        elif scenario == "held":
            results["held"] = run_held(workdir, args.streams, args.body_bytes, args.extra, args.warmup)
        else:
            p.error(f"unknown scenario {scenario!r}; use names and/or held")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
