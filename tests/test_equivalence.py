"""Greedy outputs equal transformers' generate, token for token, for every batch mix."""

from __future__ import annotations

import pytest
from tiny import hf_greedy, mixed_prompts

from shardserve import LLM, SamplingParams


def run(model_dir, prompts, max_tokens, **options):
    llm = LLM(str(model_dir), dtype="float32", **options)
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                     for n in max_tokens])
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked after the run"
    for r in results:  # every request produced a token, after it was submitted
        assert r.time_to_first_token_s is not None and r.time_to_first_token_s >= 0
    return llm, results


@pytest.mark.parametrize("variant", ["llama-mha", "llama-gqa", "llama-mqa", "llama-gqa-untied",
                                     "qwen2-gqa", "mistral-gqa"])
def test_greedy_matches_transformers(tiny_model, variant):
    model_dir = tiny_model(variant)
    prompts, max_tokens = mixed_prompts()
    expected = hf_greedy(model_dir, prompts, max_tokens)
    _, results = run(model_dir, prompts, max_tokens)
    assert [r.token_ids for r in results] == expected


def test_preemption_keeps_outputs_identical(tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    # 20 blocks of 8 tokens hold 160 tokens; the batch needs ~400 at once.
    llm, results = run(model_dir, prompts, max_tokens, num_kv_blocks=20, block_size=8)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [r.token_ids for r in results] == expected


def test_chunked_prefill_and_small_token_budget(tiny_model):
    model_dir = tiny_model("llama-mqa")
    prompts, max_tokens = mixed_prompts()
    expected = hf_greedy(model_dir, prompts, max_tokens)
    # 24 tokens a step: the 80-token prompt is computed in four chunks, beside decodes.
    llm, results = run(model_dir, prompts, max_tokens, max_num_batched_tokens=24, block_size=4)
    assert [r.token_ids for r in results] == expected
    assert llm.engine.scheduler.max_num_batched_tokens == 24  # a set budget beats the default


def test_static_batching_gives_the_same_tokens(tiny_model):
    model_dir = tiny_model("llama-mha")
    prompts, max_tokens = mixed_prompts()
    expected = hf_greedy(model_dir, prompts, max_tokens)
    _, results = run(model_dir, prompts, max_tokens, scheduling_policy="static", max_num_seqs=4)
    assert [r.token_ids for r in results] == expected


def test_one_request_at_a_time_matches_a_batch(tiny_model):
    model_dir = tiny_model("qwen2-gqa")
    prompts, max_tokens = mixed_prompts(4)
    llm, batched = run(model_dir, prompts, max_tokens)
    for prompt, n, together in zip(prompts, max_tokens, batched):
        alone = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0))[0]
        assert alone.token_ids == together.token_ids
