"""token-producer: the request's prompt as token ids for the prefix-cache producers (llm-d).

Backends:
* `estimate` (llm-d's default and what runs when no token producer is configured): the UTF-8
  bytes of the user input packed 4 to a pseudo-token (`epp/scheduling/tokens.py`). Enough for
  the approximate producer, and exact for the simulator, which tokenizes the same way; its ids
  never match a real engine's.
* a local tokenizer (`tokenizerPath`: a model directory or its `tokenizer.json`, the files vLLM
  itself loads): the prompt encoded as vLLM encodes it — completions with the tokenizer's
  special tokens, chats rendered through the model's chat template (`tokenizer_config.json`,
  generation prompt added) — so precise prefix matching works against real vLLM. Needs the
  `tokenizers` and `jinja2` packages (`pip install 'inference-epp[tokenizer]'`).

llm-d's `vllm` backend (an HTTP call to vLLM's /render per request) and its deprecated
`udsTokenizerConfig` are not implemented: the EPP schedules synchronously and tokenizes
in-process; point `tokenizerPath` at the model the engines serve instead.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register
from epp.scheduling.tokens import TOKENS_KEY, TokenizedPrompt, estimate

TYPE = "token-producer"


class LocalTokenizer:
    """A Hugging Face `tokenizer.json` plus the chat template beside it, without transformers or torch."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("token-producer: tokenizerPath needs the `tokenizers` package; pip install 'inference-epp[tokenizer]'") from None
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ConfigError(f"token-producer: no tokenizer.json at {path}; give the model directory vLLM serves")
        self.tokenizer = Tokenizer.from_file(str(file))
        cfg_file = file.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: vLLM uses the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        jinja_file = file.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.template = _compile(template) if template else None

    def completion(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> list[int]:
        if self.template is None:
            raise ValueError("the model has no chat template")
        text = self.template.render(messages=list(messages), tools=tools, add_generation_prompt=True, **self.special)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _token_text(v: Any) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def _compile(template: str) -> Any:
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("token-producer: chat templates need the `jinja2` package; pip install 'inference-epp[tokenizer]'") from None

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env.from_string(template)


class TokenProducer:
    type_name = TYPE
    produce_order = 0  # before every producer that reads tokens

    def __init__(self, name: str, tokenizer: LocalTokenizer | None = None) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.failures = 0

    def produce(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        state.write(TOKENS_KEY, self.tokenize(request))

    def tokenize(self, request: LLMRequest) -> TokenizedPrompt:
        if self.tokenizer is None:
            return estimate(request)
        body = request.body or {}
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else ""
        try:
            if request.api == "chat/completions":
                ids = [self.tokenizer.chat(body.get("messages") or [], body.get("tools"))]
            elif request.api == "completions" and isinstance(body.get("prompt"), str):
                ids = [self.tokenizer.completion(body["prompt"])]
            elif request.api == "completions" and isinstance(body.get("prompt"), list) and all(isinstance(p, str) for p in body["prompt"]):
                ids = [self.tokenizer.completion(p) for p in body["prompt"]]
            else:
                return estimate(request)  # token-id prompts pass through; other APIs have no engine tokenization here
        except Exception:  # noqa: BLE001 - a template that rejects this chat: no precise match, never a failed request
            self.failures += 1
            return TokenizedPrompt((), salt, estimated=False)
        return TokenizedPrompt(tuple(array("I", i) for i in ids if i), salt, estimated=False)


@register(TYPE, aliases=("tokenizer",))
def from_parameters(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TokenProducer:
    p = Params(name, parameters, ("modelName", "vllm", "udsTokenizerConfig", "estimate", "tokenizerPath"))
    for field in ("vllm", "udsTokenizerConfig"):
        if p.has(field):
            raise p.error(field, "is not implemented here (the EPP tokenizes in-process, not over HTTP or a socket); "
                                 "set tokenizerPath to the model directory the engines serve, or leave both out for the estimate")
    if p.has("estimate"):
        est = p.nested("estimate", ("image", "video"))
        if est.values:
            raise est.error(sorted(est.values)[0], "tunes multimodal placeholders, which the estimate here does not count")
    p.str("modelName")
    path = p.str("tokenizerPath")
    return TokenProducer(name, LocalTokenizer(path) if path else None)
