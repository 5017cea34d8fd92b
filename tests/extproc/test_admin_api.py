"""The project's own gRPC API, compiled from proto/ with grpcio-tools, served by a running EPP."""

import asyncio
import os
import stat
import subprocess
import sys

import grpc
import pytest

from epp.admin.v1 import admin_pb2, admin_pb2_grpc
from epp.datastore import EndpointMetrics, TransferProfile


async def test_list_endpoints_and_describe(epp):
    epp.datastore.set_metrics("vllm-p2p-proxy", EndpointMetrics(waiting=2, transfer_profile=TransferProfile((1, 8), (0.001, 0.004)), updated_at=1.0))
    for port in (epp.ports["health"], epp.ports["grpc"]):  # network-facing ports do not serve it
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin_pb2_grpc.EndpointPickerAdminStub(ch).ListEndpoints(admin_pb2.ListEndpointsRequest())
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stat.S_IMODE(os.stat(epp.admin_socket).st_mode) == 0o600  # only the EPP's user can connect
    for target in (f"unix:{epp.admin_socket}",):
        async with grpc.aio.insecure_channel(target) as ch:
            stub = admin_pb2_grpc.EndpointPickerAdminStub(ch)
            eps = await stub.ListEndpoints(admin_pb2.ListEndpointsRequest())
            assert eps.synced
            by_name = {e.name: e for e in eps.endpoints}
            assert set(by_name) == {"vllm-p2p-proxy", "vllm-fs-proxy"}
            p2p = by_name["vllm-p2p-proxy"]
            assert p2p.kv_backend == "nvlink" and p2p.port == 18081 and p2p.waiting == 2
            assert [(t.blocks, t.seconds) for t in p2p.transfer_profile] == [(1, 0.001), (8, 0.004)]
            assert not by_name["vllm-fs-proxy"].HasField("metrics_age_seconds")
            desc = await stub.DescribeScheduler(admin_pb2.DescribeSchedulerRequest())
            assert desc.config_profile == "proxy-performance" and "active-request-scorer" in desc.config_yaml
            assert [s.name for s in desc.profiles[0].scorers] == ["active-request-scorer"]
    out = await asyncio.to_thread(  # the server runs on this test's event loop: do not block it
        subprocess.run, [sys.executable, "-m", "epp.cli", "endpoints", "--grpc-port", str(epp.ports["grpc"])],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "profile proxy-performance" in out.stdout and "vllm-fs-proxy" in out.stdout and "transfer 1→8 blocks" in out.stdout


def test_generated_code_is_up_to_date(tmp_path):
    """`make proto` output is checked in; it must match proto/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    from grpc_tools import protoc

    assert protoc.main(["grpc_tools.protoc", f"-I{root / 'proto'}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        "epp/admin/v1/admin.proto"]) == 0
    for name in ("admin_pb2.py", "admin_pb2_grpc.py"):
        assert (tmp_path / "epp/admin/v1" / name).read_text() == (root / "epp/admin/v1" / name).read_text(), f"run `make proto` ({name})"


async def test_admin_socket_is_removed_on_stop_and_can_be_disabled(make_epp):
    epp = await make_epp()
    path = epp.admin_socket
    assert os.path.exists(path)
    await epp.stop(0)
    assert not os.path.exists(path)
    off = await make_epp(admin_socket="")
    assert off.admin_socket == "" and off._admin_grpc is None


async def test_an_unusable_admin_socket_does_not_stop_serving(make_epp, tmp_path):
    from tests.extproc.stream_driver import full_exchange, run_sequence

    epp = await make_epp(admin_socket=str(tmp_path / "missing-dir" / "admin.sock"))
    assert epp.admin_socket == "" and epp._admin_grpc is None
    out = await run_sequence(epp.stub, full_exchange())
    assert out.code == grpc.StatusCode.OK and out.kinds()[-1] == "response_body"
