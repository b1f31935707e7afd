"""Scaled rotary embeddings (linear, llama3, dynamic NTK) give transformers' greedy tokens, and
the cos/sin tables are built on the shard's own device."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, hf_greedy, make_tiny_model
from transformers import AutoConfig

from shardserve import LLM, SamplingParams
from shardserve.workers.layers.rotary import RotaryEmbedding

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 10000.0},
    # Trained on 64 positions; served up to 128, the frequencies change past 64.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


def prompts_and_lengths() -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(3)
    # Short and long prompts; with dynamic scaling some cross 64 while decoding, one (80)
    # starts past it.
    lengths, outputs = [5, 40, 60, 80, 20], [30, 40, 20, 30, 50]
    return [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in lengths], outputs


@pytest.fixture(scope="module")
def scaled_models(tmp_path_factory):
    made = {}
    for name, rope in SCALINGS.items():
        made[name] = make_tiny_model(tmp_path_factory.mktemp(name), "llama-gqa",
                                     max_position_embeddings=64 if name == "dynamic" else 256,
                                     rope_parameters=rope)
    made["default-64"] = make_tiny_model(tmp_path_factory.mktemp("default"), "llama-gqa",
                                         max_position_embeddings=64)
    return made


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_matches_transformers(scaled_models, name):
    model_dir = scaled_models[name]
    prompts, max_tokens = prompts_and_lengths()
    expected = hf_greedy(model_dir, prompts, max_tokens, ignore_eos=True,
                         fresh_model=name == "dynamic")
    llm = LLM(str(model_dir), dtype="float32")
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0,
                                                    ignore_eos=True) for n in max_tokens])
    assert [r.token_ids for r in results] == expected
    if name == "dynamic":
        # Served past the 64 trained positions (factor 2), where the frequencies change.
        assert llm.engine.max_model_len == 128
        assert max(len(p) + n for p, n in zip(prompts, max_tokens)) > 64


def test_dynamic_scaling_changes_the_tokens_past_the_trained_length(scaled_models):
    """The scaled path is really taken: past 64 positions the tokens differ from the same
    weights with plain rope (transformers agrees on both, above)."""
    prompts, max_tokens = prompts_and_lengths()
    chosen = [prompts[0], prompts[2]]
    plain = hf_greedy(scaled_models["default-64"], chosen, [20, 20], ignore_eos=True)
    dynamic = LLM(str(scaled_models["dynamic"]), dtype="float32").generate(
        chosen, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert dynamic[0].token_ids == plain[0]  # 5 + 20 tokens: inside the trained length
    assert dynamic[1].token_ids != plain[1]  # 60 + 20 tokens: crosses 64


@pytest.mark.parametrize("name", list(SCALINGS))
def test_tables_are_built_on_the_shards_device(scaled_models, name):
    """Every buffer is made on the device the shard runs on (a GPU there): building under a
    meta-device context, as a shard builds under its CUDA device, mixes no CPU tensor in."""
    config = AutoConfig.from_pretrained(scaled_models[name])
    meta = torch.device("meta")
    with meta:
        rotary = RotaryEmbedding(config, 16, 128, torch.float32, meta)
        cos, sin = rotary.cos_sin(torch.arange(10, device=meta))
    assert rotary.cos.device == rotary.sin.device == cos.device == sin.device == meta


def test_unsupported_rope_type_is_refused_with_the_supported_ones(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama-gqa", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8, "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported.*llama3"):
        LLM(str(model_dir), dtype="float32")
