"""Bad input raises a ValueError that says what to change, and leaves nothing queued."""

from __future__ import annotations

import re

import pytest

from shardserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama-gqa")), dtype="float32", num_kv_blocks=64, block_size=16)


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_tokens=-1), "max_tokens must be a positive integer"),
    (SamplingParams(max_tokens=0), "max_tokens must be a positive integer"),
    (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (SamplingParams(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (SamplingParams(temperature=-0.1), "temperature must be a number >= 0"),
    (SamplingParams(temperature=float("nan")), "temperature must be a number >= 0"),
    (SamplingParams(temperature=float("inf")), "temperature must be a number >= 0"),
    (SamplingParams(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (SamplingParams(top_k=-2), "top_k must be an integer >= 0"),
    (SamplingParams(stop_token_ids=[5000]), "not in the vocabulary"),
    (SamplingParams(stop=[""]), "stop strings must not be empty"),
    (SamplingParams(logprobs=100), "logprobs must be between 0 and 20"),
])
def test_bad_sampling_params(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2, 3]], params)
    assert not llm.engine.has_unfinished()


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams())


def test_prompt_longer_than_the_model_limit(llm):
    with pytest.raises(ValueError, match="context limit is 256"):
        llm.generate([[7] * 300], SamplingParams())


def test_max_tokens_beyond_the_context(llm):
    with pytest.raises(ValueError, match=r"set max_tokens <= 156"):
        llm.generate([[7] * 100], SamplingParams(max_tokens=200))


def test_token_ids_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 100000]], SamplingParams())


def test_request_larger_than_the_kv_cache(tiny_model):
    small = LLM(str(tiny_model("llama-gqa")), dtype="float32", num_kv_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="KV cache holds 32"):
        small.generate([[7] * 30], SamplingParams(max_tokens=10))


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate([[1, 2], []], SamplingParams())
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
               architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="unknown engine option 'tensor_paralel_size'"):
        LLM("smollm2", tensor_paralel_size=2)


@pytest.mark.parametrize("options, message", [
    ({"quantization": "int4"}, "quantization must be none, int8-weight, w8a8-smoothquant or "
                               "llm-int8, got 'int4'"),
    ({"smoothquant_alpha": 1.5}, "smoothquant_alpha must be in"),
    ({"llm_int8_threshold": 0}, "llm_int8_threshold must be > 0"),
    ({"cpu_gemm": "mkl"}, "cpu_gemm must be auto, panels or onednn"),
    ({"sparsity": "1:4"}, "sparsity must be none or 2:4, got '1:4'"),
    ({"sparsity": "2:4", "sparsity_score": "random"},
     "sparsity_score must be activation or magnitude, got 'random'"),
    ({"sparsity": "2:4", "quantization": "w8a8-smoothquant"},
     "sparsity 2:4 composes with quantization none or int8-weight, not w8a8-smoothquant"),
])
def test_bad_compression_options_are_refused_at_start(options, message):
    from shardserve.cluster.config import EngineConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig().with_overrides(**options)
