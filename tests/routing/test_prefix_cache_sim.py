"""Prefix caching in the simulator, and the precise prefix cache fed by simulator processes' KV events."""

import json
import subprocess
import sys
import textwrap

import httpx
import pytest

from extproc_loadgen.envoy_flow import EnvoyStream
from epp.server import EPPServer, ServerOptions
from epp.scheduling.tokens import pack
from tests.conftest import async_wait_until, free_port, wait_until
from vllm_sim.prefix_cache import BlockPool, prompt_token_ids

MODEL = "m"


def tokens(n, start=0):
    from array import array

    return array("I", range(start, start + n))


def test_pool_hits_the_leading_blocks_and_reports_what_it_stores():
    events = []
    pool = BlockPool(num_blocks=100, block_size=4, publish=events.extend)
    assert pool.begin("a", tokens(10), output_tokens=4) == 0
    pool.stored("a")
    assert [e["type"] for e in events] == ["BlockStored"]
    first = events[0]
    assert len(first["block_hashes"]) == 2 and first["parent_block_hash"] is None and first["token_ids"] == list(range(8))
    shared = tokens(8) + tokens(6, start=100)
    assert pool.begin("b", shared, output_tokens=1) == 8, "two full leading blocks hit; the rest is computed"
    pool.stored("b")
    assert events[1]["parent_block_hash"] == first["block_hashes"][1] and events[1]["token_ids"] == [100, 101, 102, 103]
    assert pool.begin("c", tokens(4, start=7) + tokens(4), output_tokens=1) == 0, "a hit needs the whole prefix before it"
    for r in "abc":
        pool.finish(r)
    assert pool.used == 3 + 0 and pool.hit_tokens == 8 and pool.queried_tokens == 10 + 14 + 8


def test_pool_evicts_least_recently_freed_tail_first_and_never_a_held_block():
    events = []
    pool = BlockPool(num_blocks=6, block_size=4, publish=events.extend)
    pool.begin("a", tokens(12), output_tokens=0)  # 3 blocks
    pool.stored("a")
    pool.finish("a")
    pool.begin("b", tokens(8, start=50), output_tokens=0)  # 2 blocks, held
    pool.stored("b")
    events.clear()
    pool.begin("c", tokens(8, start=90), output_tokens=4)  # 2 + 1 output: needs 3, one is free → evicts 2 of a's
    removed = [e for e in events if e["type"] == "BlockRemoved"]
    a_hashes = [h for h in pool.refs if pool.refs[h] == 0]
    assert len(removed) == 1 and len(removed[0]["block_hashes"]) == 2
    assert len(a_hashes) == 1, "a's first block outlived its tail"
    assert pool.begin("d", tokens(4), output_tokens=0) == 4, "the shared prefix is still there"
    assert pool.reset() is False, "not while requests hold blocks"
    for r in "bcd":
        pool.finish(r)
    events.clear()
    assert pool.reset() is True and events == [{"type": "AllBlocksCleared"}] and pool.used == 0


def test_simulator_tokenizer_packs_four_bytes():
    assert len(prompt_token_ids({"prompt": "abcdefgh"})) == 2
    assert len(prompt_token_ids({"prompt": "abcdefghi"})) == 3
    assert prompt_token_ids({"prompt": [7, 8]}).tolist() == [7, 8]
    chat = prompt_token_ids({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "yo"}]}]})
    assert chat.tobytes() == b"userhiuseryo"


@pytest.fixture
def sims(tmp_path):
    """Two simulator processes publishing KV events to one port (the EPP binds it), as vLLM does with --kv-events-config."""
    kv_port = free_port()
    procs, ports = [], []
    for _ in range(2):
        port = free_port()
        cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{kv_port}", "topic": f"kv@127.0.0.1:{port}@{MODEL}"}
        procs.append(subprocess.Popen([sys.executable, "-m", "vllm_sim.cli", "--port", str(port), "--model", MODEL,
                                       "--prefill-tokens-per-second", "1000000", "--num-gpu-blocks", "64",
                                       "--kv-events-config", json.dumps(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        ports.append(port)
    try:
        for port in ports:
            assert wait_until(lambda: _healthy(port), timeout=120), "simulator did not start"
        yield kv_port, ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def _healthy(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def test_precise_prefix_cache_routes_to_the_simulator_that_holds_the_prefix(sims, tmp_path):
    kv_port, ports = sims
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n" + "".join(f"- {{name: sim{i}, address: 127.0.0.1, port: {p}}}\n" for i, p in enumerate(ports)))
    config = textwrap.dedent(f"""
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - type: precise-prefix-cache-producer
          parameters:
            tokenProcessorConfig: {{blockSize: 16}}
            kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{kv_port}", discoverPods: false}}
        - type: prefix-cache-scorer
          parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
        """)
    server = EPPServer(ServerOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1",
                                     endpoints_file=str(endpoints), secure_serving=False, config_text=config))
    await server.start()
    producer = server.built.plugins["precise-prefix-cache-producer"]
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
    stub = pb_grpc.ExternalProcessorStub(channel)
    try:
        system = "You answer questions about the 2026 tax code. " * 40
        async def warm(port, text):  # a request the engine served before: its blocks are cached there
            r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                  json={"model": MODEL, "messages": [{"role": "system", "content": text}], "max_tokens": 1})
            assert r.status_code == 200

        async with httpx.AsyncClient(timeout=30) as client:

            # PUB/SUB joins asynchronously: warm with fresh prompts until the index hears the engine
            n = 0

            async def heard():
                nonlocal n
                await warm(ports[1], f"probe {n} " * 30)
                n += 1
                return len(producer.index) > 0

            for _ in range(100):
                if await heard():
                    break
            assert len(producer.index) > 0, "no KV event reached the EPP"
            await warm(ports[1], system + "first question")
            keys = producer.keys.keys(None, pack(("system" + system).encode()), MODEL)
            pod = f"127.0.0.1:{ports[1]}"
            assert await async_wait_until(lambda: producer.index.longest_prefix(keys, None, {}).get(pod) == len(keys), timeout=5)

        async def route(text):
            body = json.dumps({"model": MODEL, "messages": [{"role": "system", "content": text}], "max_tokens": 1}).encode()
            s = EnvoyStream(stub, "FULL_DUPLEX_STREAMED")
            res = await s.send_request({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}, body)
            await s.send_response(200, [b"{}"])
            await s.close()
            return res.destination

        assert [await route(system + f"question {i}") for i in range(3)] == [f"127.0.0.1:{ports[1]}"] * 3
        async with httpx.AsyncClient(timeout=30) as client:
            await warm(ports[1], system + "a second question")  # now the engine itself finds the prefix
        metrics = httpx.get(f"http://127.0.0.1:{ports[1]}/metrics", timeout=5).text
        hits = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
        assert hits and hits[0] >= len(keys) * 16
        r = httpx.post(f"http://127.0.0.1:{ports[1]}/reset_prefix_cache", timeout=5)
        assert r.status_code == 200
        assert await async_wait_until(lambda: len(producer.index) == 0, timeout=5), "AllBlocksCleared empties that pod"
    finally:
        await channel.close()
        await server.stop(0)
