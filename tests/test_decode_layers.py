"""A stage's decoder layers in one C call for decode-only steps (workers/kernels/decode_layers.c)
against the same layers called one kernel at a time: the same bits, for every model variant,
weight format and KV cache dtype it takes, and the one-at-a-time path wherever it does not
apply. (Greedy equality with transformers in every layout is test_equivalence's.)"""

from __future__ import annotations

import pytest
from tiny import make_tiny_model, mixed_prompts

from shardserve import LLM, SamplingParams
from shardserve.workers.layers.decode_layers import DecodeLayers


def generate(model_dir, monkeypatch, native: bool, **options):
    """(tokens and logprobs of each request, steps the C path ran, whether it was set up)."""
    if native:
        monkeypatch.delenv("SHARDSERVE_DECODE_LAYERS", raising=False)
    else:
        monkeypatch.setenv("SHARDSERVE_DECODE_LAYERS", "python")
    calls = {"native": 0}
    run = DecodeLayers.run

    def counted(self, *args):
        out = run(self, *args)
        calls["native"] += out is not None
        return out

    monkeypatch.setattr(DecodeLayers, "run", counted)
    llm = LLM(str(model_dir), dtype="float32", **options)
    prompts, max_tokens = mixed_prompts(8)
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=2, ignore_eos=True)
              for n in max_tokens]
    outputs = llm.generate(prompts, params)
    monkeypatch.setattr(DecodeLayers, "run", run)
    result = [[(t.token_id, t.logprob, t.top_logprobs) for t in o.logprobs] for o in outputs]
    set_up = llm.engine.executor.shard.model.decode_layers is not None
    return result, calls["native"], set_up


@pytest.mark.parametrize("variant,extra", [
    ("llama-gqa", {}), ("llama-mha", {}), ("llama-mqa", {}), ("llama-gqa-untied", {}),
    ("qwen2-gqa", {}),  # q/k/v biases
    ("mistral-gqa", {"sliding_window": 6}),  # the window cuts into the longer prompts
])
def test_bit_identical_to_one_kernel_at_a_time(tmp_path, monkeypatch, variant, extra):
    model_dir = make_tiny_model(tmp_path / variant, variant, num_layers=3, **extra)
    expected, calls, set_up = generate(model_dir, monkeypatch, native=False)
    assert not set_up and calls == 0
    got, calls, set_up = generate(model_dir, monkeypatch, native=True)
    assert set_up and calls > 20  # every step after the prompts' prefills
    assert got == expected


@pytest.mark.parametrize("options", [
    {"kv_cache_dtype": "bfloat16"}, {"kv_cache_dtype": "float16"}, {"kv_cache_dtype": "int8"},
    {"quantization": "int8-weight"}, {"sparsity": "2:4"},
    {"sparsity": "2:4", "quantization": "int8-weight"},
    {"num_kv_blocks": 24, "block_size": 8},  # preemption: recomputed prompts between decodes
])
def test_bit_identical_with_each_cache_and_weight_format(tmp_path, monkeypatch, options):
    model_dir = make_tiny_model(tmp_path / "m", "llama-gqa", num_layers=2)
    expected, _, _ = generate(model_dir, monkeypatch, native=False, **options)
    got, calls, set_up = generate(model_dir, monkeypatch, native=True, **options)
    assert set_up and calls > 20
    assert got == expected


@pytest.mark.parametrize("options", [{"quantization": "w8a8-smoothquant"},
                                     {"quantization": "llm-int8"}, {"cpu_gemm": "onednn"}])
def test_layers_without_panels_run_one_kernel_at_a_time(tmp_path, monkeypatch, options):
    model_dir = make_tiny_model(tmp_path / "m", "llama-gqa", num_layers=2)
    _, calls, set_up = generate(model_dir, monkeypatch, native=True, **options)
    assert not set_up and calls == 0


def test_a_block_outside_the_pool_is_refused(tmp_path, monkeypatch):
    """The C path checks every slot and block before it runs, as the per-kernel path does."""
    import torch

    model_dir = make_tiny_model(tmp_path / "m", "llama-gqa", num_layers=2)
    llm = LLM(str(model_dir), dtype="float32")
    shard = llm.engine.executor.shard
    layers = shard.model.decode_layers
    from shardserve.workers.layers.attention import build_metadata
    from shardserve.workers.step import SequenceStep

    num_blocks = shard.kv_caches[0].keys.shape[1]
    seq = SequenceStep(0, [5], 20, [0, num_blocks + 3], True, SamplingParams(), 0, 0)
    meta = build_metadata([seq], shard.block_size, None, shard.workspace, torch.device("cpu"))
    hidden = torch.randn(1, 64)
    cos, sin = torch.ones(1, 16), torch.zeros(1, 16)
    with pytest.raises(IndexError, match="outside the KV cache"):
        layers.run(hidden, cos, sin, shard.kv_caches, meta)
