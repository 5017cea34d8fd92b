"""Each bad input gets the right ImmediateResponse, and the server keeps serving afterwards."""

import json

import pytest

from extproc_loadgen.envoy_flow import EnvoyStream

H = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}


async def immediate(epp, body, path="/v1/completions", mode="FULL_DUPLEX_STREAMED", chunk=16384):
    s = EnvoyStream(epp.stub, mode)
    res = await s.send_request({**H, ":path": path}, body, chunk=chunk)
    s.cancel()
    assert res.immediate is not None, "expected an ImmediateResponse"
    return res.immediate.status.code, res.immediate.body.decode()


@pytest.mark.parametrize(
    "body,path,status,fragment",
    [
        (b"{not json", "/v1/completions", 400, "BadRequest - error unmarshaling request bodyMap"),
        (b"[1, 2]", "/v1/completions", 400, "request body must be a JSON object"),
        (b'{"prompt": "hi"}', "/v1/completions", 400, "BadRequest - model not found in request body"),
        (b'{"model": 7, "prompt": "hi"}', "/v1/completions", 400, "model must be a string"),
        (b"", "/v1/completions", 400, "empty request body"),
        (b'{"model": "m", "prompt": "\xff\xfe"}', "/v1/completions", 400, "error unmarshaling request bodyMap"),
        (b'{"model": "m"}', "/v1/completions", 400, "must have prompt field"),
        (b'{"model": "m", "messages": []}', "/v1/chat/completions", 400, "must have valid messages field"),
        (b'{"model": "m", "prompt": "hi"}', "/v1/unknown", 400, "unsupported API path"),
    ],
)
async def test_bad_request_bodies(epp, body, path, status, fragment):
    code, text = await immediate(epp, body, path)
    assert code == status
    assert text.startswith("inference error: ") and fragment in text
    # the server still serves a good request
    s = EnvoyStream(epp.stub)
    res = await s.send_request(H, json.dumps({"model": "m", "prompt": "ok"}).encode())
    assert res.destination
    await s.close()


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_oversized_body_is_refused_without_buffering(make_epp, mode):
    epp = await make_epp(max_request_body_bytes=1_000_000)
    big = json.dumps({"model": "m", "prompt": "y" * 5_000_000}).encode()
    code, text = await immediate(epp, big, mode=mode, chunk=65536)
    assert code == 413 and "PayloadTooLarge" in text
    s = EnvoyStream(epp.stub)
    assert (await s.send_request(H, b'{"model":"m","prompt":"ok"}')).destination
    await s.close()


async def test_five_megabyte_body_in_chunks_is_accepted(epp):
    big = json.dumps({"model": "m", "prompt": "z" * 5_000_000}).encode()
    s = EnvoyStream(epp.stub)
    res = await s.send_request(H, big, chunk=65536)
    assert res.destination and res.body == big
    assert max(res.body_chunks) <= 62_000
    await s.close()


async def test_empty_pool_is_503(make_epp, tmp_path):
    empty = tmp_path / "none.yaml"
    empty.write_text("endpoints: []\n")
    epp = await make_epp(endpoints_file=str(empty))
    code, text = await immediate(epp, b'{"model":"m","prompt":"x"}')
    assert code == 503 and "failed to find endpoint candidates" in text


async def test_filter_emptying_the_set_is_429(make_epp):
    cfg = """
plugins:
- {type: by-label-selector, name: only-rdma, parameters: {matchLabels: {llm-d.ai/kv-backend: rdma}}}
- {type: max-score-picker}
"""
    epp = await make_epp(config_profile=None, config_text=cfg)
    code, text = await immediate(epp, b'{"model":"m","prompt":"x"}')
    assert code == 429
    assert text.startswith("inference error: ResourceExhausted - failed to find target endpoint")
