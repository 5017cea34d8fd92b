"""Build the tiny Llama model real vLLM serves here: no model hub, random weights, a local tokenizer.

Runs with the vLLM venv's Python (transformers, tokenizers and torch live there):

    .venv-vllm/bin/python vllm_cpu/tiny_model.py --output .venv-vllm/tiny-llama

Deterministic: the same seed gives the same weights and tokenizer, so greedy outputs are
reproducible across machines. The tokenizer is a byte-level BPE trained on a synthetic corpus
whose vocabulary holds every three-letter lowercase word with its leading space, so the
benchmark's prompts (random three-letter words) cost one token per word, as the EPP estimates.
Weights are drawn wider than usual so that greedy decoding has clear margins between the best
two tokens: floating-point differences between a P/D pair and a single server do not flip them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
import sys
from pathlib import Path

VERSION = 1  # bump when anything below changes what is built
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not what "
         "all were we when your can said there use an each which she do how their if will up other about out many then them these so "
         "some her would make like him into time has look two more write go see number no way could people my than first water been "
         "call who oil its now find long down day did get come made may part hello tell me about kv caches request model token cache "
         "prefill decode transfer bandwidth latency gateway endpoint picker route proxy backend shared storage fabric nvlink").split()


def corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    triples = ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=3)]
    lines = []
    for _ in range(4):  # every three-letter word several times, in random order, so BPE merges each one
        rng.shuffle(triples)
        lines.extend(" ".join(triples[i:i + 24]) for i in range(0, len(triples), 24))
    for _ in range(3000):
        n = rng.randint(4, 24)
        words = [rng.choice(WORDS) for _ in range(n)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 9999)}")
    return lines


def build(output: Path, seed: int = 0, vocab_size: int = 20480, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          max_positions: int = 4096) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stamp = output / "build.json"
    settings = {"version": VERSION, "seed": seed, "vocab_size": vocab_size, "hidden": hidden, "layers": layers, "heads": heads,
                "kv_heads": kv_heads, "max_positions": max_positions}
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return output  # built before with the same settings: the cache
    output.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = max_positions
    fast.save_pretrained(output)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=max_positions, initializer_range=0.1,
        tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(output, safe_serialization=True)
    stamp.write_text(json.dumps(settings))
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="model folder to write (skipped when already built with the same settings)")
    p.add_argument("--seed", type=int, default=0, help="weights and tokenizer corpus seed (default: %(default)s)")
    args = p.parse_args(argv)
    print(build(Path(args.output), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
