"""A 16-bit KV cache (kv_cache_dtype float16 or bfloat16) or an int8 one beside the
model-dtype cache: twice (int8: about four times) the tokens in the same memory, within the
tolerance the README states, asserted here on the tiny models (logprobs of the same tokens)
and on SmolLM2 (greedy agreement)."""

from __future__ import annotations

import pytest
import torch
from tiny import largest_logprob_difference, mean_greedy_agreement

from shardserve import LLM

# Per KV dtype: the largest |logprob difference| of a token both caches chose (tiny models),
# and the least mean greedy agreement with the fp32 cache on SmolLM2 (the share of tokens
# identical before the first divergence, 8 prompts x 32 tokens). Measured on an AMD EPYC:
# float16 0.0042 and 1.00 (every token identical), bfloat16 0.047 and 0.90, int8 (a scale
# per cached vector) 0.093 and 0.73.
TOLERANCE = {"float16": (0.01, 0.9), "bfloat16": (0.1, 0.75), "int8": (0.2, 0.6)}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colours are", "In 1492, Columbus", "import numpy as np\n",
           "The best way to learn a language is", "Water boils at"]


def test_auto_stores_the_model_dtype_and_16_bits_hold_twice_the_tokens(tiny_model):
    model_dir = str(tiny_model("llama-gqa"))
    exact = LLM(model_dir, dtype="float32", kv_cache_memory="4MiB", max_num_seqs=10 ** 4)
    half = LLM(model_dir, dtype="float32", kv_cache_memory="4MiB", max_num_seqs=10 ** 4,
               kv_cache_dtype="float16")
    assert exact.engine.executor.shard.kv_caches[0].keys.dtype == torch.float32
    assert half.engine.executor.shard.kv_caches[0].keys.dtype == torch.float16
    assert half.engine.kv.num_blocks == 2 * exact.engine.kv.num_blocks
    quarter = LLM(model_dir, dtype="float32", kv_cache_memory="4MiB", max_num_seqs=10 ** 4,
                  kv_cache_dtype="int8")
    cache = quarter.engine.executor.shard.kv_caches[0]
    assert cache.keys.dtype == torch.int8 and cache.key_scales.dtype == torch.float32
    head_dim = cache.keys.shape[-1]  # int8 values plus a 4-byte scale per vector
    ratio = quarter.engine.kv.num_blocks / exact.engine.kv.num_blocks
    assert abs(ratio - 4 * head_dim / (head_dim + 4)) < 0.02, ratio


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "int8"])
def test_logprobs_of_the_tiny_models_stay_within_tolerance(tiny_model, kv_dtype):
    worst = largest_logprob_difference(
        [tiny_model(v) for v in ("llama-gqa", "llama-mha", "qwen2-gqa")], kv_cache_dtype=kv_dtype)
    print(f"{kv_dtype}: largest logprob difference {worst:.4f}")
    assert 0 < worst <= TOLERANCE[kv_dtype][0], worst


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "int8"])
def test_smollm2_greedy_agreement_stays_within_tolerance(smollm2_dir, kv_dtype):
    mean = mean_greedy_agreement(smollm2_dir, PROMPTS, kv_cache_dtype=kv_dtype)
    print(f"{kv_dtype}: mean greedy agreement {mean:.3f}")
    assert mean >= TOLERANCE[kv_dtype][1]
