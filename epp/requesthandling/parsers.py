"""Request parsers (`requestHandler.parsers`): which requests this EPP understands, and how.

The configured parsers are tried in order; the first that claims the request's path parses it
(llm-d's parser registry). openai-parser claims the OpenAI API paths and reads the body
(model, prompt, stream, max_tokens) with GIE's error messages. passthrough-parser claims every
path and reads nothing: the body is forwarded byte for byte, the model is unknown (empty metric
labels), and the prompt size is estimated from the body length so load-aware plugins still work.
Without a `requestHandler` section the chain is openai-parser alone, as in GIE.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.extproc.request_parser import api_of, bad_request, parse_request
from epp.scheduling.framework import LLMRequest
from epp.scheduling.registry import PluginContext, register


class OpenAIParser:
    type_name = "openai-parser"

    def __init__(self, name: str) -> None:
        self.name = name

    def claims(self, path: str) -> bool:
        return api_of(path) is not None

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], raw: bytes, model_rewrite: str | None) -> LLMRequest:
        return parse_request(request_id, path, headers, raw, model_rewrite)[0]


class PassthroughParser:
    type_name = "passthrough-parser"

    def __init__(self, name: str) -> None:
        self.name = name

    def claims(self, path: str) -> bool:
        return True

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], raw: bytes, model_rewrite: str | None) -> LLMRequest:
        return LLMRequest(
            request_id=request_id,
            model="",
            target_model="",
            api="passthrough",
            prompt_tokens=max(1, len(raw) // 4) if raw else 0,
            headers=headers,
            body=None,
            body_size=len(raw),
        )


class ParserChain:
    """The configured parsers in order; the first that claims a path parses the request."""

    def __init__(self, parsers: Sequence[Any]) -> None:
        self.parsers = list(parsers)

    def parse(self, request_id: str, path: str, headers: Mapping[str, str], raw: bytes, model_rewrite: str | None = None) -> LLMRequest:
        for p in self.parsers:
            if p.claims(path):
                return p.parse(request_id, path, headers, raw, model_rewrite)
        names = ", ".join(p.name for p in self.parsers)
        raise bad_request(f"unsupported API path {path.split('?', 1)[0]!r}: no configured parser ({names}) handles it; "
                          "expected an OpenAI path such as /v1/completions or /v1/chat/completions")


def is_parser(plugin: Any) -> bool:
    return callable(getattr(plugin, "parse", None)) and callable(getattr(plugin, "claims", None))


@register("openai-parser")
def _openai(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> OpenAIParser:
    return OpenAIParser(name)


@register("passthrough-parser")
def _passthrough(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PassthroughParser:
    return PassthroughParser(name)
