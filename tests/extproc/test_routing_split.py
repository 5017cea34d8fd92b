"""The seed's validation: 60 concurrent requests, split by profile."""

import asyncio
import json
from collections import Counter

from extproc_loadgen.envoy_flow import EnvoyStream

H = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def sixty_concurrent(epp):
    """60 requests in flight at once (responses held), then all completed."""
    streams = [EnvoyStream(epp.stub) for _ in range(60)]
    results = await asyncio.gather(*(s.send_request({**H, "x-request-id": f"r{i}"}, BODY) for i, s in enumerate(streams)))
    split = Counter(r.destination for r in results)
    await asyncio.gather(*(s.send_response(200, [b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}']) for s in streams))
    await asyncio.gather(*(s.close() for s in streams))
    return split


async def test_proxy_performance_uses_both_backends(make_epp):
    epp = await make_epp(config_profile="proxy-performance")
    split = await sixty_concurrent(epp)
    assert set(split) == {"127.0.0.1:18081", "127.0.0.1:18082"}
    assert abs(split["127.0.0.1:18081"] - split["127.0.0.1:18082"]) <= 2, split  # least-loaded keeps them even
    assert epp.built.plugins["active-request-scorer"].counts == {}


async def test_by_backend_uses_only_nvlink(make_epp):
    epp = await make_epp(config_profile="proxy-performance-by-backend")
    split = await sixty_concurrent(epp)
    assert split == {"127.0.0.1:18081": 60}
    assert epp.built.plugins["active-request-scorer"].counts == {}


async def test_kv_backend_header_is_a_hard_choice(make_epp):
    epp = await make_epp(config_profile="kv-backend-ab")
    for backend, dest in (("fs", "127.0.0.1:18082"), ("nvlink", "127.0.0.1:18081")):
        for _ in range(5):
            s = EnvoyStream(epp.stub)
            res = await s.send_request({**H, "x-kv-backend": backend}, BODY)
            assert res.destination == dest
            await s.close()
