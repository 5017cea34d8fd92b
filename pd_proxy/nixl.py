"""vLLM's NIXL P/D protocol (NixlConnector): KV-transfer parameters carried in the request bodies.

As vLLM's own toy proxy and llm-d's routing sidecar speak it:

1. prefill: the client's body with `max_tokens: 1`, `stream: false` and
   `kv_transfer_params: {do_remote_decode: true, do_remote_prefill: false, remote_*: null}`;
   the prefill computes the prompt, keeps its KV blocks and answers with `kv_transfer_params`
   naming them (`remote_engine_id`, `remote_block_ids`, `remote_host`/`remote_port` of its NIXL
   side channel, `remote_request_id`, `tp_size`, …);
2. decode: the client's body unchanged plus those `kv_transfer_params`; the decode reads the
   blocks from the prefill (NIXL pulls them) and generates.

Without the parameters the decode silently computes the prompt itself: outputs still match, so
nothing signals the miss — the proxy's token-source check (`kv_load.py`) does. A decode that
cannot load the blocks fails the request when its `kv_load_failure_policy` is `fail` (vLLM's
default): HTTP 500, or for a stream an SSE `error` event before any token. vLLM calls this error
retryable; the proxy retries the decode once without the parameters (`recompute`) or reports it
(`fail`), by its own `--kv-load-failure-policy`.
"""

from __future__ import annotations

import json
from typing import Any

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
FAILURE_POLICIES = ("recompute", "fail")


def prefill_body(prefill: dict) -> dict:
    """The prefill leg's body (already cut to one token, not streamed) asking the prefill to keep its KV for a remote decode."""
    return {**prefill, "kv_transfer_params": dict(PREFILL_PARAMS)}


def transfer_params(prefill_reply: Any) -> dict | None:
    """The prefill's `kv_transfer_params`, if its reply names blocks the decode can read."""
    if not isinstance(prefill_reply, dict):
        return None
    params = prefill_reply.get("kv_transfer_params")
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return None
    return params


def decode_body(body: dict, params: dict | None) -> dict:
    """The decode leg's body: the client's, with the prefill's parameters passed on unchanged."""
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}  # a client never names KV blocks itself
    if params is not None:
        out["kv_transfer_params"] = params
    return out


def recompute_body(body: dict) -> dict:
    """The decode leg's body for a retry after a KV load failure: no parameters, so the decode computes the prompt."""
    return decode_body(body, None)


def is_error_event(chunk: bytes) -> bool:
    """True when a stream's first SSE event is vLLM's error event (a failed request, e.g. its KV could not be loaded)."""
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            try:
                event = json.loads(line[6:])
            except ValueError:
                return False
            return isinstance(event, dict) and "error" in event and "choices" not in event
    return False
