"""Tiny random models made in the test, and transformers' greedy outputs to compare against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

VOCAB = 1000
EOS = 999

# name -> (config class, attention heads, KV heads, extra config)
VARIANTS = {
    "llama-mha": (LlamaConfig, 4, 4, {}),
    "llama-gqa": (LlamaConfig, 4, 2, {}),
    "llama-mqa": (LlamaConfig, 4, 1, {}),
    "llama-gqa-untied": (LlamaConfig, 6, 3, {"tie_word_embeddings": False}),
    "llama-tied": (LlamaConfig, 4, 2, {"tie_word_embeddings": True}),
    "qwen2-gqa": (Qwen2Config, 4, 2, {}),
    "mistral-gqa": (MistralConfig, 4, 2, {"sliding_window": 4096}),
}


# Roles are the words w3 (system), w4 (user), w5 (assistant); the assistant's turn opens with w5.
CHAT_TEMPLATE = (
    "{% set roles = {'system': 'w3', 'user': 'w4', 'assistant': 'w5'} %}"
    "{% for m in messages %}"
    "{% if m['role'] not in roles %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}"
    "{{ roles[m['role']] }} {{ m['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}w5{% endif %}")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word w{i}; text and ids map one to one, which makes stop strings exact."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=f"w{EOS}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(path: Path, variant: str, seed: int = 0, eos_token_id: int = EOS,
                    num_layers: int = 2, **overrides) -> Path:
    """`overrides`: config fields to change, e.g. rope_parameters or max_position_embeddings."""
    config_cls, heads, kv_heads, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    fields = dict(hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                  max_position_embeddings=256, eos_token_id=eos_token_id, bos_token_id=1,
                  pad_token_id=0, initializer_range=0.2)
    config = config_cls(**{**fields, **extra, **overrides})
    # A larger init than the default spreads the logits, so argmax ties (which float noise
    # could break either way) do not occur.
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def set_eos(model_dir: Path, eos_token_id: int) -> None:
    for name in ("config.json", "generation_config.json"):
        f = model_dir / name
        data = json.loads(f.read_text())
        data["eos_token_id"] = eos_token_id
        f.write_text(json.dumps(data))


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: list[int],
              ignore_eos: bool = False, fresh_model: bool = False,
              patch=None) -> list[list[int]]:
    """transformers' generate, one prompt at a time (no padding), greedy. `ignore_eos`: EOS may
    be generated but does not stop (as the engine's ignore_eos; min_new_tokens would mask it).
    `fresh_model`: a new model per prompt, for rope variants whose transformers module keeps
    state across calls (dynamic scaling keeps the frequencies of the longest sequence seen).
    `patch(model)` changes the loaded model first (e.g. its linear layers' arithmetic)."""

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if patch is not None:
            patch(model)
        if ignore_eos:
            model.generation_config.eos_token_id = None
        return model

    model = load()
    outputs = []
    for prompt, n in zip(prompts, max_tokens):
        if fresh_model:
            model = load()
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=n, do_sample=False)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def mixed_prompts(count: int = 6, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Prompts of different lengths (1..80 tokens) and different max_tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 7, 33, 80, 16, 50, 3, 64][:count]
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]
    max_tokens = [12, 30, 5, 20, 40, 1, 25, 8][:count]
    return prompts, max_tokens


def shared_prefix_prompts(count: int, prefix_len: int = 40, seed: int = 3):
    """Prompts that start with one shared prefix and end differently."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, VOCAB - 1, (prefix_len,), generator=g).tolist()
    suffixes = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist()
                for n in [1, 9, 3, 17, 30, 5, 12, 24][:count]]
    return [prefix + s for s in suffixes], [12, 30, 5, 20, 40, 1, 25, 8][:count]


def agreement(a: list[int], b: list[int]) -> float:
    """The share of a's tokens equal to b's before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def mean_greedy_agreement(model_dir, prompts: list[str], **options) -> float:
    """Mean agreement of 32 greedy tokens per prompt with `options` against fp32 without."""
    from shardserve import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=32, temperature=0)
    reference = LLM(str(model_dir), dtype="float32", kv_cache_memory="256MiB").generate(
        prompts, greedy)
    got = LLM(str(model_dir), dtype="float32", kv_cache_memory="256MiB", **options).generate(
        prompts, greedy)
    shares = [agreement(r.token_ids, g.token_ids) for r, g in zip(reference, got)]
    return sum(shares) / len(shares)


def largest_logprob_difference(model_dirs, **options) -> float:
    """The largest |logprob difference| of a greedy token both runs chose (up to their first
    difference), with `options` against fp32 without, over mixed prompts on each model."""
    from shardserve import LLM, SamplingParams

    worst = 0.0
    for model_dir in model_dirs:
        prompts, max_tokens = mixed_prompts(8)
        params = [SamplingParams(max_tokens=n, temperature=0, logprobs=0) for n in max_tokens]
        reference = LLM(str(model_dir), dtype="float32").generate(prompts, params)
        got = LLM(str(model_dir), dtype="float32", **options).generate(prompts, params)
        for r, g in zip(reference, got):
            for a, b in zip(r.logprobs, g.logprobs):
                if a.token_id != b.token_id:
                    break
                worst = max(worst, abs(a.logprob - b.logprob))
    return worst
