"""OpenAI request bodies → LLMRequest, with GIE's error messages for malformed input."""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from epp.scheduling.framework import LLMRequest, SchedulingError

# Path suffix → API name. Matched on the path without query string, any prefix (e.g. /openai/v1/...).
_APIS = (
    ("/v1/chat/completions", "chat/completions"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/responses", "responses"),
    ("/v1/conversations", "conversations"),
)
PROMPT_TEXT_LIMIT = 16_384  # characters kept for prefix-aware plugins
# Parsing runs on the event loop (orjson holds the GIL, so a thread would not help): its cost is
# bounded by refusing bodies with more JSON containers or elements than any real prompt needs.
MAX_CONTAINERS = 50_000  # objects + arrays (messages, content blocks, nested lists)
MAX_ELEMENTS = 2_000_000  # separators: list items and object members (token-id prompts up to ~2M tokens; ~0.15 s to parse)


def bad_request(message: str) -> SchedulingError:
    return SchedulingError("BadRequest", message)


def api_of(path: str) -> str | None:
    p = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _APIS:
        if p.endswith(suffix):
            return api
    return None


def _flatten(content: Any) -> str:
    """Text of a message `content`: a string, or OpenAI content blocks ({type: text, text})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping):
                text = block.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def _prompt_of(api: str, body: Mapping[str, Any]) -> tuple[str, int]:
    """(flattened text, token estimate). Token-id prompts count exactly; text counts ~4 chars/token."""
    if api == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("invalid chat completions request: must have valid messages field")
        texts = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise bad_request("invalid chat completions request: each message must be an object")
            texts.append(_flatten(m.get("content")))
        text = "\n".join(texts)
        return text, _estimate(text)
    if api == "completions":
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise bad_request("invalid completions request: must have prompt field")
        return _text_or_tokens(prompt, "completions")
    if api == "embeddings":
        if body.get("input") in (None, "", []):
            raise bad_request("invalid embeddings request: must have input field")
        return _text_or_tokens(body["input"], "embeddings")
    if api == "responses":
        if body.get("input") in (None, "", []):
            raise bad_request("invalid responses request: must have input field")
        inp = body["input"]
        if isinstance(inp, list) and inp and isinstance(inp[0], Mapping):
            text = "\n".join(_flatten(item.get("content")) for item in inp if isinstance(item, Mapping))
            return text, _estimate(text)
        return _text_or_tokens(inp, "responses")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise bad_request("invalid conversations request: must have items field")
    text = "\n".join(_flatten(i.get("content")) for i in items if isinstance(i, Mapping))
    return text, _estimate(text)


def _text_or_tokens(prompt: Any, api: str) -> tuple[str, int]:
    if isinstance(prompt, str):
        return prompt, _estimate(prompt)
    if isinstance(prompt, list):
        kinds = set(map(type, prompt))  # C-speed type check: token-id lists can be millions long
        if kinds == {int}:
            return "", len(prompt)
        if kinds == {str}:
            text = "\n".join(prompt)
            return text, sum(_estimate(t) for t in prompt)
        if kinds == {list} and all(set(map(type, t)) <= {int} for t in prompt):
            return "", sum(len(t) for t in prompt)
    raise bad_request(f"invalid {api} request: prompt must be a string, a list of strings or token ids")


def _check_shape_limits(raw: bytes) -> None:
    """A byte count of `{`, `[` and `,` bounds what parsing and walking the body can cost (C speed)."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_CONTAINERS:
        raise bad_request(f"request body has too many JSON objects and arrays ({containers} > {MAX_CONTAINERS})")
    elements = raw.count(b",")
    if elements > MAX_ELEMENTS:
        raise bad_request(f"request body has too many JSON elements ({elements} > {MAX_ELEMENTS})")


def _estimate(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


def parse_request(
    request_id: str, path: str, headers: Mapping[str, str], raw: bytes, model_rewrite: str | None = None
) -> tuple[LLMRequest, dict[str, Any]]:
    """Parse and validate a request body. Raises SchedulingError(BadRequest) with GIE's wording."""
    api = api_of(path)
    if api is None:
        raise bad_request(f"unsupported API path {path.split('?', 1)[0]!r}; expected an OpenAI path such as /v1/completions or /v1/chat/completions")
    if not raw:
        raise bad_request("error unmarshaling request bodyMap: empty request body")
    _check_shape_limits(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        msg = "request body is not valid UTF-8" if "utf-8" in str(e).lower() else str(e)
        raise bad_request(f"error unmarshaling request bodyMap: {msg}") from None
    if not isinstance(body, dict):
        raise bad_request("error unmarshaling request bodyMap: request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("model not found in request body")
    if not isinstance(model, str):
        raise bad_request("model must be a string")
    text, tokens = _prompt_of(api, body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    target = model_rewrite or model
    req = LLMRequest(
        request_id=request_id,
        model=model,
        target_model=target,
        api=api,
        prompt_tokens=tokens,
        stream=body.get("stream") is True,
        headers=headers,
        body=body,
        body_size=len(raw),
        max_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None,
        prompt_text=text[:PROMPT_TEXT_LIMIT],
    )
    return req, body
