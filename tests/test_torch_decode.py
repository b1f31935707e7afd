"""The torch decode path (the one a GPU runs; the CPU uses the C kernel) against
transformers, with the gathered workspace bounded."""

from __future__ import annotations

import pytest
from tiny import hf_greedy, make_tiny_model, mixed_prompts

from shardserve import LLM, SamplingParams
from shardserve.workers.layers import attention


@pytest.fixture
def torch_decode(monkeypatch):
    """Decodes through SDPA over gathered blocks, as on a GPU (so neither C decode path runs:
    not the paged attention kernel, nor the whole-stage decode_layers.c)."""
    monkeypatch.setattr(attention, "paged_decode_library", lambda: None)
    monkeypatch.setenv("SHARDSERVE_DECODE_LAYERS", "python")


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mqa", "llama-mha", "qwen2-gqa",
                                     "llama-gqa-untied"])
def test_torch_decode_matches_transformers(torch_decode, tiny_model, variant):
    model_dir = tiny_model(variant)
    prompts, max_tokens = mixed_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    results = LLM(str(model_dir), dtype="float32", block_size=8).generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens])
    assert [r.token_ids for r in results] == expected


def test_small_gather_budget_splits_decodes_and_bounds_the_workspace(torch_decode, tiny_model,
                                                                      monkeypatch):
    """With room for 48 key slots per gather, decodes run in several groups and the workspace
    never holds more than that (or one sequence's context, when longer), yet the tokens are
    transformers'."""
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", 48)
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = LLM(str(model_dir), dtype="float32", block_size=8)
    groups_seen = []
    original = attention._decode_group

    def counting(q, *args, **kwargs):
        groups_seen.append(q.shape[0])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(attention, "_decode_group", counting)
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                     for n in max_tokens])
    assert [r.token_ids for r in results] == expected
    assert len(groups_seen) > llm.engine.shape.num_layers * max(max_tokens)  # really split
    shard = llm.engine.executor.shard
    longest = max(len(p) + n for p, n in zip(prompts, max_tokens))
    slots = max(48, -(-longest // 8) * 8)
    per_slot = shard.model.layers[0].self_attn.heads.num_kv * shard.shape.head_dim
    assert shard.workspace.buffers[0].numel() <= slots * per_slot


def test_sliding_window_on_the_torch_path(torch_decode, tmp_path):
    """Mistral with a window shorter than the sequences: the decode masks drop old keys."""
    model_dir = make_tiny_model(tmp_path, "mistral-gqa", sliding_window=12)
    prompts, max_tokens = mixed_prompts(6)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    results = LLM(str(model_dir), dtype="float32", block_size=4).generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens])
    assert [r.token_ids for r in results] == expected
