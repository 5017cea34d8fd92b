"""`--metrics-endpoint-auth`: /metrics answers only tokens the Kubernetes API accepts for `get /metrics`."""

import os
import subprocess
import sys
import textwrap

import aiohttp
import pytest

from epp.server import EPPServer, ServerOptions
from tests.conftest import free_port
from tests.kubernetes.test_inferencepool_discovery import api  # noqa: F401 (fixture)

PROMETHEUS = "system:serviceaccount:monitoring:prometheus"


@pytest.fixture
async def secured_epp(api, tmp_path):  # noqa: F811
    api.token_users = {"scraper-token": {"username": PROMETHEUS, "uid": "u-1", "groups": ["system:serviceaccounts"]},
                       "other-token": {"username": "system:serviceaccount:default:someone", "groups": []}}
    api.metrics_readers = {PROMETHEUS}
    eps = tmp_path / "endpoints.yaml"
    eps.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 18081}\n")
    server = EPPServer(ServerOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1", secure_serving=False,
                                     endpoints_file=str(eps), config_profile="proxy-performance", kubeconfig=api.kubeconfig,
                                     metrics_endpoint_auth=True))
    await server.start()
    yield server
    await server.stop(0)


async def get_metrics(server, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{server.ports['metrics']}/metrics", headers=headers) as r:
            return r.status, await r.text()


async def test_metrics_need_a_token_allowed_to_get_metrics(secured_epp, api):  # noqa: F811
    assert (await get_metrics(secured_epp))[0] == 401
    assert (await get_metrics(secured_epp, "forged"))[0] == 401
    status, text = await get_metrics(secured_epp, "other-token")
    assert status == 403 and "may not get /metrics" in text
    status, text = await get_metrics(secured_epp, "scraper-token")
    assert status == 200 and "llm_d_epp_ready_endpoints" in text
    reviews = len(api.reviews)
    for _ in range(5):  # answers are cached per token: a scraper costs no API call per scrape
        assert (await get_metrics(secured_epp, "scraper-token"))[0] == 200
    assert len(api.reviews) == reviews


def test_auth_without_a_cluster_is_refused_clearly(tmp_path):
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(textwrap.dedent("endpoints:\n- {name: a, address: 127.0.0.1, port: 18081}\n"))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "epp.cli", "serve", "--endpoints-file", str(eps), "--secure-serving=false",
                          f"--grpc-port={free_port()}", f"--grpc-health-port={free_port()}", f"--metrics-port={free_port()}",
                          "--metrics-endpoint-auth=true"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "--metrics-endpoint-auth needs the Kubernetes API" in out.stderr and "--metrics-endpoint-auth=false" in out.stderr
