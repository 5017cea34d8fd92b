import textwrap

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.server import EPPServer, ServerOptions

ENDPOINTS = """
endpoints:
- {name: vllm-p2p-proxy, address: 127.0.0.1, port: 18081, labels: {role: proxy, llm-d.ai/kv-backend: nvlink}}
- {name: vllm-fs-proxy, address: 127.0.0.1, port: 18082, labels: {role: proxy, llm-d.ai/kv-backend: fs}}
"""


@pytest.fixture
def endpoints_file(tmp_path):
    path = tmp_path / "endpoints.yaml"
    path.write_text(textwrap.dedent(ENDPOINTS))
    return path


@pytest.fixture
async def make_epp(endpoints_file):
    """Start real EPP servers on free loopback ports; stopped at the end of the test."""
    servers = []

    async def start(**overrides):
        opts = dict(
            grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1",
            endpoints_file=str(endpoints_file), secure_serving=False, config_profile="proxy-performance",
        )
        opts.update(overrides)
        server = EPPServer(ServerOptions(**opts))
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
        server.test_channel = channel
        server.stub = pb_grpc.ExternalProcessorStub(channel)
        return server

    yield start
    for server in servers:
        await server.test_channel.close()
        await server.stop(0)


@pytest.fixture
async def epp(make_epp):
    return await make_epp()
