"""The EPP behind real Envoy in each ext_proc body mode, with real timing: late bodies, large bodies, forged headers.

One EPP, two pool upstreams and a canary outside the pool (where forged headers point), and one
Envoy per body mode, all rendered from the shared template (gateway/envoy_config.py).
"""

import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import yaml

from gateway.envoy_config import SERVED_HEADER, UPSTREAM_CLUSTER
from tests.conftest import wait_until
from tests.gateway.conftest import MAX_BODY

ROUTING_MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]
FORGED = "x-gateway-destination-endpoint"


@pytest.fixture(scope="module")
def gw(rig):
    rig.upstream("a")
    rig.upstream("b")
    canary = rig.upstream("canary", in_pool=False)
    epp = rig.epp()
    envoys = {mode: rig.envoy(f"envoy-{mode.lower()}", [epp.grpc], body_mode=mode) for mode in ("FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED")}
    envoys["metadata-only"] = rig.envoy("envoy-metadata-only", [epp.grpc], route_on=("metadata",))
    envoys["STREAMED-no-wait"] = rig.envoy("envoy-streamed-no-wait", [epp.grpc], body_mode="STREAMED",
                                           ext_proc_extra={"send_body_without_waiting_for_header_response": True})
    return SimpleNamespace(rig=rig, epp=epp, envoys=envoys, canary=canary, pool={f"127.0.0.1:{p}" for p in rig.upstreams.values()})


def forged_headers(gw, rid):
    return {"x-request-id": rid, FORGED: f"127.0.0.1:{gw.canary}", "x-gateway-destination-endpoint-served": f"127.0.0.1:{gw.canary}",
            "x-prefiller-host-port": f"127.0.0.1:{gw.canary}", "content-type": "application/json"}


def late(body: bytes, delay: float = 0.3):
    """The body arrives `delay` seconds after the headers (Envoy has long answered the headers by then)."""
    def chunks():
        yield body[:10]
        time.sleep(delay)
        yield body[10:]
    return chunks()


def canary_hits(gw) -> int:
    """Requests the server outside the pool answered (the one every forged header points at)."""
    return httpx.get(f"http://127.0.0.1:{gw.canary}/_answered", timeout=10).json()["requests"]


@pytest.mark.parametrize("mode", ROUTING_MODES)
def test_every_request_goes_where_the_epp_picked(gw, mode):
    """chat and completions, plain and SSE: the EPP's pick = Envoy's upstream = the server that answered."""
    url = gw.envoys[mode].url
    requests = [("/v1/completions", {"model": "m", "prompt": "hello"}), ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})]
    seen = {}
    for path, body in requests * 3:
        for stream in (False, True):
            rid = f"{mode}-{uuid.uuid4().hex[:8]}"
            r = httpx.post(url + path, json={**body, "stream": stream}, headers={"x-request-id": rid}, timeout=30)
            assert r.status_code == 200, r.text
            answer = r.json() if not stream else httpx.Response(200, content=r.text.split("\n")[0][6:]).json()
            assert answer["path"] == path and answer["headers"]["x-request-id"] == rid
            seen[rid] = (r.headers[SERVED_HEADER], f"127.0.0.1:{answer['port']}", answer["headers"][FORGED])
            if stream:
                assert r.text.rstrip().endswith("data: [DONE]")
    picks = gw.epp.decisions()
    for rid, (served, answered, header) in seen.items():
        assert [served] == [answered] == [header] == picks[rid], rid
    assert {s for s, _, _ in seen.values()} == gw.pool, "both pool members served"


@pytest.mark.parametrize("mode", ROUTING_MODES)
def test_sse_events_arrive_as_they_are_made(gw, mode):
    """The response streams through the EPP event by event (a BUFFERED response would hold them to the end)."""
    t0 = time.perf_counter()
    arrivals = []
    body = {"model": "m", "prompt": "s", "stream": True, "events": 4, "gap": 0.25}
    with httpx.stream("POST", gw.envoys[mode].url + "/v1/completions", json=body, timeout=30) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) == 1 + 4 + 1
    assert arrivals[-1] >= 1.0
    assert arrivals[1] < arrivals[-1] - 0.5, f"events were held back: {arrivals}"


@pytest.mark.parametrize("mode", ROUTING_MODES)
def test_late_body_with_forged_routing_headers_goes_where_the_epp_picked(gw, mode):
    rid = f"late-{mode}-{uuid.uuid4().hex[:8]}"
    body = b'{"model": "m", "prompt": "the body comes late"}'
    r = httpx.post(gw.envoys[mode].url + "/v1/completions", content=late(body), headers=forged_headers(gw, rid), timeout=30)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["from"] in ("a", "b") and seen["len"] == len(body)
    assert [seen["headers"][FORGED]] == gw.epp.decisions()[rid] == [r.headers[SERVED_HEADER]]
    assert "x-prefiller-host-port" not in seen["headers"] and "x-gateway-destination-endpoint-served" not in seen["headers"]
    assert canary_hits(gw) == 0


@pytest.mark.parametrize("variant", ["STREAMED", "STREAMED-no-wait"])
def test_streamed_mode_is_refused_before_anything_is_routed(gw, variant):
    """STREAMED: Envoy routes at the headers reply, before the body; the EPP refuses at the first message.

    `-no-wait` adds send_body_without_waiting_for_header_response, where a body above Envoy's buffer used to stall.
    """
    url = gw.envoys[variant].url
    bodies = (late(b'{"model": "m", "prompt": "forged and late"}'), b'{"model": "m", "prompt": "small"}',
              b'{"model": "m", "prompt": "' + b"x" * (MAX_BODY - 1024) + b'"}')
    for content in bodies:
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", content=content, headers=forged_headers(gw, uuid.uuid4().hex), timeout=30)
        assert r.status_code == 500 and time.monotonic() - t0 < 10
        assert r.text.startswith("inference error: Internal - the gateway sends the request body in ext_proc mode STREAMED")
        assert "configure request_body_mode FULL_DUPLEX_STREAMED" in r.text
    assert canary_hits(gw) == 0
    refused = lambda: [e for e in gw.envoys[variant].access_log() if e["status"] == 500]  # noqa: E731
    assert wait_until(lambda: len(refused()) == len(bodies), timeout=10)
    assert {e["details"] for e in refused()} == {"inference_epp_Internal"} and {e["upstream"] for e in refused()} == {None}
    r = httpx.get(url + "/v1/models", timeout=30)  # headers-only requests route at the headers reply, as in GIE
    assert r.status_code == 200 and r.headers[SERVED_HEADER] in gw.pool


@pytest.mark.parametrize("mode", ROUTING_MODES)
def test_large_bodies_pass_whole_and_too_large_ones_get_a_clear_413(gw, mode):
    url = gw.envoys[mode].url
    big = b'{"model": "m", "prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.json()["len"] == len(big)
    too_big = b'{"model": "m", "prompt": "' + b"x" * (MAX_BODY + 1024) + b'"}'
    r = httpx.post(url + "/v1/completions", content=too_big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    # FULL_DUPLEX_STREAMED: the EPP's refusal; BUFFERED: Envoy's buffer limit (set to the EPP's) refuses first, same format.
    assert r.text == f"inference error: PayloadTooLarge - request body exceeds the limit of {MAX_BODY} bytes"
    assert httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "after"}, timeout=30).status_code == 200


@pytest.mark.parametrize("mode", ROUTING_MODES + ["STREAMED"])
def test_bodiless_inference_post_gets_the_epps_400_and_get_keeps_gie_behaviour(gw, mode):
    url = gw.envoys[mode].url
    r = httpx.post(url + "/v1/completions", content=b"", headers={"content-type": "application/json"}, timeout=30)
    assert r.request.headers["content-length"] == "0"
    assert r.status_code == 400
    assert r.text == "inference error: BadRequest - error unmarshaling request bodyMap: empty request body"
    r = httpx.get(url + "/v1/models", headers={FORGED: f"127.0.0.1:{gw.canary}"}, timeout=30)
    assert r.status_code == 200 and r.json()["from"] in ("a", "b") and r.headers[SERVED_HEADER] in gw.pool
    assert canary_hits(gw) == 0


def test_envoy_routes_on_the_envoy_lb_metadata_alone(gw):
    """The ORIGINAL_DST cluster reading only `envoy.lb` metadata: it arrives (receiving_namespaces) and routes."""
    envoy = gw.envoys["metadata-only"]
    config = yaml.safe_load(envoy.config_path.read_text())
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == UPSTREAM_CLUSTER]
    assert cluster["original_dst_lb_config"] == {"metadata_key": {"key": "envoy.lb", "path": [{"key": FORGED}]}}
    for i in range(4):
        rid = f"md-{i}-{uuid.uuid4().hex[:8]}"
        r = httpx.post(envoy.url + "/v1/completions", json={"model": "m", "prompt": "metadata"}, headers={"x-request-id": rid}, timeout=30)
        assert r.status_code == 200, r.text
        assert [r.headers[SERVED_HEADER]] == gw.epp.decisions()[rid]
    assert "no receiving namespaces are configured" not in envoy.log()
